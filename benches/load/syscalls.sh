#!/usr/bin/env bash
# System calls and context switches per proxied request, this balancer
# against NGINX, counted by `perf stat` on each server's processes while
# wrk drives it: three NGINX backends answering 200 "ok\n", both servers
# with 2 workers, keep-alive on both sides, loopback only. Rounds alternate
# the order of the servers. Every process started here is stopped by its
# PID when the script ends.
#
#   benches/load/syscalls.sh                          # release build, 3 rounds of 5 s, 64 connections
#   benches/load/syscalls.sh --binary PATH --baseline OLD --rounds 4
#   benches/load/syscalls.sh --new-connections        # Connection: close, a connection per request
#
# Needs perf (linux-perf), wrk and nginx; prints one line per server and round:
# requests, CPU µs per request (task-clock), its user and kernel parts (utime
# and stime from /proc, in 10 ms ticks), the TCP segments the whole machine
# sent per request (OutSegs of /proc/net/snmp over the run: client, proxy
# and backends, and anything else the machine sends meanwhile) and, per
# request, context switches, all
# system calls, and epoll_wait, recvfrom, writev, read, write, accept4,
# epoll_ctl. Counting every system call costs time in each of them, so the
# CPU columns here favour the server that makes fewer; run.sh measures CPU
# per request without perf.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
export PATH="$PATH:/usr/sbin:/sbin"

binary="${CARGO_TARGET_DIR:-$root/target}/release/rust_load_balancer"
baseline=""
rounds=3
duration=5
connections=64
wrk_header=()
die() { echo "syscalls: error: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary="${2:?--binary needs a path}"; shift ;;
        --baseline) baseline="${2:?--baseline needs a path}"; shift ;;
        --rounds) rounds="${2:?}"; shift ;;
        --duration) duration="${2:?}"; shift ;;
        --connections) connections="${2:?}"; shift ;;
        --new-connections) wrk_header=(-H "Connection: close") ;;
        -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
for n in "$rounds" "$duration" "$connections"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "rounds, duration and connections must be positive integers"
done
[ -x "$binary" ] || die "no balancer binary at $binary (cargo build --release, or --binary PATH)"
[ -z "$baseline" ] || [ -x "$baseline" ] || die "no baseline binary at $baseline"
for tool in perf wrk nginx python3; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install linux-perf wrk nginx)"
done

wd="$(mktemp -d /tmp/lb-syscalls.XXXXXX)"
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$wd"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

