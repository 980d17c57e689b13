#!/usr/bin/env bash
# Soak test of the release binary: steady load on loopback while backends are
# killed and restarted and the strategy is reloaded (including modules that
# trap or loop). Prints requests, failures, faults handled, and the
# balancer's RSS and open descriptors at start and end; exits 1 if any
# request failed.
#
#   benches/soak.sh                 # 10 minutes
#   benches/soak.sh --seconds 60    # shorter; also --clients N, --warmup S (default 60)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --locked --quiet
target="${CARGO_TARGET_DIR:-target}"
exec python3 benches/soak.py --binary "$target/release/rust_load_balancer" "$@"
