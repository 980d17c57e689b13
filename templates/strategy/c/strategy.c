// {{name}}: a strategy module for rust_load_balancer, in C, written against
// the contract loadbalancer:strategy@0.2.0 (wit/strategy.wit, the reference).
// build.sh generates the bindings (build/observing_strategy.h and .c) with
// `wit-bindgen c` and compiles this file with them for wasm32-wasi.
//
// The starter algorithm, to change into yours:
// - a request with a hash key (the config's `hash_key`, e.g.
//   "cookie:session") sticks to one backend, chosen by rendezvous hashing:
//   while that backend is eligible the key stays on it, and when it leaves
//   only its keys move;
// - a request without one goes to the backend with the fewest requests in
//   flight (ties broken at random);
// - a backend whose last `max_failures` attempts failed (no response, or a
//   5xx) is skipped for the next COOLDOWN requests, then tried again.
//
// Memory: the canonical ABI hands every argument that lives in memory (the
// options string, the lists, the request's strings) to the callee, allocated
// with the bindings' cabi_realloc. Free each with its generated *_free
// function, or memory grows with every call until the host's cap faults the
// module. A string you return (configure's error) is yours to allocate with
// observing_strategy_string_dup; the bindings free it after the host read it.
//
// No stdio, no clocks, no files: the host grants none, and a libc function
// that needs them would import WASI, which build.sh refuses. That includes
// all of stdio, even snprintf (it links stdio's flush at exit, which writes
// to files): the small `line_t` helpers below format text instead. String
// functions (string.h), strtoul and malloc are fine.

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "observing_strategy.h"

#define DEFAULT_MAX_FAILURES 3
// How many `select` calls a failing backend sits out. (A module has no
// clock: the host grants none, so time is counted in requests.)
#define COOLDOWN 100

// What the module remembers of one backend, by id.
typedef struct {
    uint32_t failures;      // failed attempts in a row; a success resets it
    uint64_t benched_until; // skipped up to and including this `select` call
} health_t;

// The host keeps one instance and calls it one call at a time, in request
// order, so state in statics works. After a fault (a trap, running out of
// fuel or time, memory over the cap, a position out of range) the host starts
// a fresh instance: the statics start over, and `configure` runs again.
static uint32_t max_failures = DEFAULT_MAX_FAILURES;
static uint64_t calls; // `select` calls so far: the module's clock
// By backend id. Ids are small (positions in the configured list; addresses
// found through DNS get higher ones), so an array grown on demand does.
static health_t *health;
static size_t health_len;

// A line of text being built; what does not fit is cut.
typedef struct {
    char text[256];
    size_t len;
} line_t;

static void put_n(line_t *line, const char *s, size_t n) {
    size_t room = sizeof line->text - line->len;
    n = n < room ? n : room;
    memcpy(line->text + line->len, s, n);
    line->len += n;
}

static void put(line_t *line, const char *s) { put_n(line, s, strlen(s)); }

static void put_u64(line_t *line, uint64_t value) {
    char digits[20];
    size_t n = 0;
    do {
        digits[sizeof digits - ++n] = (char)('0' + value % 10);
        value /= 10;
    } while (value != 0);
    put_n(line, digits + sizeof digits - n, n);
}

// Writes a line to the balancer's log (target `strategy`, with the module's
// name). The host keeps at most 10 lines a second per module and drops the
// rest: log events, never one line per request.
static void log_line(loadbalancer_strategy_logging_level_t level, const line_t *line) {
    observing_strategy_string_t message = {(uint8_t *)line->text, line->len}; // borrowed: nothing to free
    loadbalancer_strategy_logging_log(level, &message);
}

static health_t *health_of(uint32_t id, bool grow) {
    if (id >= health_len) {
        if (!grow) {
            return NULL;
        }
        size_t len = (size_t)id + 1;
        health_t *grown = realloc(health, len * sizeof *grown);
        if (grown == NULL) {
            return NULL;
        }
        memset(grown + health_len, 0, (len - health_len) * sizeof *grown);
        health = grown;
        health_len = len;
    }
    return &health[id];
}

