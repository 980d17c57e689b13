#!/usr/bin/env bash
# Runs each fuzz target for a bounded time (default 600 s each, the two in
# parallel), starting from the seeds in fuzz/seeds/. Needs cargo-fuzz
# (installed if missing). cargo fuzz wants a nightly compiler for its
# sanitizer flags; RUSTC_BOOTSTRAP lets this machine's stable one accept
# them. Crashes land in fuzz/artifacts/<target>/; reproduce one with
#   cargo fuzz run <target> fuzz/artifacts/<target>/<file>
# and add it as a regression test.
set -euo pipefail
SECONDS_EACH="${1:-600}"
cd "$(dirname "${BASH_SOURCE[0]}")"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
targets=(config headers)
for target in "${targets[@]}"; do
    cargo fuzz build -O "$target"
done
pids=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    cargo fuzz run -O "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -timeout=10 \
        > "fuzz-$target.log" 2>&1 &
    pids+=($!)
done
status=0
for i in "${!targets[@]}"; do
    if wait "${pids[$i]}"; then
        echo "fuzz ${targets[$i]}: no crash in ${SECONDS_EACH}s: $(grep -E '^Done|stat::number_of_executed_units' "fuzz-${targets[$i]}.log" | tail -1)"
    else
        echo "fuzz ${targets[$i]}: FAILED, see fuzz/fuzz-${targets[$i]}.log and fuzz/artifacts/${targets[$i]}/"
        status=1
    fi
done
exit "$status"
