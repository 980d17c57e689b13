#!/usr/bin/env bash
# Load benchmark: rust_load_balancer against NGINX and HAProxy on loopback.
#
# What: requests/s, median (p50) and p99 latency and errors of small GET
# requests through each balancer to three fast backends, with 64 and 256
# keep-alive client connections. Targets, in the order they are driven:
#   direct        wrk straight at one backend (the ceiling)
#   nginx-rr      NGINX round robin        nginx-lc     NGINX least_conn
#   haproxy-rr    HAProxy roundrobin       haproxy-lc   HAProxy leastconn
#   lb-rr         this balancer, round-robin (wasm module)
#   lb-lc         least-connections        lb-wrr       weighted-round-robin 3,2,1
#   lb-ch         consistent-hash on the client address   lb-pe   peak-ewma (0.2.0 modules)
#   lb-native-rr  native:round-robin (skipped, with a note, if this build rejects it)
#
# How: the release build (cargo build --release --locked); three backends are
# server blocks of one nginx process (1 worker) answering 200 "ok\n"; every
# target runs at once on its own free 127.0.0.1 port. Each measurement is
# `wrk -t1 -cN -dDs --latency`, preceded by a 1 s warm-up wrk run with the same
# connections (its output is kept but not counted). Rounds are interleaved:
# every round drives every target at every connection count, in the fixed
# order above, so slow drift of a shared machine spreads over all targets.
#
# Fairness: 2 workers/threads for every balancer (nginx worker_processes 2,
# haproxy nbthread 2, balancer worker_threads 2); the same backends and the
# same keep-alive to them (nginx keepalive 512, haproxy http-reuse always, the
# balancer's own pool); no access logging anywhere; one wrk thread for all.
# wrk, the backends and the balancer share the machine's cores, equally for
# every target. The table shows medians over rounds (errors summed) and
# ratios of req/s to nginx-rr and to direct at the same connection count.
#
#   benches/load/run.sh                        # 10 s x 3 rounds, about 10 minutes
#   benches/load/run.sh --duration 2 --rounds 1          # about 1 minute
#   benches/load/run.sh --only lb-rr,nginx-rr --connections "64 256"
#   benches/load/run.sh --backends 16 --only lb-rr,lb-native-rr --cpu-profile
#                                              # the strategy call's share of the CPU
#   benches/load/run.sh --help                 # every option
#
# Installs wrk, nginx and haproxy (and linux-perf for --cpu-profile) with
# apt-get only if a command is missing.
# Loopback only; every process is started by benches/load/run.py, which stops
# exactly those, by PID, on exit, Ctrl-C or SIGTERM. Results (table.md, raw wrk
# outputs, results.json) go to target/load-results/<UTC time>/ (or
# $RESULTS_DIR / --results-dir); configs and server logs go to a mktemp -d dir,
# removed at the end unless --keep.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
export PATH="$PATH:/usr/sbin:/sbin"

# The script as invoked, for the command line in the table's header.
export LOAD_BENCH_SCRIPT="$0"

# --help and bad options answer at once, before any install or build.
no_build=0
cpu_profile=0
for arg in "$@"; do
    case "$arg" in
        -h | --help) exec python3 "$here/run.py" --help ;;
        --no-build) no_build=1 ;;
        --cpu-profile) cpu_profile=1 ;;
    esac
done
python3 "$here/run.py" --parse-only "$@"

# 1. Tools, installed only if missing.
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v nginx >/dev/null || missing+=(nginx)
command -v python3 >/dev/null || missing+=(python3)
if [ "$cpu_profile" -eq 1 ] && ! command -v perf >/dev/null; then missing+=(linux-perf); fi
if [ "${#missing[@]}" -gt 0 ]; then
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    echo "load: installing ${missing[*]} with apt-get" >&2
    "${sudo[@]}" apt-get update
    pkgs=()
    for m in "${missing[@]}"; do
        if [ "$m" = nginx ] && apt-cache show nginx-light >/dev/null 2>&1; then
            pkgs+=(nginx-light)
        else
            pkgs+=("$m")
        fi
    done
    "${sudo[@]}" apt-get install -y "${pkgs[@]}"
fi

# 2. The balancer's release build.
if [ "$no_build" -eq 0 ]; then
    echo "load: cargo build --release --locked" >&2
    cargo build --release --locked
fi
target_dir="${CARGO_TARGET_DIR:-target}"
binary="$(cd "$target_dir" && pwd)/release/rust_load_balancer"
if [ ! -x "$binary" ]; then
    echo "load: no balancer binary at $binary" >&2
    exit 1
fi

# 3. Enough file descriptors for 256 client connections through every proxy.
hard="$(ulimit -Hn)"
if [ "$hard" = unlimited ] || [ "$hard" -gt 65536 ]; then
    ulimit -n 65536
else
    ulimit -n "$hard"
fi

# 4. Everything else (backends, targets, wrk, table) in run.py, which stops
# what it started when it ends or gets INT/TERM/HUP. It runs as a child of
# this script, started through the interpreter's real path (a version
# manager's shim could otherwise stand between its PID and ours); the trap
# passes a signal on to it and waits for its cleanup.
python="$(python3 -c 'import sys; print(sys.executable)')"
"$python" "$here/run.py" --binary "$binary" "$@" &
driver=$!
trap 'kill -TERM "$driver" 2>/dev/null || true' INT TERM HUP
status=0
wait "$driver" || status=$?
while kill -0 "$driver" 2>/dev/null; do
    wait "$driver" || status=$?
done
exit "$status"
