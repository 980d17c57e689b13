// {{name}}: a strategy module for rust_load_balancer, in JavaScript, written
// against the contract loadbalancer:strategy@0.2.0 (wit/strategy.wit, the
// reference) and built into a WebAssembly component by componentize-qjs
// (the QuickJS engine; see build.sh).
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
// How the contract looks from JavaScript (componentize-qjs):
// - The module exports one object per exported interface, named in
//   camelCase: `selector` (configure, select) and `observer` (observe).
// - Imports are ES modules named by interface: `logging.log(level, message)`
//   with level "debug" | "info" | "warn" | "error" (an enum is its case
//   name as a string).
// - Records are objects with camelCase keys (`inFlight`, `hashKey`,
//   `backendId`); `option<T>` is the value or null; a variant is
//   `{tag, val}` (`request.method` is {tag: "get"} or {tag: "other", val:
//   "PURGE"}; `request.client` is {tag: "ipv4", val: [127, 0, 0, 1]}).
// - u64 values (`hashKey`, `random`, `id`) arrive as Numbers: exact below
//   2^53, rounded above. Fine for hashing and picking; do not expect
//   `hashKey` to equal an XXH3 you compute in full 64-bit precision.
// - `configure`'s result<_, string>: return normally for ok; throw for err
//   (a thrown string is the message, a thrown Error its `message`).
// - `select`'s option<u32>: a number, or null (or undefined) for none.
//
// This file's top level runs once, at build time (the engine's state is
// snapshotted into the module): it may set up data, but must not call
// imports, `console.log` included. Everything else runs per call.
//
// No clock, files or network: the host grants none. `Date.now()` inside a
// call traps (a fault), and `Math.random()` repeats the same sequence in
// every fresh instance: use `request.random`.

import logging from "loadbalancer:strategy/logging@0.2.0";

// --- console, and errors that escape an export ---------------------------------
// The engine has no console of its own, and the module no stdout: these send
// console.log/info/debug/warn/error to the balancer's log through the
// imported logging.log. The host keeps at most 10 lines a second per module
// and drops the rest: log events, never one line per request.

function text(value) {
  if (typeof value === "string") return value;
  if (value instanceof Error) return describe(value);
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return String(value);
  }
}

function describe(error) {
  // QuickJS's stack reads "    at select (strategy.js:123:45)" per frame;
  // the host turns the line breaks into spaces.
  return error instanceof Error && error.stack ? `${error}\n${error.stack}` : String(error);
}

const logAt = (level) => (...values) => logging.log(level, values.map(text).join(" "));
globalThis.console = {
  log: logAt("info"),
  info: logAt("info"),
  debug: logAt("debug"),
  warn: logAt("warn"),
  error: logAt("error"),
};

// Wraps an export so that an exception escaping it is logged, with its stack,
// before the call fails. Without this the host sees only a bare `unreachable`
// trap. (A thrown string from `configure` is its refusal, not a bug: it
// becomes the error the operator sees, and is not logged twice.)
function guarded(name, fn) {
  return (...args) => {
    try {
      return fn(...args);
    } catch (error) {
      if (!(name === "configure" && typeof error === "string")) {
        logging.log("error", `uncaught in ${name}: ${describe(error)}`);
      }
      throw error;
    }
  };
}

// --- The strategy --------------------------------------------------------------

const DEFAULT_MAX_FAILURES = 3;
// How many `select` calls a failing backend sits out. (A module has no
// clock: the host grants none, so time is counted in requests.)
const COOLDOWN = 100;

let maxFailures = DEFAULT_MAX_FAILURES;
// `select` calls so far: the module's clock.
let calls = 0;
// By backend id (stable while the config is in service; positions in the
// configured list, higher for addresses found through DNS): failed attempts
// in a row, and the last `select` call the backend sits out.
const failures = [];
const benchedUntil = [];

/**
 * Runs on every fresh instance before its first `select`, and again when the
 * configured backends change. `options` is the JSON text of the config's
 * `strategy_options` ("{}" when absent). Throwing refuses the module: at
 * start-up or reload the operator sees the message, so name the key at fault.
 *
 * @param {string} options
 * @param {{id: number, address: string, weight: number, labels: [string, string][]}[]} backends
 */