// --- Options ----------------------------------------------------------------
// `strategy_options` arrives as JSON text. This reads the flat object this
// starter needs ({"max_failures": 3}), no more: string values with escapes,
// nested values and floats are refused. For richer options use a real JSON
// parser (a single-file C library compiles here too).

static const char *skip_space(const char *p) {
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') {
        p++;
    }
    return p;
}

// Fills `err` and returns false when the options are refused.
static bool parse_options(const char *p, uint32_t *max, observing_strategy_string_t *err) {
    p = skip_space(p);
    if (*p++ != '{') {
        observing_strategy_string_dup(err, "strategy_options must be a JSON object");
        return false;
    }
    p = skip_space(p);
    if (*p == '}') {
        return true;
    }
    for (;;) {
        const char *key = p + 1;
        const char *end = *p == '"' ? strchr(key, '"') : NULL;
        if (end == NULL) {
            observing_strategy_string_dup(err, "strategy_options: expected a key in double quotes");
            return false;
        }
        size_t key_len = (size_t)(end - key);
        p = skip_space(end + 1);
        if (*p++ != ':') {
            observing_strategy_string_dup(err, "strategy_options: expected `:` after a key");
            return false;
        }
        p = skip_space(p);
        if (key_len == 12 && strncmp(key, "max_failures", 12) == 0) {
            char *after;
            unsigned long value = strtoul(p, &after, 10);
            if (after == p || *p == '-' || value < 1 || value > 1000 || *after == '.' || *after == 'e' || *after == 'E') {
                observing_strategy_string_dup(err, "option `max_failures` must be an integer from 1 to 1000");
                return false;
            }
            *max = (uint32_t)value;
            p = skip_space(after);
        } else {
            line_t message = {.len = 0};
            put(&message, "unknown option `");
            put_n(&message, key, key_len);
            put(&message, "`; known: max_failures");
            observing_strategy_string_dup_n(err, message.text, message.len);
            return false;
        }
        if (*p == ',') {
            p = skip_space(p + 1);
            continue;
        }
        if (*p == '}') {
            return true;
        }
        observing_strategy_string_dup(err, "strategy_options: expected `,` or `}`");
        return false;
    }
}

// --- The exports --------------------------------------------------------------

// Runs on every fresh instance before its first `select`, and again when the
// configured backends change (`backends` lists them all, with address,
// weight and labels). Returning false with `err` set refuses the module: at
// start-up or reload the operator sees the message, so name the key at fault.
bool exports_loadbalancer_strategy_selector_configure(
    observing_strategy_string_t *options,
    exports_loadbalancer_strategy_selector_list_backend_info_t *backends,
    observing_strategy_string_t *err) {
    // The options are not NUL-terminated: copy them into a C string.
    char *text = malloc(options->len + 1);
    size_t count = backends->len;
    bool ok = text != NULL;
    uint32_t max = DEFAULT_MAX_FAILURES;
    if (ok) {
        memcpy(text, options->ptr, options->len);
        text[options->len] = '\0';
        ok = parse_options(text, &max, err);
    } else {
        observing_strategy_string_dup(err, "out of memory");
    }
    free(text);
    observing_strategy_string_free(options);
    exports_loadbalancer_strategy_selector_list_backend_info_free(backends);
    if (ok) {
        max_failures = max;
        line_t line = {.len = 0};
        put(&line, "configured: ");
        put_u64(&line, count);
        put(&line, " backends, max_failures ");
        put_u64(&line, max_failures);
        log_line(LOADBALANCER_STRATEGY_LOGGING_LEVEL_INFO, &line);
    }
    return ok;
}

// SplitMix64's finalizer: a cheap, well-mixed 64-bit hash.
static uint64_t rendezvous(uint64_t key, uint32_t id) {
    uint64_t z = key ^ ((uint64_t)id * 0x9E3779B97F4A7C15u);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9u;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBu;
    return z ^ (z >> 31);
}

