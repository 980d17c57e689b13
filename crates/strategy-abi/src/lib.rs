//! The `backend` record of the strategy contracts (`wit/0.1.0`, `wit/0.2.0`)
//! as the host hands it to a strategy module, lowered into the module's
//! memory in one pass.
//!
//! Why this crate exists: wasmtime's derived lowering of a record stores a
//! list element field by field, each store looking up the record's type
//! and the instance's memory again; for `list<backend>` that cost about 50
//! ns per backend and dominated a `select` call (1.4 µs at 16 backends,
//! 51 µs at 1024; see the README's Performance section). Here the list is
//! written as one slice of 16-byte records.
//!
//! # Safety
//!
//! Implementing wasmtime's `ComponentType` and `Lower` is `unsafe` because
//! wasmtime trusts three things to agree: the flat representation
//! (`Lower`), the canonical ABI layout (`ABI`) and the type check. Here:
//!
//! - `Lower = [ValRaw; 4]`: a literal array of `ValRaw`, as the trait
//!   requires, one per `u32` field (each lowers to one `i32`).
//! - `ABI` is `record_static` of four `u32` ABIs: size 16, alignment 4, the
//!   canonical ABI of a record of four `u32` fields.
//! - `typecheck` accepts only a record whose fields are exactly `id`,
//!   `weight`, `active-connections` (0.1.0) or `in-flight` (0.2.0, the same
//!   count under its accurate name), `latency-micros`, in that order, each a
//!   `u32` (wasmtime's `typecheck_record` compares names, order and types),
//!   so the layout above is the component's layout: the two versions differ
//!   in one field's name, never in layout. A component with any other
//!   `backend` record is refused when the function is looked up, never
//!   called.
//!
//! The memory writes themselves are safe Rust: slices of the guest memory
//! that wasmtime hands out, bounds-checked, little-endian as the canonical
//! ABI wants. The unit tests below pin the byte layout; the host's
//! conformance tests run every shipped module through this path.
//!
//! [`Select`] (0.1.0) and [`SelectWithRequest`] (0.2.0, whose `select` also
//! takes the [`Request`] record, lowered in one pass too: see its module)
//! keep the looked-up function
//! and re-type it per call with
//! `TypedFunc::new_unchecked` after checking the type once, as wasmtime's
//! generated bindings do: the argument's lifetime differs per call, which a
//! stored `TypedFunc` cannot express.
//!
//! This crate is the only `unsafe` in the balancer: the host crate itself
//! is `#![forbid(unsafe_code)]`.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod request;

use std::mem::MaybeUninit;

pub use request::{IpAddress, Method, Request};

use wasmtime::component::__internal::{
    typecheck_record, CanonicalAbiInfo, InstanceType, InterfaceType, LowerContext,
};
use wasmtime::component::{ComponentType, Func, Lower, TypedFunc};
use wasmtime::{AsContext, AsContextMut, Result, ValRaw};

/// One backend as a strategy sees it (the WIT record `backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Backend {
    /// Stable identity: the backend's position in the configured list.
    pub id: u32,
    /// Configured weight, 1 when not set.
    pub weight: u32,
    /// Requests (and tunnels) now in flight to this backend through this
    /// balancer: `active-connections` in 0.1.0, `in-flight` in 0.2.0.
    pub in_flight: u32,
    /// Smoothed response latency in microseconds; 0 until known.
    pub latency_micros: u32,
}

/// Bytes of one record in guest memory.
const SIZE: usize = 16;

impl Backend {
    /// The record as the canonical ABI stores it: the four fields in WIT
    /// order, each a little-endian `u32`.
    pub fn to_bytes(self) -> [u8; SIZE] {
        let mut bytes = [0u8; SIZE];
        for (chunk, field) in bytes.chunks_exact_mut(4).zip([
            self.id,
            self.weight,
            self.in_flight,
            self.latency_micros,
        ]) {
            chunk.copy_from_slice(&field.to_le_bytes());
        }
        bytes
    }
}

// SAFETY: see the crate documentation: the flat form is four `ValRaw`s,
// the ABI that of a record of four `u32`s, and `typecheck` admits only the
// WIT record with exactly those fields in that order.
unsafe impl ComponentType for Backend {
    type Lower = [ValRaw; 4];

    const ABI: CanonicalAbiInfo =
        CanonicalAbiInfo::record_static(&[<u32 as ComponentType>::ABI; 4]);

    const MAY_REQUIRE_REALLOC: bool = false;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> Result<()> {
        let record = |count: &str| {
            typecheck_record(
                ty,
                types,
                &[
                    ("id", <u32 as ComponentType>::typecheck),
                    ("weight", <u32 as ComponentType>::typecheck),
                    (count, <u32 as ComponentType>::typecheck),
                    ("latency-micros", <u32 as ComponentType>::typecheck),
                ],
            )
        };
        // The 0.2.0 name first: an error then names the current contract.
        record("in-flight").or_else(|_| record("active-connections"))
    }
}