function configure(options, backends) {
  let parsed;
  try {
    parsed = JSON.parse(options);
  } catch (error) {
    throw `strategy_options is not valid JSON: ${error.message}`;
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
    throw "strategy_options must be a JSON object";
  }
  let max = DEFAULT_MAX_FAILURES;
  for (const [key, value] of Object.entries(parsed)) {
    switch (key) {
      case "max_failures":
        if (!Number.isInteger(value) || value < 1 || value > 1000) {
          throw `option \`max_failures\` must be an integer from 1 to 1000, not ${JSON.stringify(value)}`;
        }
        max = value;
        break;
      default:
        throw `unknown option \`${key}\`; known: max_failures`;
    }
  }
  maxFailures = max;
  console.log(`configured: ${backends.length} backends, max_failures ${maxFailures}`);
}

/**
 * Picks one of `backends`: the eligible ones, in configured order, never
 * empty. Returns a POSITION in this list (0 .. length-1), not an `id` (ids
 * are for keeping state), or null to refuse the request (the client gets a
 * 503). A position out of range is a fault.
 *
 * `request.attempt` is 0 for the first try and n for the n-th retry, whose
 * list already leaves out the backends tried for this request: a key falls
 * to its next-best backend by itself. `request.random` is a fresh random
 * number per call.
 *
 * @param {{hashKey: number | null, random: number, attempt: number}} request
 * @param {{id: number, weight: number, inFlight: number, latencyMicros: number}[]} backends
 * @returns {number | null}
 */
function select(request, backends) {
  calls++;
  const len = backends.length;
  // The host already left out the unhealthy backends; if this module's own
  // bookkeeping would skip every one left, it skips none.
  const benched = (b) => (benchedUntil[b.id] ?? 0) >= calls;
  const skipNone = backends.every(benched);
  const usable = (b) => skipNone || !benched(b);

  let best = null;
  if (request.hashKey !== null) {
    // Rendezvous hashing: the usable backend with the highest score wins.
    let bestScore = -1;
    for (let i = 0; i < len; i++) {
      if (!usable(backends[i])) continue;
      const score = rendezvous(request.hashKey, backends[i].id);
      if (score > bestScore) {
        bestScore = score;
        best = i;
      }
    }
  } else {
    // Least in flight; the scan starts at a random position so that ties
    // go to a random backend rather than always the first.
    const start = request.random % len;
    for (let k = 0; k < len; k++) {
      const i = (start + k) % len;
      if (usable(backends[i]) && (best === null || backends[i].inFlight < backends[best].inFlight)) {
        best = i;
      }
    }
  }
  return best;
}

/**
 * Called once per attempt, after its response head arrived or it failed, in
 * order with `select` calls.
 *
 * @param {{backendId: number, status: number | null, failure: "connect" | "timeout" | "io" | null}} outcome
 */
function observe(outcome) {
  const id = outcome.backendId;
  // No status is no response: a connect, timeout or I/O failure.
  const failed = outcome.failure !== null || outcome.status === null || outcome.status >= 500;
  if (!failed) {
    failures[id] = 0;
    return;
  }
  failures[id] = (failures[id] ?? 0) + 1;
  // Benched on reaching the limit, and again after each further failure (a
  // benched backend that fails its first try after the cooldown sits out
  // another one).
  if (failures[id] >= maxFailures) {
    benchedUntil[id] = calls + COOLDOWN;
    console.warn(`backend ${id}: ${failures[id]} failures in a row, skipped for ${COOLDOWN} requests`);
  }
}

/** A pseudo-random 32-bit score for (key, backend id). */
function rendezvous(key, id) {
  // The key is a Number up to 2^64: split it into two 32-bit halves (both
  // operations are exact on a double) and mix them with the id.
  const low = key % 4294967296;
  const high = Math.floor(key / 4294967296);
  return mix(low ^ mix(high ^ mix(id + 0x9e3779b9)));
}

/** MurmurHash3's 32-bit finalizer. */
function mix(h) {
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

export const selector = {
  configure: guarded("configure", configure),
  select: guarded("select", select),
};
export const observer = { observe: guarded("observe", observe) };