read -r b1 b2 b3 p_lb p_base p_nginx < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
temps() { for t in client_body proxy fastcgi uwsgi scgi; do printf '%s_temp_path %s/%s-%s;\n' "$t" "$wd" "$1" "$t"; done; }
cat >"$wd/backends.conf" <<CONF
worker_processes 1; daemon off; master_process off; pid $wd/backends.pid; error_log $wd/backends.err warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
$(temps b)
server { listen 127.0.0.1:$b1; return 200 "ok\n"; }
server { listen 127.0.0.1:$b2; return 200 "ok\n"; }
server { listen 127.0.0.1:$b3; return 200 "ok\n"; } }
CONF
cat >"$wd/proxy.conf" <<CONF
worker_processes 2; daemon off; master_process on; pid $wd/proxy.pid; error_log $wd/proxy.err warn;
worker_rlimit_nofile 20000;
events { worker_connections 4096; }
http { access_log off; keepalive_timeout 300s; keepalive_requests 1000000;
$(temps p)
upstream backends { server 127.0.0.1:$b1; server 127.0.0.1:$b2; server 127.0.0.1:$b3;
    keepalive 512; keepalive_requests 1000000; keepalive_timeout 60s; }
server { listen 127.0.0.1:$p_nginx; location / { proxy_pass http://backends;
    proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
lb_config() {
    printf '{ "listen_address": "127.0.0.1:%s", "backend_servers": ["127.0.0.1:%s", "127.0.0.1:%s", "127.0.0.1:%s"], "health_check_interval": 30, "worker_threads": 2 }\n' \
        "$1" "$b1" "$b2" "$b3" >"$wd/lb-$1.json"
    echo "$wd/lb-$1.json"
}

nginx -p "$wd/" -c "$wd/backends.conf" -e "$wd/backends.err" </dev/null &
pids+=("$!")
nginx -p "$wd/" -c "$wd/proxy.conf" -e "$wd/proxy.err" </dev/null &
nginx_master=$!
pids+=("$nginx_master")
RUST_LOG=warn "$binary" --config "$(lb_config "$p_lb")" </dev/null >"$wd/lb.log" 2>&1 &
lb_pid=$!
pids+=("$lb_pid")
targets=(lb nginx)
if [ -n "$baseline" ]; then
    RUST_LOG=warn "$baseline" --config "$(lb_config "$p_base")" </dev/null >"$wd/baseline.log" 2>&1 &
    base_pid=$!
    pids+=("$base_pid")
    targets=(lb baseline nginx)
fi
for port in "$b1" "$b2" "$b3" "$p_lb" "$p_nginx" ${baseline:+"$p_base"}; do
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
done
workers="$(pgrep -P "$nginx_master" | paste -sd,)"
[ -n "$workers" ] || die "NGINX started no workers (see $wd/proxy.err)"
events=task-clock,context-switches,raw_syscalls:sys_enter,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_recvfrom,syscalls:sys_enter_writev,syscalls:sys_enter_read,syscalls:sys_enter_write,syscalls:sys_enter_accept4,syscalls:sys_enter_epoll_ctl
# utime + stime (clock ticks) of the given PIDs, all their threads.
cpu_ticks() { local p; for p in ${1//,/ }; do cat "/proc/$p/stat"; done | awk '{ u += $14; s += $15 } END { print u, s }'; }

echo "| round | server | requests | CPU µs/req | user µs/req | kernel µs/req | TCP segments | context switches | syscalls | epoll_wait | recvfrom | writev | read | write | accept4 | epoll_ctl |"
echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for round in $(seq "$rounds"); do
    order=("${targets[@]}")
    if [ $((round % 2)) -eq 0 ]; then
        order=(); for ((i = ${#targets[@]} - 1; i >= 0; i--)); do order+=("${targets[$i]}"); done
    fi
    for t in "${order[@]}"; do
        case "$t" in
            lb) pid="$lb_pid"; port="$p_lb" ;;
            baseline) pid="$base_pid"; port="$p_base" ;;
            nginx) pid="$workers"; port="$p_nginx" ;;
        esac
        wrk -t1 -c"$connections" "${wrk_header[@]}" -d1s "http://127.0.0.1:$port/" >/dev/null
        before="$(cpu_ticks "$pid")"
        cp /proc/net/snmp "$wd/snmp.before"
        perf stat -x, -e "$events" -p "$pid" -- \
            wrk -t1 -c"$connections" "${wrk_header[@]}" -d"${duration}s" "http://127.0.0.1:$port/" >"$wd/wrk.out" 2>"$wd/perf.out"
        cp /proc/net/snmp "$wd/snmp.after"
        after="$(cpu_ticks "$pid")"
        python3 - "$round" "$t" "$wd/wrk.out" "$wd/perf.out" "$before" "$after" "$(getconf CLK_TCK)" \
            "$wd/snmp.before" "$wd/snmp.after" <<'PY'
import re, sys
rnd, name, wrk, perf, before, after, tck, snmp0, snmp1 = sys.argv[1:]
m = re.search(r"^\s*(\d+) requests in", open(wrk).read(), re.M)
if not m:
    sys.exit(f"syscalls: no request count in wrk's output for {name}")
n = int(m.group(1))
counts = {}
for line in open(perf):
    f = line.strip().split(",")
    if len(f) >= 3 and re.fullmatch(r"[\d.]+", f[0]):
        counts[f[2]] = float(f[0])
def per(event):
    return f"{counts.get(event, float('nan')) / n:.3f}"
(u0, s0), (u1, s1) = (map(int, x.split()) for x in (before, after))
tick_us = 1e6 / int(tck)
def out_segs(path):
    rows = [line.split() for line in open(path) if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("OutSegs")])
segs = out_segs(snmp1) - out_segs(snmp0)
cells = [rnd, name, str(n), f"{counts.get('task-clock', float('nan')) * 1000 / n:.2f}",
         f"{(u1 - u0) * tick_us / n:.2f}", f"{(s1 - s0) * tick_us / n:.2f}", f"{segs / n:.2f}",
         per("context-switches"), per("raw_syscalls:sys_enter")] + [
    per(f"syscalls:sys_enter_{c}") for c in ("epoll_wait", "recvfrom", "writev", "read", "write", "accept4", "epoll_ctl")]
print("| " + " | ".join(cells) + " |")
PY
    done
done
