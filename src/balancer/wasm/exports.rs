//! What a component exports and imports, read from its type before it is
//! instantiated: which contract it implements, and if its functions do not
//! match that contract, an error that says what differs (the function, the
//! parameters it has and the ones the contract expects) rather than a type
//! mismatch at the first call. Imports a module is not granted are linked
//! to stubs that fail naming the import.

use wasmtime::component::types::{ComponentFunc, ComponentItem, Type};
use wasmtime::component::{Component, Linker};
use wasmtime::Engine;

use super::{v0_1, v0_2, Guest};
use crate::balancer::Contract;

/// One function a contract requires: its interface, name, parameter names,
/// and its WIT signature (for messages).
struct Expected {
    interface: &'static str,
    name: &'static str,
    params: &'static [&'static str],
    signature: &'static str,
}

const V0_1: [Expected; 1] = [Expected {
    interface: v0_1::SELECTOR_EXPORT,
    name: "select",
    params: &["backends"],
    signature: "func(backends: list<backend>) -> option<u32>",
}];

const V0_2: [Expected; 2] = [
    Expected {
        interface: v0_2::SELECTOR_EXPORT,
        name: "configure",
        params: &["options", "backends"],
        signature: "func(options: string, backends: list<backend-info>) -> result<_, string>",
    },
    Expected {
        interface: v0_2::SELECTOR_EXPORT,
        name: "select",
        params: &["request", "backends"],
        signature: "func(request: request, backends: list<backend>) -> option<u32>",
    },
];

const V0_2_OBSERVER: Expected = Expected {
    interface: v0_2::OBSERVER_EXPORT,
    name: "observe",
    params: &["outcome"],
    signature: "func(outcome: outcome)",
};

/// Prefix of every version's selector export.
const SELECTOR_PREFIX: &str = "loadbalancer:strategy/selector@";

