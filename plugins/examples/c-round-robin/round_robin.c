// Strategy module in C: exact round robin over the eligible backends.
//
// Answers positions 0, 1, 2, ... modulo the list length, one per call, so N
// sequential calls over k backends give each exactly N/k (the host calls one
// instance in request order). The same algorithm as the built-in Rust
// round-robin module, written against the C bindings that `wit-bindgen c`
// generates from wit/0.1.0/strategy.wit (strategy.h / strategy.c; see build.sh).
//
// No stdio, no clocks, no files: the only libc used is the allocator behind
// the bindings' cabi_realloc, so the module imports nothing.

#include <stdint.h>

#include "strategy.h"

// A 64-bit counter: its wrap, which would skew the rotation once, never comes
// in practice.
static uint64_t next;

bool exports_loadbalancer_strategy_selector_select(
    exports_loadbalancer_strategy_selector_list_backend_t *backends, uint32_t *ret) {
    size_t len = backends->len;
    // The canonical ABI hands the argument list to the callee, allocated with
    // cabi_realloc: free it, or memory grows with every call.
    exports_loadbalancer_strategy_selector_list_backend_free(backends);
    if (len == 0) {
        return false; // none: the host never asks with no backends, but be total
    }
    *ret = (uint32_t)(next % len);
    next++;
    return true;
}
