//! The 0.2.0 `request` record, lowered into guest memory in one pass.
//!
//! Why: wasmtime's derived lowering of a record stores each field on its
//! own, looking the instance's memory up again for each (`perf` of a 0.2.0
//! `select` at 16 backends: `Instance::options_memory_mut` alone 17 % of
//! the call, lowering as a whole about 40 %). Here the strings and the
//! header list go through wasmtime's own lowering (which allocates them in
//! the guest and knows the string encodings) and every other field is
//! written through one borrow of the record's 96 bytes.
//!
//! # Safety
//!
//! As for [`crate::Backend`]: wasmtime trusts `Lower` (the flat type), `ABI`
//! and `typecheck` to agree.
//!
//! - `ABI` is `record_static` of the fields' ABIs, each taken from
//!   wasmtime's own types (`str`, `Option<u64>`, tuples, a slice) or built
//!   with `variant_static` from them, in WIT order: the canonical layout of
//!   the record `typecheck` admits. The field offsets used below are
//!   computed from those same ABIs ([`OFFSETS`], pinned by a unit test
//!   against wasmtime's `next_field32`).
//! - `typecheck` admits only the 0.2.0 record: fields `method` (a variant
//!   of `get`, `head`, `post`, `put`, `delete`, `connect`, `options`,
//!   `trace`, `patch` and `other(string)`), `path` and `authority`
//!   (strings), `client` (a variant `ipv4(tuple<u8 x4>)`, `ipv6(tuple<u16
//!   x8>)`), `hash-key` (`option<u64>`), `headers`
//!   (`list<tuple<string, string>>`), `attempt` (`u32`), `random` and `id`
//!   (`u64`), in that order.
//! - `Lower` is the flat form's size (23 values); the record is never passed
//!   flat (23 > 16 flat values), and the flat lowering refuses with an error
//!   rather than write anything.
//! - Memory writes are bounds-checked slices of guest memory; strings and
//!   the list are lowered by wasmtime's own `Lower` impls with the field's
//!   own type.

use std::mem::MaybeUninit;

use wasmtime::component::__internal::{
    typecheck_record, typecheck_variant, CanonicalAbiInfo, InstanceType, InterfaceType,
    LowerContext,
};
use wasmtime::component::{ComponentType, Lower};
use wasmtime::{Result, ValRaw};

/// The request method (the WIT variant `method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method<'a> {
    /// `GET`
    Get,
    /// `HEAD`
    Head,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `DELETE`
    Delete,
    /// `CONNECT`
    Connect,
    /// `OPTIONS`
    Options,
    /// `TRACE`
    Trace,
    /// `PATCH`
    Patch,
    /// Any other method, as sent.
    Other(&'a str),
}

impl Method<'_> {
    /// The case's position in the WIT variant (its discriminant).
    fn discriminant(&self) -> u8 {
        match self {
            Method::Get => 0,
            Method::Head => 1,
            Method::Post => 2,
            Method::Put => 3,
            Method::Delete => 4,
            Method::Connect => 5,
            Method::Options => 6,
            Method::Trace => 7,
            Method::Patch => 8,
            Method::Other(_) => 9,
        }
    }
}

/// The client's address (the WIT variant `ip-address`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpAddress {
    /// `ipv4`: the four octets.
    V4([u8; 4]),
    /// `ipv6`: the eight 16-bit segments.
    V6([u16; 8]),
}

/// The request a 0.2.0 strategy is asked about (the WIT record `request`),
/// borrowing its strings for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The method.
    pub method: Method<'a>,
    /// Path and query.
    pub path: &'a str,
    /// The `Host` header, `""` when absent.
    pub authority: &'a str,
    /// The client's address.
    pub client: IpAddress,
    /// The hash of the configured key, if any.
    pub hash_key: Option<u64>,
    /// The configured headers, lowercase names.
    pub headers: &'a [(&'a str, &'a str)],
    /// 0 for the first try, n for the n-th retry.
    pub attempt: u32,
    /// A fresh random number.
    pub random: u64,
    /// The request's id.
    pub id: u64,
}