/// The contract `component` implements and whether it exports the 0.2.0
/// observer; or a message saying what it exports and what is expected.
pub(super) fn contract_of(
    component: &Component,
    engine: &Engine,
) -> Result<(Contract, bool), String> {
    let ty = component.component_type();
    let exports: Vec<(String, ComponentItem)> = ty
        .exports(engine)
        .map(|(name, item)| (name.to_string(), item.ty))
        .collect();
    let find = |name: &str| exports.iter().find(|(n, _)| n == name).map(|(_, i)| i);
    let (contract, expected): (Contract, &[Expected]) = if find(v0_2::SELECTOR_EXPORT).is_some() {
        (Contract::V0_2, &V0_2)
    } else if find(v0_1::SELECTOR_EXPORT).is_some() {
        (Contract::V0_1, &V0_1)
    } else {
        let known = super::KNOWN_SELECTOR_EXPORTS
            .iter()
            .map(|e| format!("`{e}`"))
            .collect::<Vec<_>>()
            .join(" or ");
        if let Some((other, _)) = exports.iter().find(|(n, _)| n.starts_with(SELECTOR_PREFIX)) {
            return Err(format!(
                "exports `{other}`, a contract version this balancer does not know; it knows {known} \
                 (build the module against wit/0.2.0 or wit/0.1.0)"
            ));
        }
        let listed = if exports.is_empty() {
            "nothing".to_string()
        } else {
            exports
                .iter()
                .map(|(n, _)| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(format!(
            "exports no strategy selector: it exports {listed}, but a strategy exports one of {known}"
        ));
    };
    let version = contract.as_str();
    let observes = contract == Contract::V0_2 && find(v0_2::OBSERVER_EXPORT).is_some();
    let optional: &[Expected] = if observes {
        std::slice::from_ref(&V0_2_OBSERVER)
    } else {
        &[]
    };
    let mut problems = Vec::new();
    for want in expected.iter().chain(optional) {
        let Some(ComponentItem::ComponentInstance(instance)) = find(want.interface) else {
            problems.push(format!("`{}` is not an interface", want.interface));
            continue;
        };
        let func = instance
            .exports(engine)
            .find_map(|(name, item)| match item.ty {
                ComponentItem::ComponentFunc(func) if name == want.name => Some(func),
                _ => None,
            });
        let Some(func) = func else {
            problems.push(format!(
                "`{}` has no function `{}` (contract {version} expects `{}: {}`)",
                want.interface, want.name, want.name, want.signature
            ));
            continue;
        };
        let names: Vec<&str> = func.params().map(|(name, _)| name).collect();
        if names != want.params {
            problems.push(format!(
                "`{}` in `{}` has parameters ({}) but contract {version} expects ({})",
                want.name,
                want.interface,
                params(&func),
                want.signature
                    .trim_start_matches("func(")
                    .split(')')
                    .next()
                    .unwrap_or_default()
            ));
        }
    }
    if !problems.is_empty() {
        return Err(format!(
            "does not match the contract its export names: {}; was it built against another version's WIT?",
            problems.join("; ")
        ));
    }
    Ok((contract, observes))
}

/// `name: type, ...` of a function's parameters.
fn params(func: &ComponentFunc) -> String {
    func.params()
        .map(|(name, ty)| format!("{name}: {}", describe(&ty, 2)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A short WIT-like rendering of `ty`, records and variants by their field
/// and case names (a component's types carry no type names), `depth` levels
/// deep.
fn describe(ty: &Type, depth: usize) -> String {
    let inner = |ty: &Type| describe(ty, depth.saturating_sub(1));
    let names = |names: Vec<&str>| names.join(", ");
    match ty {
        Type::List(list) => format!("list<{}>", inner(&list.ty())),
        Type::Option(option) => format!("option<{}>", inner(&option.ty())),
        Type::Result(result) => format!(
            "result<{}, {}>",
            result.ok().map_or("_".into(), |t| inner(&t)),
            result.err().map_or("_".into(), |t| inner(&t))
        ),
        Type::Tuple(tuple) => format!(
            "tuple<{}>",
            tuple
                .types()
                .map(|t| inner(&t))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Type::Record(record) if depth > 0 => {
            format!(
                "record {{{}}}",
                names(record.fields().map(|f| f.name).collect())
            )
        }
        Type::Variant(variant) if depth > 0 => {
            format!(
                "variant {{{}}}",
                names(variant.cases().map(|c| c.name).collect())
            )
        }
        Type::Enum(e) if depth > 0 => format!("enum {{{}}}", names(e.names().collect())),
        Type::Record(_) => "record".into(),
        Type::Variant(_) => "variant".into(),
        Type::Enum(_) => "enum".into(),
        Type::Bool => "bool".into(),
        Type::S8 => "s8".into(),
        Type::U8 => "u8".into(),
        Type::S16 => "s16".into(),
        Type::U16 => "u16".into(),
        Type::S32 => "s32".into(),
        Type::U32 => "u32".into(),
        Type::S64 => "s64".into(),
        Type::U64 => "u64".into(),
        Type::Float32 => "f32".into(),
        Type::Float64 => "f64".into(),
        Type::Char => "char".into(),
        Type::String => "string".into(),
        Type::Flags(_) => "flags".into(),
        Type::Own(_) | Type::Borrow(_) => "resource".into(),
        _ => "(a type strategies do not use)".into(),
    }
}

/// The error a call to an ungranted import fails with: it names the import.
#[derive(Debug, thiserror::Error)]
#[error("called `{0}`, an import strategy modules are not granted (a module gets no capabilities but the contract's `logging`)")]
pub(super) struct UngrantedImport(pub(super) String);

/// Links every function `component` imports, other than `granted`
/// interfaces, to a stub that fails with [`UngrantedImport`]; whatever else
/// it imports (resource types) is stubbed by wasmtime. Returns the names of
/// the ungranted imports.
pub(super) fn stub_ungranted(
    linker: &mut Linker<Guest>,
    component: &Component,
    engine: &Engine,
    granted: &[&str],
) -> wasmtime::Result<Vec<String>> {
    let mut ungranted = Vec::new();
    for (name, item) in component.component_type().imports(engine) {
        if granted.contains(&name) {
            continue;
        }
        ungranted.push(name.to_string());
        match item.ty {
            ComponentItem::ComponentFunc(_) => {
                let full = name.to_string();
                linker.root().func_new(name, move |_, _, _, _| {
                    Err(UngrantedImport(full.clone()).into())
                })?;
            }
            ComponentItem::ComponentInstance(instance) => {
                let mut stubs = linker.instance(name)?;
                for (func_name, item) in instance.exports(engine) {
                    if let ComponentItem::ComponentFunc(_) = item.ty {
                        let full = format!("{name}#{func_name}");
                        stubs.func_new(func_name, move |_, _, _, _| {
                            Err(UngrantedImport(full.clone()).into())
                        })?;
                    }
                }
            }
            _ => {}
        }
    }
    if !ungranted.is_empty() {
        // Resource types and anything else: wasmtime's own stubs (it
        // leaves what is defined above alone).
        linker.define_unknown_imports_as_traps(component)?;
    }
    Ok(ungranted)
}
