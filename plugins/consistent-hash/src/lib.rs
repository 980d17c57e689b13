//! Built-in strategy module: Maglev consistent hashing, weighted, with an
//! optional bound on each backend's load.
//!
//! Sources, with credit: D. E. Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016 (section 3.4, the lookup table
//! and its population, pseudocode listing 1); Envoy's Maglev load balancer
//! (`source/extensions/load_balancing_policies/maglev/maglev_lb.cc`), whose
//! hashing of the address (XXH64, seeds 0 and 1), order of entries (sorted by
//! address) and weighted fill this follows; V. Mirrokni, M. Thorup and
//! M. Zadimoghaddam, "Consistent Hashing with Bounded Loads", SODA 2018, for
//! `balance_factor`.
//!
//! `configure` builds the table over every configured backend; `select` looks
//! the request's key up in it and, when that backend is not eligible (or is
//! full), walks on through the table to the next one that is.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Maglev's recommended table size (the paper's section 5.3, Envoy's default).
pub const DEFAULT_TABLE_SIZE: u64 = 65537;
/// The largest `table_size` accepted, 2^17 - 1 (a prime): the fill costs
/// about M × ln(M) steps, a few milliseconds natively at this size, and
/// `configure` runs under the host's per-call fuel and deadline. At 100
/// entries per backend (the paper's M >= 100 N, for entries shared within
/// about 1 %) that serves some 1,300 backends.
pub const MAX_TABLE_SIZE: u64 = 131_071;
/// Table entries `select` looks at past the key's own before falling back to
/// `key % eligible`; with a fraction p of the table eligible, a key falls back
/// with probability (1 - p)^64: 1e-3 when only 1 backend in 10 is left.
pub const MAX_PROBES: usize = 64;

const OPTIONS: &[&str] = &["table_size", "balance_factor"];

/// A configured backend as `configure` describes it.
#[derive(Debug, Clone, Copy)]
pub struct BackendSpec<'a> {
    pub id: u32,
    /// What the table is keyed by, so that balancers with the same
    /// configuration build the same table.
    pub address: &'a str,
    pub weight: u32,
}

/// What `select` needs to know of an eligible backend.
pub trait Eligible {
    fn id(&self) -> u32;
    fn weight(&self) -> u32;
    fn in_flight(&self) -> u32;
}

/// The parsed `strategy_options`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    pub table_size: u64,
    /// c > 1: no backend takes more than ceil(c × its share of the load).
    pub balance_factor: Option<f64>,
}

impl Config {
    /// Reads and checks the options for `backends` configured backends.
    pub fn parse(options: &str, backends: usize) -> Result<Config, String> {
        let options = strategy_options::parse(options, OPTIONS)?;
        let table_size = options.u64("table_size")?.unwrap_or(DEFAULT_TABLE_SIZE);
        if table_size > MAX_TABLE_SIZE {
            return Err(format!(
                "option `table_size` must be at most {MAX_TABLE_SIZE}, not {table_size}"
            ));
        }
        if !is_prime(table_size) {
            let mut next = table_size.max(2);
            while !is_prime(next) {
                next += 1;
            }
            return Err(format!(
                "option `table_size` must be a prime number, not {table_size} (the next prime is {next})"
            ));
        }
        if table_size < backends as u64 {
            return Err(format!(
                "option `table_size` ({table_size}) must be at least the number of backends ({backends})"
            ));
        }
        let balance_factor = options.f64("balance_factor")?;
        if let Some(c) = balance_factor
            && c <= 1.0
        {
            return Err(format!(
                "option `balance_factor` must be greater than 1.0 (1.25 lets a backend take 25 % over its share), not {}",
                options.text("balance_factor").unwrap_or_default()
            ));
        }
        Ok(Config {
            table_size,
            balance_factor,
        })
    }
}

