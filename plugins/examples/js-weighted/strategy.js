// Strategy module in JavaScript: smooth weighted round robin (nginx's algorithm).
//
// Each pick, every eligible backend's `current` grows by its weight; the one
// with the largest `current` wins (the first in the list on ties) and gives
// back the total weight. Over any run of sum(weights) picks each backend gets
// exactly its weight's share, and picks are spread out rather than bunched:
// weights 5,1,1 give a a b a c a a.
//
// State is keyed by backend `id` (its place in the configured list), not by
// position in this call's list, because the host passes only the eligible
// backends: when one goes unhealthy the others keep their counters. A backend
// that is away keeps its counter for when it comes back, as nginx does.
//
// Implements `loadbalancer:strategy/selector@0.1.0` (wit/strategy.wit): the
// interface becomes the exported `selector` object, record fields arrive
// camelCased, and `undefined` is `none`.

/** current[id]: the running counter of the backend with that id. */
const current = [];

/**
 * @param {{id: number, weight: number, activeConnections: number, latencyMicros: number}[]} backends
 * @returns {number | undefined} the chosen position in `backends`, or none for an empty list
 */
function select(backends) {
  const count = backends.length;
  if (count === 0) return undefined;
  let total = 0;
  let best = 0;
  let bestCurrent = -Infinity;
  for (let i = 0; i < count; i++) {
    const backend = backends[i];
    const id = backend.id;
    const weight = backend.weight;
    // Ids are small (positions in the configured list): grow densely so the
    // array stays a packed array rather than a sparse dictionary.
    while (current.length <= id) current.push(0);
    const value = current[id] + weight;
    current[id] = value;
    total += weight;
    if (value > bestCurrent) {
      bestCurrent = value;
      best = i;
    }
  }
  current[backends[best].id] = bestCurrent - total;
  return best;
}

export const selector = { select };