// SAFETY: every method writes exactly the representation declared above:
// four `ValRaw::u32`s flat, or 16 bytes in memory through bounds-checked
// slices.
unsafe impl Lower for Backend {
    fn linear_lower_to_flat<T>(
        &self,
        _cx: &mut LowerContext<'_, T>,
        _ty: InterfaceType,
        dst: &mut MaybeUninit<Self::Lower>,
    ) -> Result<()> {
        dst.write([
            ValRaw::u32(self.id),
            ValRaw::u32(self.weight),
            ValRaw::u32(self.in_flight),
            ValRaw::u32(self.latency_micros),
        ]);
        Ok(())
    }

    fn linear_lower_to_memory<T>(
        &self,
        cx: &mut LowerContext<'_, T>,
        _ty: InterfaceType,
        offset: usize,
    ) -> Result<()> {
        *cx.get::<SIZE>(offset) = self.to_bytes();
        Ok(())
    }

    fn linear_store_list_to_memory<T>(
        cx: &mut LowerContext<'_, T>,
        _ty: InterfaceType,
        offset: usize,
        items: &[Self],
    ) -> Result<()> {
        // wasmtime has checked that the list's allocation is in bounds; the
        // slicing checks again.
        let dst = &mut cx.as_slice_mut()[offset..][..items.len() * SIZE];
        for (chunk, item) in dst.chunks_exact_mut(SIZE).zip(items) {
            chunk.copy_from_slice(&item.to_bytes());
        }
        Ok(())
    }
}

/// The signature of `select` as the host calls it.
type SelectFunc<'a> = TypedFunc<(&'a [Backend],), (Option<u32>,)>;

/// The `select` function of one instance, type-checked once against
/// [`Backend`] (as wasmtime's generated bindings do).
#[derive(Debug, Clone, Copy)]
pub struct Select(Func);

impl Select {
    /// Checks `func`'s type: `func(backends: list<backend>) ->
    /// option<u32>` with this crate's `backend` record.
    pub fn new(store: impl AsContext, func: Func) -> Result<Select> {
        func.typed::<(&[Backend],), (Option<u32>,)>(&store)?;
        Ok(Select(func))
    }

    /// Calls `select` with `backends`.
    pub fn call(&self, store: impl AsContextMut, backends: &[Backend]) -> Result<Option<u32>> {
        // SAFETY: `new` checked this same signature against the function's
        // type; the argument's lifetime, the only difference, is not part
        // of a component type.
        let typed: SelectFunc<'_> = unsafe { TypedFunc::new_unchecked(self.0) };
        typed.call(store, (backends,)).map(|(answer,)| answer)
    }
}

/// The signature of 0.2.0's `select` as the host calls it.
type SelectWithRequestFunc<'a> = TypedFunc<(&'a Request<'a>, &'a [Backend]), (Option<u32>,)>;

/// The 0.2.0 `select` function of one instance: `func(request: request,
/// backends: list<backend>) -> option<u32>`, type-checked once against
/// this crate's [`Request`] and [`Backend`].
#[derive(Debug, Clone, Copy)]
pub struct SelectWithRequest(Func);

impl SelectWithRequest {
    /// Checks `func`'s type against `(request, list<backend>) -> option<u32>`.
    pub fn new(store: impl AsContext, func: Func) -> Result<SelectWithRequest> {
        func.typed::<(&Request<'_>, &[Backend]), (Option<u32>,)>(&store)?;
        Ok(SelectWithRequest(func))
    }

    /// Calls `select` with `request` and `backends`.
    pub fn call(
        &self,
        store: impl AsContextMut,
        request: &Request<'_>,
        backends: &[Backend],
    ) -> Result<Option<u32>> {
        // SAFETY: `new` checked this same signature against the function's
        // type; the arguments' lifetimes, the only difference, are not part
        // of a component type.
        let typed: SelectWithRequestFunc<'_> = unsafe { TypedFunc::new_unchecked(self.0) };
        typed
            .call(store, (request, backends))
            .map(|(answer,)| answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_is_four_little_endian_u32s_in_wit_order() {
        let b = Backend {
            id: 0x0403_0201,
            weight: 0x0807_0605,
            in_flight: 0x0c0b_0a09,
            latency_micros: 0x100f_0e0d,
        };
        assert_eq!(b.to_bytes(), std::array::from_fn(|i| i as u8 + 1));
        assert_eq!(<Backend as ComponentType>::SIZE32, SIZE);
        assert_eq!(<Backend as ComponentType>::ALIGN32, 4);
    }
}
