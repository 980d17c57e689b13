#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind.
#
# What: the user-space instructions (callgrind's Ir: every instruction the
# proxy's process executes outside the kernel, libc included) that one
# proxied request costs, over a window of a fixed number of keep-alive
# requests. Unlike time, the figure is deterministic up to a fraction of a
# per cent, so it can tell two builds apart on a noisy shared machine.
#
# How: three backends are server blocks of one nginx process (1 worker)
# answering 200 "ok\n", as in run.sh. The proxy runs under
# `valgrind --tool=callgrind --instr-atstart=no`:
#   (default)   this balancer, config {"listen_address", "backend_servers"
#               (the three), "worker_threads": 1, "admin_address",
#               "health_check_interval": 3600 (no checks in the window)}
#   --nginx     NGINX as the proxy: worker_processes 1, master_process off,
#               daemon off, the proxy config of run.sh otherwise (round robin,
#               keepalive 512 to the backends)
#   --tls       the balancer also terminates TLS ("tls_listen_address",
#               "tls_certificates" with a fresh ECDSA P-256 certificate from
#               openssl); the requests go over https to the TLS port
# It is warmed up (--warmup requests, instrumentation off), then
# `callgrind_control -i on PID`, `wrk -t1 -c<connections>` until about
# --requests responses, 1 s for stragglers, `callgrind_control -i off`, and
# `callgrind_control -d`. The request count of the window is exact: the lines
# the backends wrote to their access log between `-i on` and `-i off` (for
# the balancer cross-checked with its own lb_requests_total from /metrics).
# With --new-connections wrk sends `Connection: close`: one connection (and,
# with --tls, one full handshake) per request.
# Printed: Ir per request from the dump's totals, and the top functions by
# inclusive and by self Ir (callgrind_annotate), per request.
#
#   benches/load/callgrind.sh                            # release build, keep-alive
#   benches/load/callgrind.sh --binary /tmp/lb-old/rust_load_balancer
#   benches/load/callgrind.sh --new-connections
#   benches/load/callgrind.sh --tls
#   benches/load/callgrind.sh --nginx                    # NGINX, same setup
#   benches/load/callgrind.sh --help                     # every option
#
# Without --binary it builds the release binary (cargo build --release
# --locked; --no-build skips that) and uses $CARGO_TARGET_DIR/release (or
# target/release). Installs valgrind, wrk and nginx with apt-get only if a
# command is missing. Loopback only; every process it starts is recorded and
# stopped by its PID (TERM, then KILL after 10 s) on exit, Ctrl-C or TERM;
# every step has a time limit. Results (summary.md, the callgrind dump,
# callgrind_annotate and wrk outputs) go to
# target/callgrind-results/<UTC time>-<what>/ (or --results-dir); configs and
# logs go to a mktemp -d dir, removed at the end unless --keep.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
export PATH="$PATH:/usr/sbin:/sbin"

usage() {
    cat <<'EOF'
usage: benches/load/callgrind.sh [options]

  --binary PATH        the balancer to measure (default: the release build,
                       built first unless --no-build)
  --no-build           use the release binary already built
  --nginx              measure NGINX as the proxy instead of the balancer
  --tls                the balancer terminates TLS; requests go over https
  --new-connections    wrk sends `Connection: close` (a connection per request)
  --requests N         requests in the measured window (about; the count used
                       is exact) (default 20000)
  --connections N      wrk connections (default 8)
  --warmup N           requests before collection starts (default 500)
  --top N              functions listed by inclusive and by self Ir (default 15)
  --results-dir DIR    where the results go (default
                       target/callgrind-results/<UTC time>-<what>)
  --keep               keep the working dir (configs, logs) and print its path
  -h, --help           this text
EOF
}

orig_args=("$@")
binary=""
no_build=0
nginx_mode=0
tls=0
new_conns=0
requests=20000
connections=8
warmup=500
top=15
results_dir=""
keep=0
die() { echo "callgrind: error: $*" >&2; exit 1; }
log() { echo "callgrind: $*" >&2; }
need_int() { [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -ge "$3" ] || die "$1 needs a number >= $3, got '$2'"; }
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --binary) [ $# -ge 2 ] || die "--binary needs a path"; binary="$2"; shift ;;
        --no-build) no_build=1 ;;
        --nginx) nginx_mode=1 ;;
        --tls) tls=1 ;;
        --new-connections) new_conns=1 ;;
        --requests) need_int "$1" "${2:-}" 100; requests="$2"; shift ;;
        --connections) need_int "$1" "${2:-}" 1; connections="$2"; shift ;;
        --warmup) need_int "$1" "${2:-}" 1; warmup="$2"; shift ;;
        --top) need_int "$1" "${2:-}" 1; top="$2"; shift ;;
        --results-dir) [ $# -ge 2 ] || die "--results-dir needs a path"; results_dir="$2"; shift ;;
        --keep) keep=1 ;;
        *) usage >&2; die "unknown option '$1'" ;;
    esac
    shift