const STR: CanonicalAbiInfo = <str as ComponentType>::ABI;
const METHOD: CanonicalAbiInfo = CanonicalAbiInfo::variant_static(&[
    None,
    None,
    None,
    None,
    None,
    None,
    None,
    None,
    None,
    Some(STR),
]);
const IPV4: CanonicalAbiInfo = <(u8, u8, u8, u8) as ComponentType>::ABI;
const IPV6: CanonicalAbiInfo = <(u16, u16, u16, u16, u16, u16, u16, u16) as ComponentType>::ABI;
const CLIENT: CanonicalAbiInfo = CanonicalAbiInfo::variant_static(&[Some(IPV4), Some(IPV6)]);
const HASH_KEY: CanonicalAbiInfo = <Option<u64> as ComponentType>::ABI;
const HEADERS: CanonicalAbiInfo = <[(&str, &str)] as ComponentType>::ABI;
const U32: CanonicalAbiInfo = <u32 as ComponentType>::ABI;
const U64: CanonicalAbiInfo = <u64 as ComponentType>::ABI;

/// The fields' ABIs in WIT order.
const FIELDS: [CanonicalAbiInfo; 9] = [METHOD, STR, STR, CLIENT, HASH_KEY, HEADERS, U32, U64, U64];

const fn align_to(offset: u32, align: u32) -> u32 {
    offset.div_ceil(align) * align
}

/// Each field's offset in the record, from [`FIELDS`].
const OFFSETS: [usize; 9] = {
    let mut offsets = [0usize; 9];
    let mut offset = 0u32;
    let mut i = 0;
    while i < FIELDS.len() {
        offset = align_to(offset, FIELDS[i].align32);
        offsets[i] = offset as usize;
        offset += FIELDS[i].size32;
        i += 1;
    }
    offsets
};

/// Where a variant's payload starts: after its one-byte discriminant
/// (both variants have fewer than 256 cases), at the payload's alignment.
const fn payload_offset(variant: CanonicalAbiInfo) -> usize {
    align_to(1, variant.align32) as usize
}

const SIZE: usize = CanonicalAbiInfo::record_static(&FIELDS).size32 as usize;

fn typecheck_method(ty: &InterfaceType, types: &InstanceType<'_>) -> Result<()> {
    typecheck_variant(
        ty,
        types,
        &[
            ("get", None),
            ("head", None),
            ("post", None),
            ("put", None),
            ("delete", None),
            ("connect", None),
            ("options", None),
            ("trace", None),
            ("patch", None),
            ("other", Some(<&str as ComponentType>::typecheck)),
        ],
    )
}

fn typecheck_client(ty: &InterfaceType, types: &InstanceType<'_>) -> Result<()> {
    typecheck_variant(
        ty,
        types,
        &[
            ("ipv4", Some(<(u8, u8, u8, u8) as ComponentType>::typecheck)),
            (
                "ipv6",
                Some(<(u16, u16, u16, u16, u16, u16, u16, u16) as ComponentType>::typecheck),
            ),
        ],
    )
}

// SAFETY: see the module documentation: `ABI` is the canonical layout of
// exactly the record `typecheck` admits, and `Lower` its flat size.
unsafe impl ComponentType for Request<'_> {
    type Lower = [ValRaw; 23];

    const ABI: CanonicalAbiInfo = CanonicalAbiInfo::record_static(&FIELDS);

    const MAY_REQUIRE_REALLOC: bool = true;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> Result<()> {
        typecheck_record(
            ty,
            types,
            &[
                ("method", typecheck_method),
                ("path", <&str as ComponentType>::typecheck),
                ("authority", <&str as ComponentType>::typecheck),
                ("client", typecheck_client),
                ("hash-key", <Option<u64> as ComponentType>::typecheck),
                ("headers", <&[(&str, &str)] as ComponentType>::typecheck),
                ("attempt", <u32 as ComponentType>::typecheck),
                ("random", <u64 as ComponentType>::typecheck),
                ("id", <u64 as ComponentType>::typecheck),
            ],
        )
    }
}

