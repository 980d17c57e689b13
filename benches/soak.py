#!/usr/bin/env python3
"""Soak test: the release balancer under steady load for a bounded time while
backends are killed and restarted, the config is reloaded between strategies
(built-in and custom, including modules that trap or loop), and it reports
requests, failures, faults handled, and the balancer's RSS and open file
descriptors at start and end.

Loopback only; every process it starts is stopped by its PID at the end.
Run through benches/soak.sh (which builds the binary); see the README.
"""

import argparse
import http.client
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST = os.path.join(ROOT, "plugins", "dist")
# Strategies cycled through by reloads: built-ins, a custom module, and
# modules that fault on every call (the balancer must serve regardless).
STRATEGIES = [
    "round-robin",
    "least-connections",
    "weighted-round-robin",
    os.path.join(DIST, "misbehave-trap.wasm"),
    os.path.join(DIST, "c-round-robin.wasm"),
    os.path.join(DIST, "misbehave-loop.wasm"),
    os.path.join(DIST, "misbehave-memory.wasm"),
    os.path.join(DIST, "pick-last.wasm"),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BACKEND_CODE = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer.allow_reuse_address = True
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


class Backend:
    def __init__(self, port):
        self.port = port
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", BACKEND_CODE, str(self.port)])
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit(f"soak: backend {self.port} did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def write_config(path, port, admin, backends, strategy):
    config = {
        "listen_address": f"127.0.0.1:{port}",
        "admin_address": f"127.0.0.1:{admin}",
        "backend_servers": [{"address": f"127.0.0.1:{b.port}", "weight": i + 1} for i, b in enumerate(backends)],
        "strategy": strategy,
        "health_check_interval": 1,
        "health_check_timeout": 1,
        "unhealthy_threshold": 2,
        "healthy_threshold": 2,
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config, f)
    os.replace(tmp, path)


def proc_stats(pid):
    rss_kib = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss_kib, fds


class Load:
    """Client threads sending GET / over keep-alive connections."""

    def __init__(self, port, clients):
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failed = 0
        self.failures = []
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def run(self):
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/")
                response = conn.getresponse()
                response.read()
                good = response.status == 200
                detail = f"status {response.status}"
                if response.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                good, detail = False, repr(e)
                if conn is not None:
                    conn.close()
                conn = None
            with self.lock:
                if good:
                    self.ok += 1
                else:
                    self.failed += 1
                    if len(self.failures) < 20:
                        self.failures.append(detail)

    def start(self):
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=15)


def metrics(admin):
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    faults = sum(float(v) for v in re.findall(r'^lb_strategy_faults_total\{[^}]*\} (\S+)$', text, re.M))
    reloads = {k: float(v) for k, v in re.findall(r'^lb_config_reloads_total\{result="(\w+)"\} (\S+)$', text, re.M)}
    return faults, reloads


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", required=True)
    parser.add_argument("--seconds", type=int, default=600, help="length of the run (default 600)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=60,
                        help="seconds of the same churn before the start figures (default 60: "
                             "more than one pass through every strategy and backend kill)")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="lb-soak-")
    port, admin = free_port(), free_port()
    backends = [Backend(free_port()) for _ in range(3)]
    config = os.path.join(work, "soak.json")
    balancer = None
    try:
        for b in backends:
            b.start()
        write_config(config, port, admin, backends, STRATEGIES[0])
        log = open(os.path.join(work, "balancer.log"), "w")
        balancer = subprocess.Popen([args.binary, "--config", config], stderr=log,
                                    env={**os.environ, "RUST_LOG": "warn"})
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline or balancer.poll() is not None:
                    raise SystemExit("soak: the balancer did not start")
                time.sleep(0.1)

        load = Load(port, args.clients)
        load.start()
        begun = time.time()
        rss_start = fds_start = None
        samples = []
        kills = reloads = 0
        step = 0
        # The warm-up runs the same churn as the measured part, so every
        # strategy has been loaded and every backend killed once before the
        # start figures are taken.
        while time.time() - begun < args.warmup + args.seconds:
            elapsed = time.time() - begun
            if rss_start is None and elapsed >= args.warmup:
                rss_start, fds_start = proc_stats(balancer.pid)
                samples.append((round(elapsed), rss_start, fds_start))
            elif rss_start is not None and elapsed - samples[-1][0] >= 60:
                samples.append((round(elapsed), *proc_stats(balancer.pid)))
            step += 1
            # Every 2 s something happens: a backend dies (and comes back 3 s
            # later) or the strategy changes.
            if step % 2 == 0:
                victim = backends[(step // 2) % len(backends)]
                victim.stop()
                kills += 1
                time.sleep(3)
                victim.start()
            else:
                write_config(config, port, admin, backends, STRATEGIES[reloads % len(STRATEGIES)])
                balancer.send_signal(signal.SIGHUP)
                reloads += 1
            time.sleep(2)
            if balancer.poll() is not None:
                raise SystemExit("soak: the balancer exited")
        if rss_start is None:
            rss_start, fds_start = proc_stats(balancer.pid)
        rss_end, fds_end = proc_stats(balancer.pid)
        load.finish()
        faults, reload_counts = metrics(admin)
        total = load.ok + load.failed
        print(f"soak: {args.seconds} s after a {args.warmup} s warm-up, {args.clients} clients, {len(backends)} backends")
        print(f"requests      {total} ({total / max(1, args.seconds + args.warmup):.0f}/s)")
        print(f"failed        {load.failed}")
        print(f"backend kills {kills}, reloads {reloads} (metrics: {reload_counts})")
        print(f"strategy faults handled {faults:.0f}")
        print(f"balancer RSS  {rss_start / 1024:.1f} MiB at start, {rss_end / 1024:.1f} MiB at end")
        print(f"balancer fds  {fds_start} at start, {fds_end} at end")
        print("samples (s: RSS MiB / fds): " + ", ".join(
            f"{t}: {r / 1024:.1f}/{f}" for t, r, f in samples + [(round(time.time() - begun), rss_end, fds_end)]))
        if load.failures:
            print("first failures:", *load.failures[:5], sep="\n  ")
        return 0 if load.failed == 0 else 1
    finally:
        if balancer and balancer.poll() is None:
            balancer.send_signal(signal.SIGTERM)
            try:
                balancer.wait(timeout=40)
            except subprocess.TimeoutExpired:
                balancer.kill()
        for b in backends:
            b.stop()


if __name__ == "__main__":
    sys.exit(main())