done
[ "$nginx_mode" -eq 1 ] && [ "$tls" -eq 1 ] && die "--tls is for the balancer only, not with --nginx"
[ "$nginx_mode" -eq 1 ] && [ -n "$binary" ] && die "--binary and --nginx exclude each other"

# 1. Tools, installed only if missing.
missing=()
command -v valgrind >/dev/null || missing+=(valgrind)
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || missing+=(nginx)
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3)
if [ "$tls" -eq 1 ] && ! command -v openssl >/dev/null; then missing+=(openssl); fi
if [ "${#missing[@]}" -gt 0 ]; then
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    log "installing ${missing[*]} with apt-get"
    "${sudo[@]}" apt-get update
    pkgs=()
    for m in "${missing[@]}"; do
        if [ "$m" = nginx ] && apt-cache show nginx-light >/dev/null 2>&1; then pkgs+=(nginx-light); else pkgs+=("$m"); fi
    done
    "${sudo[@]}" apt-get install -y "${pkgs[@]}"
fi

# 2. The balancer's binary.
if [ "$nginx_mode" -eq 0 ]; then
    if [ -z "$binary" ]; then
        if [ "$no_build" -eq 0 ]; then
            log "cargo build --release --locked"
            cargo build --release --locked
        fi
        binary="${CARGO_TARGET_DIR:-target}/release/rust_load_balancer"
    fi
    [ -x "$binary" ] || die "no balancer binary at $binary (cargo build --release --locked, or --binary PATH)"
    binary="$(cd "$(dirname "$binary")" && pwd)/$(basename "$binary")"
fi

# 3. Working dir, results dir, the processes this run starts.
what="lb"
[ "$nginx_mode" -eq 1 ] && what="nginx"
[ "$tls" -eq 1 ] && what="$what-tls"
[ "$new_conns" -eq 1 ] && what="$what-newconn"
started="$(date -u +%Y%m%dT%H%M%SZ)"
[ -n "$results_dir" ] || results_dir="$root/target/callgrind-results/$started-$what"
mkdir -p "$results_dir"
results_dir="$(cd "$results_dir" && pwd)"
wd="$(mktemp -d /tmp/lb-callgrind.XXXXXX)"
log "working dir $wd; results in $results_dir"

