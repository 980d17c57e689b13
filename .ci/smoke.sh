#!/usr/bin/env bash
# Smoke test of the README's quick start: two python http.server backends on
# 8081 and 8082, then the README's run command as written, `cargo run
# --release` in the repo root (the bundled config.json, port 8080), 20
# requests through it, each backend must get 10. When something else holds
# the quick-start ports it says so and runs the release binary on the same
# config moved to other ports instead. Loopback only, bounded, and it stops
# only the processes it started (cargo run replaces itself with the
# balancer, so its PID is the balancer's).
set -euo pipefail
BIN="$1"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

port_free() { python3 -c "import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', int(sys.argv[1])))" "$1" 2>/dev/null; }
# Waits (30 s at most) until http://127.0.0.1:PORT/ answers.
wait_http() {
    python3 - "$1" <<'PY'
import sys, time, urllib.request
port = sys.argv[1]
deadline = time.time() + 30
while True:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read()
        break
    except Exception as e:
        if time.time() > deadline:
            sys.exit(f"smoke: nothing answers on {port}: {e}")
        time.sleep(0.1)
PY
}

config="config.json"
ports=(8080 8081 8082)
as_written=1
if ! port_free 8080 || ! port_free 8081 || ! port_free 8082; then
    as_written=0
    # Something else on this machine holds the quick-start ports: same config
    # shape, other ports, so the check still runs.
    ports=(18080 18081 18082)
    config="$work/config.json"
    sed -e "s/:8080/:${ports[0]}/; s/:8081/:${ports[1]}/; s/:8082/:${ports[2]}/" config.json > "$config"
    echo "smoke: the quick-start ports 8080-8082 are busy on this machine: not running \`cargo run --release\` as written; the release binary on config.json moved to ${ports[*]} instead"
fi

for port in "${ports[1]}" "${ports[2]}"; do
    mkdir -p "$work/$port"
    echo "backend $port" > "$work/$port/index.html"
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$work/$port" >/dev/null 2>&1 &
    pids+=($!)
done
# The backends must be up before the balancer's first health check, or it
# rightly takes them out of rotation for a check interval (30 s here).
wait_http "${ports[1]}"
wait_http "${ports[2]}"
if [ "$as_written" -eq 1 ]; then
    echo "smoke: running the README's command as written: cargo run --release (in $(pwd))"
    RUST_LOG=info cargo run --release 2> "$work/balancer.log" &
else
    RUST_LOG=info "$BIN" --config "$config" 2> "$work/balancer.log" &
fi
pids+=($!)
wait_http "${ports[0]}"

python3 - "${ports[@]}" <<'PY'
import sys, urllib.request, collections
lb, b1, b2 = sys.argv[1:4]
counts = collections.Counter()
for _ in range(20):
    counts[urllib.request.urlopen(f"http://127.0.0.1:{lb}/", timeout=5).read().decode().strip()] += 1
print("smoke:", dict(counts))
want = {f"backend {b1}": 10, f"backend {b2}": 10}
if dict(counts) != want:
    sys.exit(f"smoke: expected {want}")
PY
grep -q "listening on 127.0.0.1:${ports[0]}" "$work/balancer.log" || { cat "$work/balancer.log"; echo "smoke: no start-up line" >&2; exit 1; }
echo "smoke: ok"