static bool benched(uint32_t id) {
    health_t *h = health_of(id, false);
    return h != NULL && h->benched_until >= calls;
}

// Picks one of `backends`: the eligible ones, in configured order, never
// empty. The answer, in *ret, is a POSITION in this list (0 .. len-1), not an
// `id` (ids are for keeping state); return false to refuse the request (the
// client gets a 503). A position out of range is a fault.
//
// `request->attempt` is 0 for the first try and n for the n-th retry, whose
// list already leaves out the backends tried for this request: a key falls
// to its next-best backend by itself. `request->random` is a fresh random
// number per call (the module has no other source of randomness).
// `request->hash_key` is the XXH3-64 of the value the config's `hash_key`
// names, when `is_some`.
bool exports_loadbalancer_strategy_selector_select(
    exports_loadbalancer_strategy_selector_request_t *request,
    exports_loadbalancer_strategy_selector_list_backend_t *backends,
    uint32_t *ret) {
    calls++;
    const exports_loadbalancer_strategy_selector_backend_t *b = backends->ptr;
    size_t len = backends->len;
    // The host already left out the unhealthy backends; if this module's own
    // bookkeeping would skip every one left, it skips none.
    bool skip_none = true;
    for (size_t i = 0; i < len; i++) {
        skip_none = skip_none && benched(b[i].id);
    }

    bool found = false;
    size_t best = 0;
    if (request->hash_key.is_some) {
        // Rendezvous hashing: the usable backend with the highest score wins.
        uint64_t best_score = 0;
        for (size_t i = 0; i < len; i++) {
            if (!skip_none && benched(b[i].id)) {
                continue;
            }
            uint64_t score = rendezvous(request->hash_key.val, b[i].id);
            if (!found || score > best_score) {
                found = true;
                best = i;
                best_score = score;
            }
        }
    } else if (len > 0) {
        // Least in flight; the scan starts at a random position so that ties
        // go to a random backend rather than always the first.
        size_t start = (size_t)(request->random % len);
        for (size_t k = 0; k < len; k++) {
            size_t i = (start + k) % len;
            if (!skip_none && benched(b[i].id)) {
                continue;
            }
            if (!found || b[i].in_flight < b[best].in_flight) {
                found = true;
                best = i;
            }
        }
    }

    exports_loadbalancer_strategy_selector_request_free(request);
    exports_loadbalancer_strategy_selector_list_backend_free(backends);
    *ret = (uint32_t)best;
    return found;
}

// Called once per attempt, after its response head arrived or it failed, in
// order with `select` calls.
void exports_loadbalancer_strategy_observer_observe(exports_loadbalancer_strategy_observer_outcome_t *outcome) {
    uint32_t id = outcome->backend_id;
    // No status is no response: a connect, timeout or I/O failure.
    bool failed = outcome->failure.is_some || !outcome->status.is_some || outcome->status.val >= 500;
    exports_loadbalancer_strategy_observer_outcome_free(outcome); // nothing in memory today; free anyway
    health_t *h = health_of(id, true);
    if (h == NULL) {
        return;
    }
    if (!failed) {
        h->failures = 0;
        return;
    }
    if (h->failures < UINT32_MAX) {
        h->failures++;
    }
    // Benched on reaching the limit, and again after each further failure (a
    // benched backend that fails its first try after the cooldown sits out
    // another one).
    if (h->failures >= max_failures) {
        h->benched_until = calls + COOLDOWN;
        line_t line = {.len = 0};
        put(&line, "backend ");
        put_u64(&line, id);
        put(&line, ": ");
        put_u64(&line, h->failures);
        put(&line, " failures in a row, skipped for ");
        put_u64(&line, COOLDOWN);
        put(&line, " requests");
        log_line(LOADBALANCER_STRATEGY_LOGGING_LEVEL_WARN, &line);
    }
}