pids=()   # every process started here, in start order
names=()
stop_all() {
    local i pid n
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        pid="${pids[$i]}"
        kill -0 "$pid" 2>/dev/null || continue
        kill -TERM "$pid" 2>/dev/null || true
        for ((n = 0; n < 100; n++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "${names[$i]} (pid $pid) still running 10 s after SIGTERM: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    pids=()
    names=()
}
cleanup() {
    local status=$?
    # Only the script itself cleans up, never a subshell of it.
    [ "$BASHPID" = "$$" ] || return 0
    trap '' INT TERM HUP
    stop_all
    if [ "$keep" -eq 1 ]; then log "kept the working dir $wd"; else rm -rf "$wd"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'log "interrupted: stopping what this run started"; exit 130' INT TERM HUP

# start NAME LOGFILE CMD...: in the background, recorded by PID.
start() {
    local name="$1" logfile="$2"
    shift 2
    "$@" </dev/null >>"$logfile" 2>&1 &
    pids+=("$!")
    names+=("$name")
}

# wait_http NAME PID URL LOGFILE SECONDS: until URL answers 200 "ok\n".
wait_http() {
    local name="$1" pid="$2" url="$3" logfile="$4" limit="$5" deadline body
    deadline=$((SECONDS + limit))
    while :; do
        kill -0 "$pid" 2>/dev/null || die "$name exited before answering $url; its log ($logfile) ends with:
$(tail -n 20 "$logfile")"
        body="$(curl -sk --max-time 5 "$url" 2>/dev/null || true)"
        [ "$body" = "ok" ] && return 0
        [ "$SECONDS" -lt "$deadline" ] || die "$name did not answer 200 \"ok\" at $url within $limit s; its log ($logfile) ends with:
$(tail -n 20 "$logfile")"
        sleep 0.5
    done
}

# Free loopback ports: backends, proxy, TLS, admin.
read -r -a ports <<<"$(python3 -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')"
backends=("${ports[0]}" "${ports[1]}" "${ports[2]}")
port="${ports[3]}"
tls_port="${ports[4]}"
admin_port="${ports[5]}"

# render TEMPLATE OUT KEY=VALUE...: run.py's templates, @KEY@ replaced;
# "s/OLD/NEW/" arguments replace literal text afterwards.
render() {
    python3 - "$@" <<'EOF'
import os, re, subprocess, sys
template, out, *pairs = sys.argv[1:]
with open(template) as f:
    text = f.read()
subs = []
for p in pairs:
    if p.startswith("s/") and p.endswith("/"):
        old, new = p[2:-1].split("/", 1)
        subs.append((old, new))
    else:
        k, v = p.split("=", 1)
        text = text.replace(f"@{k}@", v)
for old, new in subs:
    if old not in text:
        sys.exit(f"{template}: no '{old}' to replace")
    text = text.replace(old, new)
left = re.findall(r"@[A-Z_]+@", text)
if left:
    sys.exit(f"{template}: no value for {', '.join(sorted(set(left)))}")
with open(out, "w") as f:
    f.write(text)
EOF
}
temp_paths() {
    local d="$1" k build
    build="$(nginx -V 2>&1)"
    for k in client_body proxy fastcgi uwsgi scgi; do
        case "$k" in client_body | proxy) ;; *) [[ "$build" == *"--without-http_${k}_module"* ]] && continue ;; esac
        printf '    %s_temp_path %s/tmp/%s;\n' "$k" "$d" "$k"
    done
}
# nginx_conf NAME TEMPLATE KEY=VALUE...: writes $wd/NAME/nginx.conf.
nginx_conf() {
    local name="$1" template="$2" d="$wd/$1"
    shift 2
    mkdir -p "$d/tmp"
    render "$here/$template" "$d/nginx.conf" DIR="$d" NOFILE=4096 WORKER_CONNECTIONS=1024 \
        NAME="$name" TEMP_PATHS="$(temp_paths "$d")" "$@"
}

# 4. Backends: one nginx, one worker; each server block logs every request it
# answers to one file, whose line count is the window's request count.
access_log="$wd/backends/access.log"
servers=""
for b in "${backends[@]}"; do
    servers+="    server {
        listen 127.0.0.1:$b;
        access_log $access_log;
        return 200 \"ok\\n\";
    }
"
done
nginx_conf backends nginx-backends.conf.in SERVERS="$servers"
start backends "$wd/backends/stderr.log" nginx -p "$wd/backends/" -c "$wd/backends/nginx.conf" -e "$wd/backends/error.log"
backends_pid="${pids[-1]}"
for b in "${backends[@]}"; do
    wait_http "backend nginx" "$backends_pid" "http://127.0.0.1:$b/" "$wd/backends/error.log" 10
done

# 5. The proxy under callgrind.
cg_out="$wd/callgrind.out"
valgrind_argv=(valgrind --tool=callgrind --instr-atstart=no "--callgrind-out-file=$cg_out")
scheme=http
target_port="$port"
if [ "$nginx_mode" -eq 1 ]; then
    upstream=""
    for b in "${backends[@]}"; do upstream+="        server 127.0.0.1:$b;
"; done
    nginx_conf proxy nginx-proxy.conf.in PORT="$port" SERVERS="$upstream" METHOD="" \
        "s/worker_processes 2;/worker_processes 1;/" "s/master_process on;/master_process off;/"
    proxy_log="$wd/proxy.log"
    version="$(nginx -v 2>&1 | sed 's/^nginx version: //')"
    start "nginx proxy" "$proxy_log" "${valgrind_argv[@]}" \
        nginx -p "$wd/proxy/" -c "$wd/proxy/nginx.conf" -e "$wd/proxy/error.log"
    label="NGINX ($version), worker_processes 1, master_process off"
else
    cfg="$wd/lb.json"
    python3 - "$cfg" "$port" "$admin_port" "$tls" "$tls_port" "${backends[@]}" <<'EOF'
import json, sys
cfg, port, admin, tls, tls_port, *backends = sys.argv[1:]
c = {
    "listen_address": f"127.0.0.1:{port}",
    "backend_servers": [f"127.0.0.1:{b}" for b in backends],
    "worker_threads": 1,
    "admin_address": f"127.0.0.1:{admin}",
    "health_check_interval": 3600,
}
if tls == "1":
    c["tls_listen_address"] = f"127.0.0.1:{tls_port}"
    c["tls_certificates"] = [{"cert": "cert.pem", "key": "key.pem"}]