// SAFETY: the flat lowering writes nothing and fails; the memory lowering
// writes the layout of `ABI` through bounds-checked slices, strings and the
// list through wasmtime's own impls with the field's own type.
unsafe impl Lower for Request<'_> {
    fn linear_lower_to_flat<T>(
        &self,
        _cx: &mut LowerContext<'_, T>,
        _ty: InterfaceType,
        _dst: &mut MaybeUninit<Self::Lower>,
    ) -> Result<()> {
        // 23 flat values: the canonical ABI always passes this record in
        // memory, so this is never called for it.
        Err(wasmtime::format_err!(
            "the request record is passed in memory, never flat"
        ))
    }

    fn linear_lower_to_memory<T>(
        &self,
        cx: &mut LowerContext<'_, T>,
        ty: InterfaceType,
        offset: usize,
    ) -> Result<()> {
        let InterfaceType::Record(record) = ty else {
            return Err(wasmtime::format_err!("the request is not a record"));
        };
        let [method, path, authority, client, hash_key, headers, attempt, random, id] = OFFSETS;
        let headers_ty = cx.types[record].fields[5].ty;
        // What may allocate in the guest (and so move its memory) first...
        if let Method::Other(text) = self.method {
            text.linear_lower_to_memory(
                cx,
                InterfaceType::String,
                offset + method + payload_offset(METHOD),
            )?;
        }
        self.path
            .linear_lower_to_memory(cx, InterfaceType::String, offset + path)?;
        self.authority
            .linear_lower_to_memory(cx, InterfaceType::String, offset + authority)?;
        self.headers
            .linear_lower_to_memory(cx, headers_ty, offset + headers)?;
        // ...then every other field through one borrow, leaving the
        // pointer/length pairs just written as they are.
        let bytes = cx.get::<SIZE>(offset);
        bytes[method] = self.method.discriminant();
        let payload = client + payload_offset(CLIENT);
        match self.client {
            IpAddress::V4(octets) => {
                bytes[client] = 0;
                bytes[payload..payload + 4].copy_from_slice(&octets);
            }
            IpAddress::V6(segments) => {
                bytes[client] = 1;
                for (i, segment) in segments.iter().enumerate() {
                    bytes[payload + 2 * i..payload + 2 * i + 2]
                        .copy_from_slice(&segment.to_le_bytes());
                }
            }
        }
        match self.hash_key {
            None => bytes[hash_key] = 0,
            Some(key) => {
                bytes[hash_key] = 1;
                let at = hash_key + payload_offset(HASH_KEY);
                bytes[at..at + 8].copy_from_slice(&key.to_le_bytes());
            }
        }
        bytes[attempt..attempt + 4].copy_from_slice(&self.attempt.to_le_bytes());
        bytes[random..random + 8].copy_from_slice(&self.random.to_le_bytes());
        bytes[id..id + 8].copy_from_slice(&self.id.to_le_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_wasmtime_s() {
        let mut offset = 0u32;
        let expected: Vec<usize> = FIELDS
            .iter()
            .map(|f| f.next_field32(&mut offset) as usize)
            .collect();
        assert_eq!(OFFSETS.to_vec(), expected);
        // The layout written out: method 0, path 12, authority 20,
        // client 28 (payload at 30), hash-key 48 (payload at 56), headers 64,
        // attempt 72, random 80, id 88; 96 bytes, 8-aligned.
        assert_eq!(OFFSETS, [0, 12, 20, 28, 48, 64, 72, 80, 88]);
        assert_eq!(SIZE, 96);
        assert_eq!(<Request<'_> as ComponentType>::ALIGN32, 8);
        assert_eq!(payload_offset(METHOD), 4);
        assert_eq!(payload_offset(CLIENT), 2);
        assert_eq!(payload_offset(HASH_KEY), 8);
    }
}