/// Trial division: `table_size` is at most about a million, so at most a
/// thousand divisions, once per `configure`.
pub fn is_prime(n: u64) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// XXH64 (Yann Collet's xxHash, 64-bit), as Envoy hashes backend addresses.
pub fn xxh64(input: &[u8], seed: u64) -> u64 {
    const P1: u64 = 0x9E37_79B1_85EB_CA87;
    const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    const P3: u64 = 0x1656_67B1_9E37_79F9;
    const P4: u64 = 0x85EB_CA77_C2B2_AE63;
    const P5: u64 = 0x27D4_EB2F_1656_67C5;
    fn round(acc: u64, lane: u64) -> u64 {
        acc.wrapping_add(lane.wrapping_mul(P2))
            .rotate_left(31)
            .wrapping_mul(P1)
    }
    fn merge(acc: u64, v: u64) -> u64 {
        (acc ^ round(0, v)).wrapping_mul(P1).wrapping_add(P4)
    }
    fn u64_at(b: &[u8]) -> u64 {
        u64::from_le_bytes(b[..8].try_into().unwrap())
    }

    let mut rest = input;
    let mut h = if input.len() >= 32 {
        let mut v = [
            seed.wrapping_add(P1).wrapping_add(P2),
            seed.wrapping_add(P2),
            seed,
            seed.wrapping_sub(P1),
        ];
        while rest.len() >= 32 {
            for (i, lane) in v.iter_mut().enumerate() {
                *lane = round(*lane, u64_at(&rest[i * 8..]));
            }
            rest = &rest[32..];
        }
        let h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        v.iter().fold(h, |h, &lane| merge(h, lane))
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(input.len() as u64);
    while rest.len() >= 8 {
        h ^= round(0, u64_at(rest));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        let word = u32::from_le_bytes(rest[..4].try_into().unwrap());
        h ^= u64::from(word).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = &rest[4..];
    }
    for &byte in rest {
        h ^= u64::from(byte).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

/// Fills `table` (M = `table_size` entries) with backend ids.
///
/// The paper's notation: each backend i has
///   offset_i = h1(name_i) mod M,  skip_i = h2(name_i) mod (M - 1) + 1,
///   permutation[i][j] = (offset_i + j × skip_i) mod M,
/// a permutation of 0..M because M is prime. Backends take turns claiming
/// their next preferred entry, permutation[i][next_i], skipping entries
/// already taken, until the table is full. Like Envoy, h1 and h2 are XXH64
/// with seeds 0 and 1 of the address, and backends take their turns in the
/// order of their addresses, so the table depends only on the set of
/// (address, weight), not on the order of the configuration.
///
/// Weights, as in Envoy's weighted fill: turns come in iterations 1, 2, …;
/// with W the largest weight, a backend of weight w takes a turn in
/// iteration t only if t × w >= target_i, and each turn raises target_i by W.
/// A backend of the largest weight takes a turn every iteration, one of
/// weight W / 3 every third, so entries are shared in proportion to weight.
/// A weight of 0 counts as 1.
///
/// Envoy visits every backend in every iteration, which costs about
/// M × W / (mean weight) visits: M for equal weights, but M × 1000 for one
/// backend of weight 1000 among many of weight 1. When W is more than
/// [`SCAN_LIMIT`] times the mean, a heap ordered by (iteration of the next
/// turn, position in address order) hands out the same turns in the same
/// order without visiting backends whose turn has not come. The heap's
/// unpredictable branches make it slower for the common case (measured:
/// 1.7 times the scan's time at 1000 equal backends), so the scan stays
/// for that.
pub fn build_table(backends: &[BackendSpec<'_>], table_size: u64, table: &mut Vec<u32>) {
    table.clear();
    if backends.is_empty() || table_size == 0 {
        return;
    }
    let mut order: Vec<&BackendSpec<'_>> = backends.iter().collect();
    heapsort(&mut order, |b| (b.address, b.weight, b.id));
    let mut fill = Fill::new(&order, table_size, table);
    let max_weight = fill.entries.iter().map(|e| e.weight).max().unwrap_or(1);
    let total_weight: u64 = fill.entries.iter().map(|e| e.weight).sum();
    if max_weight * fill.entries.len() as u64 <= SCAN_LIMIT * total_weight {
        fill.scan(max_weight);
    } else {
        fill.heap(max_weight);
    }
}

/// Sorts by `key`: a plain heapsort, because the standard library's sorts
/// are about 10 KB of wasm each and this sorts a thousand entries once per
/// `configure`.
fn heapsort<T, K: Ord>(v: &mut [T], key: impl Fn(&T) -> K) {
    let sift_down = |v: &mut [T], mut root: usize, end: usize| {
        loop {
            let mut child = 2 * root + 1;
            if child >= end {
                return;
            }
            if child + 1 < end && key(&v[child]) < key(&v[child + 1]) {
                child += 1;
            }
            if key(&v[root]) >= key(&v[child]) {
                return;
            }
            v.swap(root, child);
            root = child;
        }
    };
    for root in (0..v.len() / 2).rev() {
        sift_down(v, root, v.len());
    }
    for end in (1..v.len()).rev() {
        v.swap(0, end);
        sift_down(v, 0, end);
    }
}

/// See [`build_table`]: the largest weight, over the mean, up to which the
/// fill visits every backend in every iteration.
pub const SCAN_LIMIT: u64 = 8;

/// One backend's part in the fill.
struct Entry {
    id: u32,
    weight: u64,
    /// permutation[i][next_i], kept as a position rather than recomputed.
    position: u64,
    skip: u64,
    /// skip⁻¹ mod M, once needed (0 until then: skip is never 0 mod M).
    inverse: u64,
    /// Entries claimed so far: target_i is turns × W.
    turns: u64,
}

struct Fill<'t> {
    m: u64,
    entries: Vec<Entry>,
    /// Which entries are taken, one bit each: the probing touches this
    /// (8 KiB for M = 65537, in L1) instead of the table.
    taken: Vec<u64>,
    filled: u64,
    /// The last free entries, once at most `endgame` are left.
    free: Vec<u64>,
    endgame: u64,
    table: &'t mut Vec<u32>,
}

impl<'t> Fill<'t> {
    fn new(order: &[&BackendSpec<'_>], m: u64, table: &'t mut Vec<u32>) -> Self {
        table.resize(m as usize, u32::MAX);
        let entries = order
            .iter()
            .map(|b| Entry {
                id: b.id,
                weight: u64::from(b.weight.max(1)),
                position: xxh64(b.address.as_bytes(), 0) % m,
                skip: if m > 1 {
                    xxh64(b.address.as_bytes(), 1) % (m - 1) + 1
                } else {
                    1
                },
                inverse: 0,
                turns: 0,
            })
            .collect();
        Fill {
            m,
            entries,
            taken: vec![0; m.div_ceil(64) as usize],
            filled: 0,
            free: Vec::new(),
            // Where a turn's cost, F entries to weigh, meets the M / F
            // probes it would otherwise expect (a probe is several times
            // cheaper than weighing an entry).
            endgame: m.isqrt() / 2,
            table,
        }
    }

    /// Entry `i`'s turn: it claims its next preferred entry not yet taken.
    ///
    /// Probing permutation[i][next_i], permutation[i][next_i + 1], … costs
    /// M / F probes when F entries are free, which is most of the fill's
    /// work (M × H(M) probes in all, half of them in the last 1 %). So once
    /// few are free, the turn instead weighs each free entry f by how many
    /// steps the permutation takes to reach it, (f - position) × skip⁻¹
    /// mod M, and claims the nearest: the same entry the probing would find,
    /// as every entry the permutation passes before it is taken.
    fn turn(&mut self, i: usize) {
        let m = self.m;
        let entry = &mut self.entries[i];
        let c = if self.free.is_empty() {
            let mut c = entry.position;
            while self.taken[(c / 64) as usize] & (1 << (c % 64)) != 0 {
                c += entry.skip;
                if c >= m {
                    c -= m;
                }
            }
            self.taken[(c / 64) as usize] |= 1 << (c % 64);
            c
        } else {
            if entry.inverse == 0 {
                entry.inverse = inverse_mod(entry.skip, m);
            }
            let (position, inverse) = (entry.position, entry.inverse);
            let steps = |f: u64| {
                let distance = if f >= position {
                    f - position
                } else {
                    f + m - position
                };
                distance * inverse % m
            };
            let (nearest, _) = self
                .free
                .iter()
                .enumerate()
                .min_by_key(|&(_, &f)| steps(f))
                .expect("a turn comes only while entries are free");
            self.free.swap_remove(nearest)
        };
        self.table[c as usize] = entry.id;
        self.filled += 1;
        let next = c + entry.skip;
        entry.position = if next >= m { next - m } else { next };
        entry.turns += 1;
        if self.free.is_empty() && m - self.filled <= self.endgame && self.filled < m {
            self.free = (0..m)
                .filter(|&c| self.taken[(c / 64) as usize] & (1 << (c % 64)) == 0)
                .collect();
        }
    }

    /// Envoy's loop: every backend, every iteration, in address order.
    fn scan(&mut self, max_weight: u64) {
        let mut iteration = 1;
        while self.filled < self.m {
            for i in 0..self.entries.len() {
                if self.filled == self.m {
                    return;
                }
                let entry = &self.entries[i];
                if iteration * entry.weight >= entry.turns * max_weight {
                    self.turn(i);
                }
            }
            iteration += 1;
        }
    }

    /// The same turns in the same order, from a heap of
    /// (iteration of the next turn, position in address order).
    fn heap(&mut self, max_weight: u64) {
        let mut turns: BinaryHeap<Reverse<(u64, usize)>> =
            (0..self.entries.len()).map(|i| Reverse((1, i))).collect();
        while self.filled < self.m {
            let mut top = turns.peek_mut().expect("every backend keeps a turn");
            let Reverse((iteration, i)) = *top;
            self.turn(i);
            let entry = &self.entries[i];
            // The first iteration after this one with iteration × w >= target_i.
            let next = (entry.turns * max_weight)
                .div_ceil(entry.weight)
                .max(iteration + 1);
            *top = Reverse((next, i));
        }
    }
}

/// x⁻¹ mod m for a prime m and 0 < x < m (extended Euclid).
fn inverse_mod(x: u64, m: u64) -> u64 {
    let (mut r0, mut r1) = (m as i64, x as i64);
    let (mut t0, mut t1) = (0i64, 1i64);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (t0, t1) = (t1, t0 - q * t1);
    }
    t0.rem_euclid(m as i64) as u64
}

/// The module's state: the table, and the reusable id -> position array.
#[derive(Debug)]
pub struct Maglev {
    config: Config,
    table: Vec<u32>,
    /// Per id, where it stood in the eligible list when last seen: a hint,
    /// checked against the list before use (see [`Maglev::select`]), so the
    /// array is never cleared and needs no stamp.
    positions: Vec<u32>,
}

impl Default for Maglev {
    fn default() -> Self {
        Self::new()
    }
}

impl Maglev {
    pub const fn new() -> Self {
        Self {
            config: Config {
                table_size: DEFAULT_TABLE_SIZE,
                balance_factor: None,
            },
            table: Vec::new(),
            positions: Vec::new(),
        }
    }

    /// Reads the options and builds the table over all of `backends`. On an
    /// error the previous table and options stay.
    pub fn configure(&mut self, options: &str, backends: &[BackendSpec<'_>]) -> Result<(), String> {
        let config = Config::parse(options, backends.len())?;
        build_table(backends, config.table_size, &mut self.table);
        self.config = config;
        let ids = backends
            .iter()
            .map(|b| b.id as usize + 1)
            .max()
            .unwrap_or(0);
        if ids > self.positions.len() {
            self.positions.resize(ids, u32::MAX);
        }
        Ok(())
    }

    /// The table entry at `index`: a backend id.
    pub fn table(&self) -> &[u32] {
        &self.table
    }

    /// Records every eligible backend's position: one pass over the list.
    fn mark<B: Eligible>(&mut self, backends: &[B]) {
        for (position, backend) in backends.iter().enumerate() {
            let id = backend.id() as usize;
            if id >= self.positions.len() {
                // Only for an id configure did not announce.
                self.positions.resize(id + 1, u32::MAX);
            }
            self.positions[id] = position as u32;
        }
    }

    /// Where `id` stands in `backends`, if it is there. The hint is right
    /// when the list holds `id` at that position, which settles it; once
    /// this call has marked the list, every present id's hint is fresh, so
    /// a miss means absent. Until then, a miss marks the list (at most once
    /// per call) and looks again. So while the eligible list stays as it
    /// was, a call costs no pass over it.
    fn position<B: Eligible>(
        &mut self,
        id: u32,
        backends: &[B],
        marked: &mut bool,
    ) -> Option<usize> {
        loop {
            if let Some(&hint) = self.positions.get(id as usize) {
                let hint = hint as usize;
                if hint < backends.len() && backends[hint].id() == id {
                    return Some(hint);
                }
            }
            if *marked {
                return None;
            }
            self.mark(backends);
            *marked = true;
        }
    }

    /// The position in `backends` (eligible, never empty) for `key`.
    ///
    /// `table[key % M]`'s backend if it is eligible (and not full); otherwise
    /// the next entries' backends, up to [`MAX_PROBES`] entries; otherwise the
    /// first eligible one (not full) from `key % len` on. So a key whose
    /// backend is eligible never moves when others come and go, and a
    /// departed backend's keys go to the backends after its entries, which
    /// the fill scattered over all of them in proportion to weight.
    ///
    /// With `balance_factor` c, a backend is full when its in-flight count
    /// is at least ceil(c × (total in flight + 1) × weight / total weight)
    /// over the eligible list (the + 1 being this request). As c > 1, the
    /// capacities add up to more than the requests in flight, so some
    /// backend always has room.
    pub fn select<B: Eligible>(&mut self, key: u64, backends: &[B]) -> Option<u32> {
        let len = backends.len();
        if len == 0 {
            return None;
        }
        // The totals for bounded load need a pass anyway: mark in it.
        let mut marked = false;
        let (mut in_flight, mut weight) = (0u64, 0u64);
        if self.config.balance_factor.is_some() {
            self.mark(backends);
            marked = true;
            for backend in backends {
                in_flight += u64::from(backend.in_flight());
                weight += u64::from(backend.weight().max(1));
            }
        }
        let balance_factor = self.config.balance_factor;
        let has_room = |backend: &B| match balance_factor {
            None => true,
            Some(c) => {
                let share = u64::from(backend.weight().max(1)) as f64 / weight as f64;
                let capacity = (c * (in_flight + 1) as f64 * share).ceil();
                f64::from(backend.in_flight()) < capacity
            }
        };

        let m = self.table.len();
        if m > 0 {
            let mut index = (key % m as u64) as usize;
            for _ in 0..MAX_PROBES.min(m) {
                let id = self.table[index];
                if let Some(position) = self.position(id, backends, &mut marked)
                    && has_room(&backends[position])
                {
                    return u32::try_from(position).ok();
                }
                index += 1;
                if index == m {
                    index = 0;
                }
            }
        }
        let start = (key % len as u64) as usize;
        let position = (0..len)
            .map(|i| (start + i) % len)
            .find(|&p| has_room(&backends[p]))
            .unwrap_or(start);
        u32::try_from(position).ok()
    }
}

#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({ path: "../../wit/0.2.0", world: "strategy" });

    use exports::loadbalancer::strategy::selector::Guest;
    use loadbalancer::strategy::types::{Backend, BackendInfo, Request};
    use std::sync::Mutex;

    // One instance serves calls one at a time; the Mutex only makes the static safe.
    static STATE: Mutex<super::Maglev> = Mutex::new(super::Maglev::new());

    impl super::Eligible for Backend {
        fn id(&self) -> u32 {
            self.id
        }
        fn weight(&self) -> u32 {
            self.weight
        }
        fn in_flight(&self) -> u32 {
            self.in_flight
        }
    }

    struct Component;

    impl Guest for Component {
        fn configure(options: String, backends: Vec<BackendInfo>) -> Result<(), String> {
            let specs: Vec<super::BackendSpec<'_>> = backends
                .iter()
                .map(|b| super::BackendSpec {
                    id: b.id,
                    address: &b.address,
                    weight: b.weight,
                })
                .collect();
            STATE.lock().unwrap().configure(&options, &specs)
        }

        fn select(request: Request, backends: Vec<Backend>) -> Option<u32> {
            let key = request.hash_key.unwrap_or(request.random);
            STATE.lock().unwrap().select(key, &backends)
        }
    }

    export!(Component);
}

#[cfg(test)]
mod tests;