with open(cfg, "w") as f:
    json.dump(c, f, indent=2)
    f.write("\n")
EOF
    if [ "$tls" -eq 1 ]; then
        timeout 60 openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -keyout "$wd/key.pem" -out "$wd/cert.pem" -days 2 -subj "/CN=localhost" \
            -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" >"$wd/openssl.log" 2>&1 ||
            die "openssl could not make a certificate: $(cat "$wd/openssl.log")"
        scheme=https
        target_port="$tls_port"
    fi
    check="$(timeout 120 "$binary" --check --config "$cfg" 2>&1)" || die "--check rejected $cfg:
$check"
    version="$(timeout 10 "$binary" --version 2>&1 | head -n 1 || true)"
    proxy_log="$wd/proxy.log"
    start "balancer" "$proxy_log" env RUST_LOG=warn "${valgrind_argv[@]}" "$binary" --config "$cfg"
    label="$version ($binary), worker_threads 1"
    if [ "$tls" -eq 1 ]; then label+=", TLS (ECDSA P-256 certificate)"; fi
fi
proxy_pid="${pids[-1]}"
url="$scheme://127.0.0.1:$target_port/"
# Start-up under valgrind (wasm compilation included) takes a while.
wait_http proxy "$proxy_pid" "$url" "$proxy_log" 300
log "proxy (pid $proxy_pid) answers at $url; backends :${backends[*]}"

# 6. wrk until N responses (a Lua counter stops its one thread), bounded.
cat >"$wd/count.lua" <<'EOF'
local limit = tonumber(os.getenv("CALLGRIND_REQUESTS"))
local done = 0
function response(status, headers, body)
    done = done + 1
    if done >= limit then wrk.thread:stop() end
end
EOF
wrk_argv=(wrk -t1 "-c$connections" -d600s -s "$wd/count.lua")
[ "$new_conns" -eq 1 ] && wrk_argv+=(-H "Connection: close")
wrk_argv+=("$url")
count_lines() { if [ -f "$access_log" ]; then wc -l <"$access_log"; else echo 0; fi; }
# run_wrk N OUTFILE: wrk in the background until the backends have answered N
# more requests, then SIGINT (wrk then stops, prints its totals and exits;
# its Lua counter has already stopped its thread at N responses).
run_wrk() {
    local status=0 base wrk_pid deadline
    base="$(count_lines)"
    echo "\$ CALLGRIND_REQUESTS=$1 ${wrk_argv[*]}" >"$2"
    CALLGRIND_REQUESTS="$1" "${wrk_argv[@]}" </dev/null >>"$2" 2>&1 &
    wrk_pid=$!
    pids+=("$wrk_pid")
    names+=(wrk)
    deadline=$((SECONDS + 600))
    while kill -0 "$wrk_pid" 2>/dev/null; do
        if [ $(($(count_lines) - base)) -ge "$1" ] || [ "$SECONDS" -ge "$deadline" ]; then
            kill -INT "$wrk_pid" 2>/dev/null || true
            break
        fi
        kill -0 "$proxy_pid" 2>/dev/null || break
        sleep 0.2
    done
    deadline=$((SECONDS + 30))
    while kill -0 "$wrk_pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
    kill -0 "$wrk_pid" 2>/dev/null && kill -KILL "$wrk_pid" 2>/dev/null
    wait "$wrk_pid" || status=$?
    unset 'pids[-1]' 'names[-1]'
    echo "[exit status: $status]" >>"$2"
    kill -0 "$proxy_pid" 2>/dev/null || die "the proxy exited during wrk; its log ends with:
$(tail -n 20 "$proxy_log")"
    [ "$status" -eq 0 ] || die "wrk failed (status $status), see $2"
}
lb_total() {  # the sum of lb_requests_total over its labels
    [ "$nginx_mode" -eq 1 ] && { echo -; return; }
    curl -s --max-time 30 "http://127.0.0.1:$admin_port/metrics" |
        awk '/^lb_requests_total[{ ]/ { s += $NF } END { printf "%d\n", s }'
}
cgc() {  # callgrind_control with a time limit
    timeout 120 callgrind_control "$@" >>"$wd/callgrind_control.log" 2>&1 ||
        die "callgrind_control $* failed; its output ends with: $(tail -n 5 "$wd/callgrind_control.log")"
}

