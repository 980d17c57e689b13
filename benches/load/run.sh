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
# every target. Odd rounds drive the targets in one order, even rounds in
# the reverse (a target's place in a round biases it: run an even number of
# rounds to compare). The table shows medians over rounds (errors summed)
# and ratios of req/s to nginx-rr and to direct at the same connection count.
#
#   benches/load/run.sh                        # 10 s x 3 rounds, about 10 minutes
#   benches/load/run.sh --duration 2 --rounds 1          # about 1 minute
#   benches/load/run.sh --only lb-rr,nginx-rr --connections "64 256"
#   benches/load/run.sh --only lb-rr,nginx-rr --baseline /tmp/lb-before/rust_load_balancer
#                       # a change's before (lb-rr-baseline) and after in the same rounds
#   benches/load/run.sh --only lb-rr,nginx-rr --new-connections --connections 64
#                       # Connection: close, a new client connection per request
#   benches/load/run.sh --backends 16 --only lb-rr,lb-native-rr --cpu-profile
#                                              # the strategy call's share of the CPU
#   benches/load/run.sh --help                 # every option
#
# TLS mode (--tls): the same backends (plain HTTP), but every balancer
# terminates HTTPS. Targets (default): nginx-rr, haproxy-rr, lb-rr (--only
# takes any target but direct). One ECDSA P-256 self-signed certificate for
# CN/SAN localhost and IP 127.0.0.1 is made with openssl in the working dir
# and served by all three (HAProxy gets cert and key in one file; it is
# skipped, with a note, if `haproxy -vv` shows no OpenSSL). The balancer's
# config is the plain one plus `tls_listen_address` and `tls_certificates`
# (paths relative to the config). Measured in the same interleaved rounds:
#   keep-alive  wrk over https://localhost:T/ (a valid SNI; wrk sends the
#               URL host) at --connections (64 and 256): req/s, p50/p99,
#               errors;
#   new-conn    wrk -H "Connection: close" at --handshake-connections (64):
#               every request a new TCP and TLS connection, so req/s is the
#               new-TLS-connection rate;
#   and for both, the balancer's CPU time per request: utime+stime of its
#   whole process tree (nginx: master and workers) from /proc just before
#   and after the measured run, divided by the requests wrk completed, and
#   the per-round ratio of that to nginx-rr's.
# TLS fairness: the same certificate and key everywhere; TLS 1.2 and 1.3
# enabled in all three (nginx `ssl_protocols TLSv1.2 TLSv1.3`, HAProxy's
# default since 2.2, rustls's default); cipher suites, key exchange groups,
# session tickets and session caches left at each server's defaults (nginx
# and HAProxy on the system OpenSSL, the balancer on rustls), and no ALPN
# (wrk sends none): the table lists what each one negotiated with wrk's
# OpenSSL (protocol, cipher, group, signature), whether TLS 1.2 alone is
# accepted, and whether a session is resumed from a ticket. wrk keeps the
# session of its last connection when it reconnects (SSL_clear), so in the
# new-conn test it offers a resumption each time: a server that takes it
# does a PSK (+ECDHE in TLS 1.3) handshake without a certificate signature,
# one that does not a full handshake; the `resumes` column says which, and
# the rate and CPU per handshake are what each server's defaults give such
# a client. Backends, workers, keep-alive to the backends and logging are as
# in the plain mode. CPU from /proc counts in clock ticks (10 ms), small
# against the seconds a measured run takes.
#   benches/load/run.sh --tls                  # 10 s x 3 rounds, about 5 minutes
#   benches/load/run.sh --tls --duration 2 --rounds 1    # about 1 minute
#   benches/load/run.sh --tls --only nginx-rr,haproxy-rr --handshake-connections "64 256"
#
# Installs wrk, nginx and haproxy (and linux-perf for --cpu-profile, openssl
# for --tls) with apt-get only if a command is missing.
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
tls=0
for arg in "$@"; do
    case "$arg" in
        -h | --help) exec python3 "$here/run.py" --help ;;
        --no-build) no_build=1 ;;
        --cpu-profile) cpu_profile=1 ;;
        --tls) tls=1 ;;
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
if [ "$tls" -eq 1 ] && ! command -v openssl >/dev/null; then missing+=(openssl); fi
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