log "warm-up: $warmup requests (instrumentation off)"
run_wrk "$warmup" "$results_dir/wrk.warmup.txt"
sleep 1
before_lines="$(count_lines)"
before_lb="$(lb_total)"
cgc -i on "$proxy_pid"
t0=$SECONDS
log "collecting: $requests requests over $connections connections"
run_wrk "$requests" "$results_dir/wrk.txt"
sleep 1
cgc -i off "$proxy_pid"
after_lines="$(count_lines)"
after_lb="$(lb_total)"
rm -f "$cg_out".*
cgc -d "$proxy_pid"
dump="$(ls -t "$cg_out".* 2>/dev/null | head -n 1)"
[ -n "$dump" ] || die "no dump from callgrind_control -d (expected $cg_out.N)"
cp "$dump" "$results_dir/callgrind.out"
log "window: $((SECONDS - t0)) s; stopping the proxy and the backends"
stop_all

# 7. The report.
for inc in yes no; do
    timeout 300 callgrind_annotate --inclusive=$inc --threshold=99.9 "$results_dir/callgrind.out" \
        >"$results_dir/annotate.inclusive-$inc.txt" 2>&1 || die "callgrind_annotate failed, see $results_dir/annotate.inclusive-$inc.txt"
done
python3 - "$results_dir" "$((after_lines - before_lines))" "$before_lb" "$after_lb" "$top" \
    "$label" "$requests" "$connections" "$new_conns" "$started" "$0 ${orig_args[*]}" <<'EOF' | tee "$results_dir/summary.md"
import os, re, sys
rd, n, lb0, lb1, top, label, want, conns, newc, started, cmd = sys.argv[1:]
n, top = int(n), int(top)
lb_n = int(lb1) - int(lb0) if lb0 != "-" else None
totals = None
with open(os.path.join(rd, "callgrind.out")) as f:
    for line in f:
        if line.startswith(("summary:", "totals:")):
            totals = int(line.split()[1])
            if line.startswith("totals:"):
                break
def wrk_errors(path):
    text = open(path).read()
    e = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        e += sum(map(int, m.groups()))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        e += int(m.group(1))
    m = re.search(r"^\s*(\d+) requests in", text, re.M)
    return e, int(m.group(1)) if m else None
errors, wrk_n = wrk_errors(os.path.join(rd, "wrk.txt"))
def rows(path):
    out = []
    in_body = False
    for line in open(path, errors="replace"):
        m = re.match(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*\S)\s*$", line)
        if not m:
            continue
        if "PROGRAM TOTALS" in m.group(2):
            in_body = True
            continue
        if in_body:
            out.append((int(m.group(1).replace(",", "")), m.group(2)))
    return out
def short(fn, width=120):
    # "file:function [object]" -> function [object basename], shortened
    m = re.match(r"^(.*?)\s+\[(.*)\]$", fn)
    obj = ""
    if m:
        fn, obj = m.group(1), os.path.basename(m.group(2))
    if ":" in fn and not fn.startswith("<"):
        head, _, rest = fn.partition(":")
        if "/" in head or head == "???" or head.endswith((".c", ".rs", ".h", ".S")):
            fn = rest
    fn = re.sub(r"::h[0-9a-f]{16}$", "", fn)
    if len(fn) > width:
        fn = fn[:width - 1] + "…"
    return f"`{fn.replace('|', '/')}` ({obj})" if obj else f"`{fn.replace('|', '/')}`"
p = print
p(f"## callgrind: instructions per proxied request")
p()
p(f"- proxy: {label}")
p(f"- run: {started}; `{cmd.strip()}`; wrk -t1 -c{conns}, "
  + ("`Connection: close` (a connection per request)" if newc == "1" else "keep-alive"))
p(f"- window: {n} requests reached the backends (wrk: {wrk_n} responses, asked for about {want}; "
  f"errors {errors})" + (f"; the balancer's lb_requests_total rose by {lb_n}" if lb_n is not None else ""))
if lb_n is not None and lb_n != n:
    p(f"- WARNING: lb_requests_total ({lb_n}) and the backends' count ({n}) differ")
if n <= 0 or not totals:
    p("- no requests or no instructions in the window: no figure")
    sys.exit(1)
p(f"- Ir in the window: {totals:,}; **Ir per request: {totals / n:,.0f}**")
p()
for inc, title in (("yes", "inclusive"), ("no", "self")):
    r = rows(os.path.join(rd, f"annotate.inclusive-{inc}.txt"))[:top]
    p(f"Top {top} by {title} Ir (per request; share of the window's Ir):")
    p()
    p(f"| {title} Ir/req | % | function (object) |")
    p("|---:|---:|---|")
    for ir, fn in r:
        p(f"| {ir / n:,.0f} | {100 * ir / totals:.1f} | {short(fn)} |")
    p()
EOF
