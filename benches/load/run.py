#!/usr/bin/env python3
"""Load benchmark driver: rust_load_balancer against NGINX and HAProxy.

Run it through benches/load/run.sh, which installs the tools, builds the
release binary and raises the descriptor limit; the header of run.sh says
what is measured and how. This file starts the backends and every target on
free 127.0.0.1 ports, drives them with wrk in interleaved rounds, parses
wrk's output and prints a markdown table of medians.

With --tls (run_tls below) the balancers terminate HTTPS instead, with one
self-signed certificate made by openssl for the run, and the table adds a
new-connection test (every request a new TLS handshake) and each
balancer's CPU time per request from /proc.

Every process it starts is recorded and stopped by its PID (SIGTERM, then
SIGKILL after 10 s) at the end, on Ctrl-C and on SIGTERM/SIGHUP; each is also
asked to receive SIGTERM if this driver dies abruptly. Python 3.11 stdlib only.
"""

import argparse
import ctypes
import datetime
import http.client
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# Odd rounds drive the targets in this order, even rounds in the reverse
# one: a target's place in a round biases its figures. Two builds swapped
# between two runs of 10 rounds (--baseline, 2026-12-02): the one driven
# first in a round measured 2 % (64 connections) and 9 % (256) less CPU
# per request than the same build driven second. Alternating the order
# cancels that over an even number of rounds.
TARGETS = [
    "direct",
    "nginx-rr",
    "nginx-lc",
    "haproxy-rr",
    "haproxy-lc",
    "lb-rr",
    "lb-lc",
    "lb-wrr",
    "lb-ch",
    "lb-pe",
    "lb-native-rr",
]
LB_STRATEGIES = {
    "lb-rr": "round-robin",
    "lb-lc": "least-connections",
    "lb-wrr": "weighted-round-robin",
    "lb-ch": "consistent-hash",
    "lb-pe": "peak-ewma",
    "lb-native-rr": "native:round-robin",
    "lb-rr-baseline": "round-robin",
}
# The target that runs --baseline's binary instead of the build under test.
BASELINE = "lb-rr-baseline"
# Extra config keys per strategy. Consistent hashing on the client's address:
# every request carries a key (all of wrk's come from 127.0.0.1, so they
# share one backend, which costs the backends the same: they are one NGINX
# worker), so the cost measured includes hashing the key per request.
LB_EXTRA = {
    "consistent-hash": {"hash_key": "client_ip"},
}
# Targets that may be missing from the build under test: skipped with a note.
OPTIONAL = {"lb-native-rr"}
WRR_WEIGHTS = [3, 2, 1]
WARMUP_SECONDS = 1
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
LB_THREADS = 2

# --tls: the targets that have a TLS variant (the backends stay plain, so
# there is no `direct`), and those run when --only is not given.
TLS_TARGETS = [t for t in TARGETS if t != "direct"]
TLS_DEFAULT = ["nginx-rr", "haproxy-rr", "lb-rr"]
# The two --tls tests: keep-alive HTTPS, and a new TLS connection per request.
KEEP_ALIVE, NEW_CONN = "keep-alive", "new-conn"
CERT_DAYS = 2


class BenchError(Exception):
    """A failure that ends the run with a clear message."""


def round_order(targets, rnd):
    """The order round `rnd` (from 1) drives the targets in: as listed in
    odd rounds, reversed in even ones (see TARGETS)."""
    return list(targets) if rnd % 2 else list(reversed(targets))


def log(msg):
    print(f"load: {msg}", file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="benches/load/run.sh",
        description="Load benchmark: rust_load_balancer against NGINX and HAProxy "
        "on loopback (see the header of benches/load/run.sh).",
    )
    p.add_argument("--duration", type=int, default=10, metavar="SECS",
                   help="seconds per measured wrk run (default 10; each has a 1 s warm-up before it)")
    p.add_argument("--rounds", type=int, default=3, metavar="N",
                   help="interleaved rounds; the table shows medians over them (default 3)")
    p.add_argument("--connections", default="64 256", metavar='"64 256"',
                   help="wrk connection counts, space or comma separated (default \"64 256\"; "
                        "with --tls: those of the keep-alive test)")
    p.add_argument("--only", default="", metavar="LIST",
                   help="comma-separated targets to run (default all): " + ",".join(TARGETS)
                        + "; with --tls (default " + ",".join(TLS_DEFAULT) + "): any but direct")
    p.add_argument("--tls", action="store_true",
                   help="HTTPS instead: every balancer terminates TLS with one self-signed ECDSA "
                        "P-256 certificate (made with openssl) in front of the same plain backends; "
                        "keep-alive req/s, new TLS connections per second, and each balancer's CPU "
                        "time per request from /proc (see the header of run.sh)")
    p.add_argument("--handshake-connections", default=None, metavar='"64"',
                   help="--tls only: wrk connection counts of the new-connection test "
                        "(`Connection: close`, every request a new TLS connection; default \"64\"; "
                        "\"\" leaves the test out)")
    p.add_argument("--backends", type=int, default=3, metavar="N",
                   help="backends behind every balancer (default 3; e.g. 16 to see the "
                        "strategy's share grow with the list it is given)")
    p.add_argument("--cpu-profile", action="store_true",
                   help="for this balancer's targets, sample every CPU with `perf record -a` "
                        "during each measured run and add two columns: the share of the machine's "
                        "busy CPU time spent in the strategy call and in the balancer as a whole "
                        "(needs perf; run.sh installs linux-perf if it is missing)")
    p.add_argument("--keep", action="store_true",
                   help="keep the working dir (configs, server logs, pid files) and print its path")
    p.add_argument("--results-dir", default=os.environ.get("RESULTS_DIR", ""), metavar="DIR",
                   help="where table.md, results.json and the raw wrk outputs go "
                   "(default $RESULTS_DIR, else target/load-results/<UTC time>)")
    p.add_argument("--no-build", action="store_true",
                   help="run.sh: skip cargo build and use the release binary already built")
    p.add_argument("--new-connections", action="store_true",
                   help="plain mode: wrk sends `Connection: close`, so every request is a new "
                        "connection (the CPU columns are then per connection)")
    p.add_argument("--baseline", metavar="BINARY",
                   help="plain mode: also drive another build of this balancer (round robin), "
                        "as target lb-rr-baseline right after lb-rr in every round, so that a "
                        "change's before and after are measured in the same interleaved rounds")
    p.add_argument("--binary", help=argparse.SUPPRESS)
    p.add_argument("--parse-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    # The command as typed: run.sh's own arguments, without the --binary it adds.
    typed = list(argv)
    if typed[:1] == ["--binary"]:
        typed = typed[2:]
    a.command = shlex.join([os.environ.get("LOAD_BENCH_SCRIPT", "benches/load/run.sh")] + typed)
    if a.duration < 1:
        p.error("--duration must be at least 1")
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    if not 1 <= a.backends <= 1000:
        p.error("--backends must be from 1 to 1000")
    try:
        a.connections = [int(c) for c in re.split(r"[,\s]+", a.connections.strip()) if c]
    except ValueError:
        p.error(f"--connections: not a list of numbers: {a.connections!r}")
    if not a.connections or any(c < 1 for c in a.connections):
        p.error("--connections needs at least one count, each at least 1")
    if a.tls:
        if a.cpu_profile:
            p.error("--cpu-profile is for the plain mode only (the TLS table has CPU per request)")
        try:
            a.handshake_connections = [int(c) for c in re.split(
                r"[,\s]+", (a.handshake_connections if a.handshake_connections is not None else "64").strip()) if c]
        except ValueError:
            p.error(f"--handshake-connections: not a list of numbers: {a.handshake_connections!r}")
        if any(c < 1 for c in a.handshake_connections):
            p.error("--handshake-connections: each count must be at least 1")
        known, default = TLS_TARGETS, TLS_DEFAULT
    else:
        if a.handshake_connections is not None:
            p.error("--handshake-connections needs --tls")
        known, default = TARGETS, TARGETS
    if a.only:
        wanted = [t.strip() for t in a.only.split(",") if t.strip()]
        if a.tls and "direct" in wanted:
            p.error("--only: `direct` has no TLS variant (the backends speak plain HTTP)")
        unknown = [t for t in wanted if t not in known]
        if unknown:
            p.error(f"--only: unknown target(s) {', '.join(unknown)}; known: {', '.join(known)}")
        a.targets = [t for t in known if t in wanted]
    else:
        a.targets = list(default)
    if a.new_connections and a.tls:
        p.error("--new-connections is for the plain mode (--tls has its own new-connection test)")
    if a.baseline:
        if a.tls:
            p.error("--baseline is for the plain mode only")
        if not os.access(a.baseline, os.X_OK):
            p.error(f"--baseline: {a.baseline} is not an executable file")
        a.baseline = os.path.abspath(a.baseline)
        after = a.targets.index("lb-rr") + 1 if "lb-rr" in a.targets else len(a.targets)
        a.targets.insert(after, BASELINE)
    if not a.parse_only and not a.binary:
        p.error("run it through benches/load/run.sh (it builds the binary and passes --binary)")
    return a


# ---------------------------------------------------------------- processes

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _child_setup():
    # In the child between fork and exec: get SIGTERM if this driver dies.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _proc_stats():
    """{pid: the fields of /proc/PID/stat after the command name} for every
    process now (fields[0] is field 3, the state; fields[1] the ppid)."""
    stats = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        stats[int(d)] = stat[stat.rfind(")") + 2:].split()
    return stats


def _children_of(pid):
    """PIDs whose parent is pid (nginx workers of a master), from /proc."""
    return [p for p, fields in _proc_stats().items() if len(fields) > 1 and fields[1] == str(pid)]


def tail(path, lines=20):
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return f"(no log at {path})"
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def log_excerpt(path):
    return f"its log ({path}; the working dir is kept with --keep) ends with:\n{tail(path)}"


class Procs:
    """The processes this run started; stop_all() ends exactly those."""

    def __init__(self):
        self.items = []  # (name, Popen)

    def start(self, name, argv, logfile, cwd, env=None):
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=cwd, env=env, start_new_session=True, preexec_fn=_child_setup,
            )
        self.items.append((name, proc))
        return proc

    def stop_all(self):
        for name, proc in reversed(self.items):
            if proc.poll() is not None:
                continue
            children = _children_of(proc.pid)
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log(f"{name} (pid {proc.pid}) still running {STOP_TIMEOUT:.0f} s after SIGTERM: SIGKILL")
                proc.kill()
                proc.wait()
            # Workers normally end with their master; if it had to be killed,
            # end those it had (still ours: same command name).
            for child in children:
                try:
                    with open(f"/proc/{child}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    continue
                if comm == os.path.basename(proc.args[0])[:15]:
                    try:
                        os.kill(child, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        self.items.clear()


def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_listening(name, port, proc, logfile):
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with status {proc.returncode} before listening on "
                             f"127.0.0.1:{port}; {log_excerpt(logfile)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{name} did not listen on 127.0.0.1:{port} within "
                             f"{START_TIMEOUT:.0f} s; {log_excerpt(logfile)}")
        time.sleep(0.05)


def check_answers(name, port, logfile, context=None):
    """One GET must come back 200 "ok\\n" (http.client: no proxy settings apply);
    over HTTPS with `context` (an ssl.SSLContext that verifies the certificate)."""
    deadline = time.monotonic() + START_TIMEOUT
    last = None
    while time.monotonic() < deadline:
        try:
            if context is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            else:
                conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
            conn.request("GET", "/")
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            if resp.status == 200 and body == b"ok\n":
                return
            last = f"status {resp.status}, body {body[:80]!r}"
        except (OSError, http.client.HTTPException) as e:
            last = str(e)
        time.sleep(0.2)
    raise BenchError(f"{name} on 127.0.0.1:{port} does not answer 200 \"ok\\n\" ({last}); "
                     f"{log_excerpt(logfile)}")


# ---------------------------------------------------------------- configs

def render(template, out, **values):
    with open(os.path.join(HERE, template)) as f:
        text = f.read()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise BenchError(f"{template}: no value for {', '.join(sorted(set(left)))}")
    with open(out, "w") as f:
        f.write(text)


def limits():
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile = soft if soft != resource.RLIM_INFINITY else 65536
    nofile = min(nofile, 65536)
    # Room for 256+ clients per proxy plus every pool's idle connections.
    worker_connections = max(1024, min(8192, nofile - 64))
    maxconn = max(512, min(8192, (nofile - 64) // 2))
    return nofile, worker_connections, maxconn


def nginx_temp_paths(d):
    """*_temp_path directives for every temp path this nginx build has."""
    build = subprocess.run(["nginx", "-V"], capture_output=True, text=True, timeout=10).stderr
    kinds = ["client_body", "proxy"] + [k for k in ("fastcgi", "uwsgi", "scgi")
                                        if f"--without-http_{k}_module" not in build]
    return "\n".join(f"    {k}_temp_path {d}/tmp/{k};" for k in kinds)


def start_nginx(procs, name, workdir, template, **values):
    d = os.path.join(workdir, name)
    os.makedirs(os.path.join(d, "tmp"))
    conf = os.path.join(d, "nginx.conf")
    nofile, worker_connections, _ = limits()
    render(template, conf, DIR=d, NOFILE=nofile, WORKER_CONNECTIONS=worker_connections,
           NAME=name, TEMP_PATHS=nginx_temp_paths(d), **values)
    logfile = os.path.join(d, "stderr.log")
    # -p: every relative path (temp dirs) under d; -e: never /var/log.
    proc = procs.start(name, ["nginx", "-p", d + "/", "-c", conf, "-e", os.path.join(d, "error.log")],
                       logfile, cwd=d)
    return proc, [logfile, os.path.join(d, "error.log")]


def lb_config(port, backends, strategy, worker_threads):
    if strategy == "weighted-round-robin":
        servers = [{"address": f"127.0.0.1:{b}", "weight": WRR_WEIGHTS[i % len(WRR_WEIGHTS)]}
                   for i, b in enumerate(backends)]
    else:
        servers = [f"127.0.0.1:{b}" for b in backends]
    cfg = {
        "listen_address": f"127.0.0.1:{port}",
        "backend_servers": servers,
        "strategy": strategy,
        "health_check_interval": 30,
        **LB_EXTRA.get(strategy, {}),
    }
    if worker_threads:
        cfg["worker_threads"] = LB_THREADS
    return cfg


def lb_check(binary, path):
    r = subprocess.run([binary, "--check", "--config", path], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120)
    return r.returncode == 0, (r.stdout + r.stderr).strip()


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------- wrk

UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}


def parse_wrk(text):
    """req/s, p50 ms, p99 ms, errors from `wrk --latency` output; None if it has no result."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if not rps:
        return None

    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M)
        return float(m.group(1)) * UNIT_MS[m.group(2)] if m else float("nan")

    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors += sum(int(g) for g in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    requests = re.search(r"^\s*(\d+) requests in", text, re.M)
    return {
        "rps": float(rps.group(1)),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "errors": errors,
        "requests": int(requests.group(1)) if requests else None,
    }


def run_wrk(port, conns, seconds, out_path, scheme="http", headers=(), host="127.0.0.1"):
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency"]
    for h in headers:
        argv += ["-H", h]
    argv.append(f"{scheme}://{host}:{port}/")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=_child_setup)
    try:
        out, _ = proc.communicate(timeout=seconds + 30)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        status = "killed after a timeout"
    except BaseException:  # interrupted: end this wrk before the servers
        proc.kill()
        proc.wait()
        raise
    text = out.decode(errors="replace")
    with open(out_path, "w") as f:
        f.write(f"$ {shlex.join(argv)}\n{text}\n[exit status: {status}]\n")
    return parse_wrk(text) if status == 0 else None


# ---------------------------------------------------------------- CPU profile

# Symbols of the strategy call: the wasm host (wasmtime, the lowering crate,
# compiled guest code) or a native strategy, and the guard around either.
STRATEGY_SYMBOLS = re.compile(r"\[JIT\]|wasmtime|cranelift|strategy_abi|WasmStrategy|"
                              r"balancer::native::|Balancer::select")


def start_profile(delay, seconds, out_path):
    """perf record of every CPU from `delay` to `delay + seconds` from now,
    in the background."""
    argv = ["sh", "-c", f"sleep {delay} && exec perf record -a -e cpu-clock -F 999 "
            f"-o {shlex.quote(out_path)} -- sleep {seconds}"]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=_child_setup)


def _report(data_path, *extra):
    """(samples, comm, dso and symbol) rows of `perf report` on data_path."""
    r = subprocess.run(["perf", "report", "-i", data_path, "--no-children", "--stdio",
                        "-g", "none", "-n", "-t", "\t", *extra],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    for line in r.stdout.splitlines():
        parts = [p.strip() for p in line.split("\t")]
        if len(parts) >= 3 and parts[0].endswith("%") and parts[1].isdigit():
            yield int(parts[1]), parts[2], " ".join(parts[3:])


def profile_shares(data_path, pid):
    """(strategy %, balancer %) of the busy (non-idle) CPU samples in a
    perf.data, for the balancer process `pid`; None if perf could not read it.
    Only that process counts: the other balancers of the run are idle but
    alive (their sandbox clock threads tick)."""
    busy = sum(n for n, comm, _ in _report(data_path, "--sort", "comm") if comm != "swapper")
    strategy = balancer = 0
    for samples, comm, rest in _report(data_path, "--pid", str(pid), "--sort", "comm,dso,sym"):
        balancer += samples
        # The sandbox clock thread exists only for wasm strategies.
        if comm == "wasm-epoch" or STRATEGY_SYMBOLS.search(rest):
            strategy += samples
    if busy <= 0 or balancer <= 0:
        return None
    return 100 * strategy / busy, 100 * balancer / busy


# ---------------------------------------------------------------- report

def first_line(argv):
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def versions(binary, tls=False):
    nginx = first_line(["nginx", "-v"]).replace("nginx version: ", "")
    haproxy = first_line(["haproxy", "-v"])
    m = re.search(r"version (\S+)", haproxy)
    haproxy = f"HAProxy {m.group(1)}" if m else haproxy
    wrk = first_line(["wrk", "-v"]).split()
    wrk = f"wrk {wrk[1]}" if len(wrk) > 1 else "wrk unknown"
    lb = first_line([binary, "--version"])
    git = "not a git checkout"
    try:
        sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        if sha:
            dirty = subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--"],
                                   capture_output=True, timeout=10).returncode != 0
            git = f"git {sha}" + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    if tls:
        openssl = first_line(["openssl", "version"]).split(" (")[0]
        rustls = "rustls unknown"
        try:
            with open(os.path.join(ROOT, "Cargo.lock")) as f:
                m = re.search(r'name = "rustls"\nversion = "([^"]+)"', f.read())
            rustls = f"rustls {m.group(1)}" if m else "no rustls in Cargo.lock"
        except OSError:
            pass
        return f"{nginx}, {haproxy}, {wrk}, all three on {openssl}; {lb} ({git}) on {rustls}"
    return f"{nginx}, {haproxy}, {wrk}; {lb} ({git})"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def fmt(v, digits):
    return "–" if v is None or v != v else f"{v:.{digits}f}"


def table(args, results, started_at, binary, notes, lb_threads_note):
    lines = [
        "## Load benchmark: rust_load_balancer vs NGINX vs HAProxy",
        "",
        f"- date: {started_at:%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} CPUs (nproc), "
        f"{cpu_model()}, Linux {os.uname().release}",
        f"- versions: {versions(binary)}",
        "- setup: 2 workers/threads for every balancer, backends: 1 nginx worker, wrk -t1"
        f"{lb_threads_note}; {args.backends} backends answering 200 \"ok\\n\"; loopback only",
        f"- run: {args.duration} s per measurement after a {WARMUP_SECONDS} s warm-up, "
        f"{args.rounds} interleaved round(s), medians over rounds (errors summed); "
        f"connections {' '.join(map(str, args.connections))}; "
        "vs nginx-rr / vs direct: req/s ratio at the same connections",
        f"- command: `{args.command}`",
        "",
    ]
    if args.new_connections:
        lines[-1:-1] = ["- new connections: wrk sends `Connection: close`, so every request "
                        "is a new client connection (the backends stay kept alive)"]
    if args.baseline:
        lines[-1:-1] = [f"- lb-rr-baseline: round robin on another build, `{args.baseline}` "
                        f"({first_line([args.baseline, '--version'])})"]
    header = ("| target | conns | req/s | p50 ms | p99 ms | errors | vs nginx-rr | vs direct "
              "| CPU µs/req | user µs | sys µs | CPU vs nginx-rr |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    lines[-1:-1] = [
        "- CPU µs/req: utime+stime of the target's whole process tree (/proc) over the measured "
        "run, divided by its requests (for direct: the backends' nginx); CPU vs nginx-rr: median "
        "of the per-round ratios of CPU per request",
    ]
    if args.cpu_profile:
        header += " strategy % CPU | balancer % CPU |"
        rule += "---:|---:|"
        lines[-1:-1] = [
            "- CPU columns (--cpu-profile): medians of the share of all busy CPU samples "
            "(`perf record -a`, every process on the machine) spent in the strategy call "
            "and in the balancer; with every core busy, the strategy column is what the "
            "call costs in throughput",
        ]
    lines += [header, rule]

    def median_rps(target, conns):
        runs = [r for r in results.get((target, conns), []) if r]
        return statistics.median(r["rps"] for r in runs) if runs else None

    for target in args.targets:
        for conns in args.connections:
            if (target, conns) not in results:
                continue
            all_runs = results[(target, conns)]
            runs = [r for r in all_runs if r]
            failed = len(all_runs) - len(runs)
            rps = median_rps(target, conns)
            p50 = statistics.median(r["p50_ms"] for r in runs) if runs else None
            p99 = statistics.median(r["p99_ms"] for r in runs) if runs else None
            errors = str(sum(r["errors"] for r in runs))
            if failed:
                errors += f" ({failed} run(s) failed)"
            ratios = []
            for ref in ("nginx-rr", "direct"):
                ref_rps = median_rps(ref, conns)
                ratios.append(fmt(rps / ref_rps, 2) if rps and ref_rps else "–")
            med = lambda key: (statistics.median(r[key] for r in runs if r.get(key))
                               if any(r.get(key) for r in runs) else None)
            # Per round: this target's CPU per request over nginx-rr's in that round.
            cpu_ratios = [m["cpu_us"] / n["cpu_us"]
                          for m, n in zip(all_runs, results.get(("nginx-rr", conns), []))
                          if m and n and m.get("cpu_us") and n.get("cpu_us")]
            cpu_ratio = fmt(statistics.median(cpu_ratios), 2) if cpu_ratios else "–"
            row = (f"| {target} | {conns} | {fmt(rps, 0)} | {fmt(p50, 2)} | {fmt(p99, 2)} "
                   f"| {errors} | {ratios[0]} | {ratios[1]} | {fmt(med('cpu_us'), 1)} "
                   f"| {fmt(med('cpu_user_us'), 1)} | {fmt(med('cpu_sys_us'), 1)} | {cpu_ratio} |")
            if args.cpu_profile:
                for key in ("strategy_cpu_pct", "balancer_cpu_pct"):
                    values = [r[key] for r in runs if r.get(key) is not None]
                    row += f" {fmt(statistics.median(values), 2) if values else '–'} |"
            lines.append(row)
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def start_backends(procs, workdir, backends):
    """The backends: one server block per port in one nginx (1 worker), each
    answering 200 "ok\\n"; returns once every one answers."""
    servers = "\n".join(
        f"    server {{\n        listen 127.0.0.1:{b};\n        return 200 \"ok\\n\";\n    }}" for b in backends)
    proc, logfiles = start_nginx(procs, "backends", workdir, "nginx-backends.conf.in", SERVERS=servers)
    for b in backends:
        wait_listening("backend nginx", b, proc, logfiles[-1])
    for b in backends:
        check_answers("backend nginx", b, logfiles[-1])
    return proc, logfiles


def save_logs(logs, notes, results_dir):
    """Notes on problems seen in the servers' logs (the balancer logs at warn
    and above), and copies of the logs beside the results (the working dir
    goes away)."""
    for name, paths in logs.items():
        problem = log_problems(name, paths)
        if problem:
            notes.append(problem)
    for name, paths in logs.items():
        for p in paths:
            if os.path.exists(p):
                os.makedirs(os.path.join(results_dir, "logs", name), exist_ok=True)
                dest = os.path.join(results_dir, "logs", name, os.path.basename(p))
                with open(p, "rb") as src, open(dest, "wb") as dst:
                    src.seek(max(0, os.path.getsize(p) - 256 * 1024))
                    dst.write(src.read())


def log_problems(name, paths):
    """Count warning/error lines in a target's logs (ANSI colours removed)."""
    count, sample = 0, []
    for path in paths:
        try:
            with open(path, errors="replace") as f:
                for line in f:
                    line = re.sub(r"\x1b\[[0-9;]*m", "", line).rstrip()
                    if re.search(r"\b(WARN|ERROR)\b|\[(warn|error|crit|alert|emerg)\]|\[(WARNING|ALERT)\]", line):
                        count += 1
                        if len(sample) < 3:
                            sample.append(line[:200])
        except OSError:
            pass
    if not count:
        return None
    return f"{name}: {count} warning/error line(s) in its log, e.g. " + " / ".join(f"`{s}`" for s in sample)


# ---------------------------------------------------------------- TLS

def make_certificate(workdir):
    """One self-signed ECDSA P-256 certificate for CN/SAN localhost and IP
    127.0.0.1, made with openssl: cert.pem, key.pem (PKCS#8) and
    combined.pem (both, for HAProxy) in workdir."""
    cert, key = os.path.join(workdir, "cert.pem"), os.path.join(workdir, "key.pem")
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", key, "-out", cert, "-days", str(CERT_DAYS), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise BenchError(f"openssl req failed ({r.returncode}): {(r.stdout + r.stderr).strip()}")
    combined = os.path.join(workdir, "combined.pem")
    with open(combined, "w") as out:
        for path in (cert, key):
            with open(path) as f:
                out.write(f.read())
    return cert, key, combined


def haproxy_has_openssl():
    """(True, "") if `haproxy -vv` says it was built with OpenSSL, else (False, why)."""
    try:
        r = subprocess.run(["haproxy", "-vv"], stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"`haproxy -vv` failed: {e}"
    out = r.stdout + r.stderr
    if "USE_OPENSSL=1" in out or re.search(r"^Built with OpenSSL version", out, re.M):
        return True, ""
    return False, "`haproxy -vv` shows no OpenSSL (USE_OPENSSL), so this haproxy cannot terminate TLS"


def wrk_tls_host(notes):
    """The host name wrk is given for https: `localhost` when it resolves to
    127.0.0.1 only, so wrk sends a valid SNI (it sends the URL's host, and
    an IP address there is not allowed: rustls ignores it with a WARN log
    line per handshake), else 127.0.0.1 with a note."""
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo("localhost", 443, type=socket.SOCK_STREAM)}
    except OSError as e:
        addrs = {f"error: {e}"}
    if addrs == {"127.0.0.1"}:
        return "localhost"
    notes.append(f"`localhost` resolves to {', '.join(sorted(addrs))}, not only 127.0.0.1, so wrk was "
                 "given 127.0.0.1 and sent that as SNI (invalid; rustls logs a warning per handshake)")
    log(notes[-1])
    return "127.0.0.1"


def tls_context(cafile):
    """A client context that verifies the run's certificate (its own CA)."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _tls_get(ctx, port, session=None):
    """One GET / with `Connection: close` over a new TLS connection to
    127.0.0.1 (SNI and name check: localhost); returns (status line, facts)
    after the whole answer was read, so TLS 1.3 tickets sent after the
    handshake are in the session. `close_notify`: whether the server ended
    the connection with one (else a bare TCP close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session,
                             suppress_ragged_eofs=False) as tls:
            # Read now: after a bare TCP close OpenSSL no longer says.
            facts = {"protocol": tls.version(), "cipher": tls.cipher()[0],
                     "reused": tls.session_reused, "close_notify": True}
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                try:
                    chunk = tls.recv(65536)
                except ssl.SSLEOFError:
                    facts["close_notify"] = False
                    break
                if not chunk:
                    break
                data += chunk
            facts["session"] = tls.session
            return data.split(b"\r\n", 1)[0].decode(errors="replace"), facts


def tls_probe(port, cafile):
    """What a client gets from a target: protocol, cipher and key exchange
    group as wrk's OpenSSL negotiates them (`openssl s_client`, no ALPN),
    whether TLS 1.2 alone is accepted, whether the target resumes a
    session from its own ticket and ends a `Connection: close` answer with a
    close_notify (Python's ssl, which verifies the certificate). Only facts, no pass or fail: fairness notes for the table."""
    facts = {}
    ctx = tls_context(cafile)
    try:
        status, first = _tls_get(ctx, port)
        facts["protocol"], facts["cipher"] = first["protocol"], first["cipher"]
        facts["close_notify"] = first["close_notify"]
        if not status.startswith("HTTP/1.1 200"):
            facts["error"] = f"answered {status!r}"
        _, second = _tls_get(ctx, port, session=first["session"])
        facts["resumes"] = bool(second["reused"])
    except (OSError, ssl.SSLError) as e:
        facts["error"] = f"{type(e).__name__}: {e}"

    def s_client(*extra):
        try:
            r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                                "-servername", "localhost", "-brief", *extra],
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
            return r.returncode, r.stdout + r.stderr
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, str(e)

    _, out = s_client()
    m = re.search(r"^(?:Server|Peer) Temp Key: (.+)$", out, re.M)
    facts["group"] = m.group(1).split(",")[0].strip() if m else "?"
    m = re.search(r"^Signature type: (.+)$", out, re.M)
    facts["signature"] = m.group(1).strip() if m else "?"
    code, out = s_client("-tls1_2")
    m = re.search(r"^Ciphersuite: (.+)$", out, re.M)
    facts["tls12"] = m.group(1).strip() if code == 0 and m else "refused"
    return facts


def tree_cpu(pid):
    """{pid: (utime, stime)} in clock ticks for pid and all its descendants
    (the nginx master and its workers; a thread's time is in its process's)."""
    # fields[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
    stats = {p: (int(f[1]), int(f[11]), int(f[12])) for p, f in _proc_stats().items()}
    tree, todo = {}, [pid]
    while todo:
        p = todo.pop()
        if p in stats and p not in tree:
            tree[p] = stats[p][1:]
            todo += [c for c, (ppid, _, _) in stats.items() if ppid == p]
    return tree


def cpu_delta(before, after):
    """(user s, system s) spent between two tree_cpu() snapshots by the
    processes alive at the second (a worker started in between counts whole)."""
    tick = os.sysconf("SC_CLK_TCK")
    user = sum(u - before.get(p, (0, 0))[0] for p, (u, _) in after.items())
    system = sum(s - before.get(p, (0, 0))[1] for p, (_, s) in after.items())
    return user / tick, system / tick



def takes_worker_threads(ok, out, notes):
    """From `--check` of a probe config with `worker_threads` (whether it
    passed, and its output): whether the build takes the key, and the
    setup line's note if not (also added to `notes` and logged)."""
    if ok or "worker_threads" not in out:
        return True, ""
    notes.append(f"`--check` rejected `worker_threads`, so it was left out of the balancer's configs "
                 f"(tokio's default: one worker thread per CPU, {os.cpu_count()} here): {out.splitlines()[0]}")
    log(notes[-1])
    return False, " (balancer: this build rejects `worker_threads`, so tokio's default of one per CPU)"


def with_cpu(pid, run):
    """run() (a wrk run, returning its result or None) with the CPU time of
    the process tree of `pid` over it added to the result: cpu_user_us,
    cpu_sys_us and cpu_us per request."""
    before = tree_cpu(pid)
    r = run()
    after = tree_cpu(pid)
    if r is not None and r.get("requests"):
        user, system = cpu_delta(before, after)
        r["cpu_user_s"], r["cpu_sys_s"] = user, system
        r["cpu_user_us"] = user * 1e6 / r["requests"]
        r["cpu_sys_us"] = system * 1e6 / r["requests"]
        r["cpu_us"] = r["cpu_user_us"] + r["cpu_sys_us"]
        r["processes"] = len(after)
    return r

def lb_tls_config(port, tls_port, backends, strategy, worker_threads):
    """The plain config plus a TLS listener with the run's certificate
    (paths relative to the config file, which is in the working dir)."""
    plain = lb_config(port, backends, strategy, worker_threads)
    cfg = {"listen_address": plain.pop("listen_address"),
           "tls_listen_address": f"127.0.0.1:{tls_port}",
           "tls_certificates": [{"cert": "cert.pem", "key": "key.pem"}]}
    cfg.update(plain)
    return cfg


def tls_tests(args):
    return ([(KEEP_ALIVE, c) for c in args.connections]
            + [(NEW_CONN, c) for c in args.handshake_connections])


def tls_table(args, results, started_at, binary, notes, lb_threads_note, probes):
    lines = [
        "## TLS load benchmark: rust_load_balancer vs NGINX vs HAProxy",
        "",
        f"- date: {started_at:%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} CPUs (nproc), "
        f"{cpu_model()}, Linux {os.uname().release}",
        f"- versions: {versions(binary, tls=True)}",
        f"- setup: HTTPS from wrk (`https://{args.wrk_host}:port/`, so SNI `{args.wrk_host}`) to each balancer, plain HTTP with keep-alive to the backends; "
        "2 workers/threads for every balancer, backends: 1 nginx worker, wrk -t1"
        f"{lb_threads_note}; {args.backends} backends answering 200 \"ok\\n\"; loopback only",
        "- TLS: one self-signed ECDSA P-256 certificate (openssl) for all; TLS 1.2 and 1.3 on; "
        "cipher suites, groups and session tickets as each server's defaults (negotiated values below)",
        f"- run: {args.duration} s per measurement after a {WARMUP_SECONDS} s warm-up, "
        f"{args.rounds} interleaved round(s), medians over rounds (errors summed)",
        f"- tests: `{KEEP_ALIVE}` HTTPS keep-alive at {' '.join(map(str, args.connections))} connections"
        + (f"; `{NEW_CONN}`: wrk `-H \"Connection: close\"` at "
           f"{' '.join(map(str, args.handshake_connections))} connections, every request a new TCP and "
           "TLS connection, so req/s is new TLS connections/s and CPU per request is per handshake "
           "(wrk offers its last session again on each reconnect: see `resumes` below)"
           if args.handshake_connections else ""),
        "- CPU µs/req: utime+stime of the balancer's whole process tree (/proc) over the measured run, "
        "divided by the requests wrk completed; vs nginx-rr (req/s): ratio of medians; "
        "CPU vs nginx-rr: median of the per-round ratios of CPU per request",
        f"- command: `{args.command}`",
        "",
        "| target | test | conns | req/s | p50 ms | p99 ms | errors | vs nginx-rr | CPU µs/req "
        "| user µs | sys µs | CPU vs nginx-rr |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def runs_of(key):
        return [r for r in results.get(key, []) if r]

    def med(key, field):
        values = [r[field] for r in runs_of(key) if r.get(field) is not None]
        return statistics.median(values) if values else None

    for target in args.targets:
        for test, conns in tls_tests(args):
            key = (target, test, conns)
            if key not in results:
                continue
            all_runs = results[key]
            runs = runs_of(key)
            failed = len(all_runs) - len(runs)
            rps = med(key, "rps")
            errors = str(sum(r["errors"] for r in runs))
            if failed:
                errors += f" ({failed} run(s) failed)"
            ref = med(("nginx-rr", test, conns), "rps")
            ratio = fmt(rps / ref, 2) if rps and ref else "–"
            # Per round: this target's CPU per request over nginx-rr's in that round.
            cpu_ratios = []
            for mine, theirs in zip(all_runs, results.get(("nginx-rr", test, conns), [])):
                if mine and theirs and mine.get("cpu_us") and theirs.get("cpu_us"):
                    cpu_ratios.append(mine["cpu_us"] / theirs["cpu_us"])
            cpu_ratio = fmt(statistics.median(cpu_ratios), 2) if cpu_ratios else "–"
            lines.append(
                f"| {target} | {test} | {conns} | {fmt(rps, 0)} | {fmt(med(key, 'p50_ms'), 2)} "
                f"| {fmt(med(key, 'p99_ms'), 2)} | {errors} | {ratio} | {fmt(med(key, 'cpu_us'), 1)} "
                f"| {fmt(med(key, 'cpu_user_us'), 1)} | {fmt(med(key, 'cpu_sys_us'), 1)} | {cpu_ratio} |")
    lines += [
        "",
        "Negotiated with each target (`openssl s_client`, the library wrk uses, no ALPN; "
        "`resumes`: a second connection offering the first one's session was resumed; "
        "`close_notify`: a `Connection: close` answer ends with one, not a bare TCP close; Python ssl):",
        "",
        "| target | protocol | cipher | group | signature | TLS 1.2 alone | resumes | close_notify |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for target in args.targets:
        f = probes.get(target)
        if not f:
            continue
        def yes_no(key):
            return "yes" if f.get(key) else ("no" if key in f else "–")
        lines.append(f"| {target} | {f.get('protocol', '–')} | {f.get('cipher', '–')} | {f.get('group', '?')} "
                     f"| {f.get('signature', '?')} | {f.get('tls12', '?')} | {yes_no('resumes')} "
                     f"| {yes_no('close_notify')} |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def run_tls(args, procs, workdir, results_dir, started_at):
    """--tls: every target terminates TLS in front of the same plain backends."""
    notes = []
    targets = list(args.targets)
    lb_threads_note = ""
    cert, key, combined = make_certificate(workdir)

    if any(t.startswith("haproxy-") for t in targets):
        ok, why = haproxy_has_openssl()
        if not ok:
            for t in [t for t in targets if t.startswith("haproxy-")]:
                targets.remove(t)
            notes.append(f"haproxy targets skipped: {why}")
            log(notes[-1])
    lb_targets = [t for t in targets if t in LB_STRATEGIES]

    # Ports: the backends, then a TLS port per target and a plain one per
    # balancer target (its config needs a plain listener too; nothing uses it).
    ports = free_ports(args.backends + len(targets) + len(lb_targets))
    backends = ports[:args.backends]
    target_ports = dict(zip(targets, ports[args.backends:]))
    plain_ports = dict(zip(lb_targets, ports[args.backends + len(targets):]))

    lb_configs = {}
    if lb_targets:
        probe = os.path.join(workdir, "probe.json")
        first = lb_targets[0]
        write_json(probe, lb_tls_config(plain_ports[first], target_ports[first], backends,
                                        "round-robin", True))
        ok, out = lb_check(args.binary, probe)
        out = out.replace(workdir + os.sep, "")
        if not ok and re.search(r"tls_listen_address|tls_certificates", out):
            raise BenchError("this balancer build does not take a TLS listener (`--check` of "
                             f"{probe}: {out.splitlines()[0] if out else 'no output'}); "
                             "leave its targets out with --only nginx-rr,haproxy-rr")
        worker_threads, lb_threads_note = takes_worker_threads(ok, out, notes)
        for t in lb_targets:
            path = os.path.join(workdir, f"{t}.json")
            write_json(path, lb_tls_config(plain_ports[t], target_ports[t], backends,
                                           LB_STRATEGIES[t], worker_threads))
            ok, out = lb_check(args.binary, path)
            out = out.replace(workdir + os.sep, "")
            if ok:
                lb_configs[t] = path
            elif t in OPTIONAL:
                notes.append(f"{t} skipped: `--check` rejected strategy `{LB_STRATEGIES[t]}`: "
                             f"{out.splitlines()[0] if out else '(no output)'}")
                log(notes[-1])
                targets.remove(t)
            else:
                raise BenchError(f"{t}: `rust_load_balancer --check` rejected {path}:\n{out}")

    logs = {}
    backend_proc, logs["backends"] = start_backends(procs, workdir, backends)
    running = {}
    _, _, maxconn = limits()
    for t in targets:
        port = target_ports[t]
        if t in ("nginx-rr", "nginx-lc"):
            servers = "\n".join(f"        server 127.0.0.1:{b};" for b in backends)
            proc, logs[t] = start_nginx(procs, t, workdir, "nginx-proxy-tls.conf.in", PORT=port,
                                        SERVERS=servers, CERT=cert, KEY=key,
                                        METHOD="least_conn;" if t == "nginx-lc" else "")
        elif t in ("haproxy-rr", "haproxy-lc"):
            cfg = os.path.join(workdir, f"{t}.cfg")
            servers = "\n".join(f"    server b{i} 127.0.0.1:{b}" for i, b in enumerate(backends, 1))
            render("haproxy-tls.cfg.in", cfg, NAME=t, PORT=port, MAXCONN=maxconn, SERVERS=servers,
                   CRT=combined, METHOD="leastconn" if t == "haproxy-lc" else "roundrobin")
            logs[t] = [os.path.join(workdir, f"{t}.log")]
            proc = procs.start(t, ["haproxy", "-db", "-f", cfg], logs[t][0], cwd=workdir)
        else:
            logs[t] = [os.path.join(workdir, f"{t}.log")]
            env = dict(os.environ, RUST_LOG="warn")
            proc = procs.start(t, [args.binary, "--config", lb_configs[t]], logs[t][0], cwd=workdir, env=env)
        running[t] = (proc, logs[t])
    ctx = tls_context(cert)
    for t in targets:
        wait_listening(t, target_ports[t], running[t][0], running[t][1][-1])
    for t in targets:
        check_answers(t, target_ports[t], running[t][1][-1], context=ctx)
    log("all started: " + ", ".join(f"{t} :{target_ports[t]} (TLS)" for t in targets)
        + f"; backends :{' :'.join(map(str, backends))}")
    probes = {}
    for t in targets:
        probes[t] = tls_probe(target_ports[t], cert)
        log(f"{t}: " + ", ".join(f"{k} {v}" for k, v in probes[t].items()))
        if "error" in probes[t]:
            notes.append(f"{t}: the TLS probe failed: {probes[t]['error']}")

    tests = tls_tests(args)
    host = args.wrk_host = wrk_tls_host(notes)
    per_run = args.duration + WARMUP_SECONDS
    total = per_run * len(targets) * len(tests) * args.rounds
    log(f"{len(targets)} targets x {len(tests)} tests x {args.rounds} rounds "
        f"x ({WARMUP_SECONDS} s warm-up + {args.duration} s): about {total // 60} min {total % 60} s")
    results = {(t, test, c): [] for t in targets for test, c in tests}
    raw_rows = []
    dead = set()
    for rnd in range(1, args.rounds + 1):
        for t in round_order(targets, rnd):
            proc, target_logs = running[t]
            for test, conns in tests:
                if t not in dead and proc.poll() is not None:
                    dead.add(t)
                    notes.append(f"{t} exited with status {proc.returncode} during the run; "
                                 "its log ends with: `" + tail(target_logs[-1], 3).replace("\n", " / ") + "`")
                    log(notes[-1])
                if t in dead:
                    results[(t, test, conns)].append(None)
                    continue
                headers = ["Connection: close"] if test == NEW_CONN else []
                base = os.path.join(results_dir, "wrk", f"r{rnd}-{t}-{test}-c{conns}")
                run_wrk(target_ports[t], conns, WARMUP_SECONDS, base + ".warmup.txt", "https", headers, host)
                r = with_cpu(proc.pid, lambda: run_wrk(target_ports[t], conns, args.duration,
                                                       base + ".txt", "https", headers, host))
                results[(t, test, conns)].append(r)
                raw_rows.append({"round": rnd, "target": t, "test": test, "connections": conns, "result": r})
                if r:
                    log(f"round {rnd}/{args.rounds} {t:13} {test:10} c={conns:<4} {r['rps']:9.0f} req/s  "
                        f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}  "
                        f"CPU {fmt(r.get('cpu_us'), 1)} µs/req")
                else:
                    log(f"round {rnd}/{args.rounds} {t:13} {test:10} c={conns:<4} wrk gave no result, see {base}.txt")

    save_logs(logs, notes, results_dir)
    args.targets = targets
    text = tls_table(args, results, started_at, args.binary, notes, lb_threads_note, probes)
    with open(os.path.join(results_dir, "table.md"), "w") as f:
        f.write(text)
    write_json(os.path.join(results_dir, "results.json"), {
        "mode": "tls", "started_at": started_at.isoformat(), "duration": args.duration,
        "rounds": args.rounds, "connections": args.connections,
        "handshake_connections": args.handshake_connections, "ports": target_ports,
        "tls": {t: {k: v for k, v in f.items()} for t, f in probes.items()},
        "summary": tls_summary(args, results), "runs": raw_rows, "notes": notes,
    })
    print(text, flush=True)
    log(f"table written to {os.path.join(results_dir, 'table.md')} (raw wrk outputs in {results_dir}/wrk)")
    return 0


def tls_summary(args, results):
    """The table's medians, machine-readable, for results.json."""
    rows = []
    for (target, test, conns), all_runs in results.items():
        runs = [r for r in all_runs if r]
        row = {"target": target, "test": test, "connections": conns, "runs": len(runs),
               "errors": sum(r["errors"] for r in runs)}
        for field in ("rps", "p50_ms", "p99_ms", "cpu_us", "cpu_user_us", "cpu_sys_us"):
            values = [r[field] for r in runs if r.get(field) is not None]
            row[field] = statistics.median(values) if values else None
        ref = results.get(("nginx-rr", test, conns), [])
        ratios = [m["cpu_us"] / n["cpu_us"] for m, n in zip(all_runs, ref)
                  if m and n and m.get("cpu_us") and n.get("cpu_us")]
        row["cpu_vs_nginx_rr"] = statistics.median(ratios) if ratios else None
        ref_rps = [n["rps"] for n in ref if n]
        row["rps_vs_nginx_rr"] = (row["rps"] / statistics.median(ref_rps)
                                  if row["rps"] and ref_rps else None)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- main

def main(argv):
    args = parse_args(argv)
    if args.parse_only:
        return 0
    for tool in ("wrk", "nginx", "haproxy") + (("openssl",) if args.tls else ()):
        if not shutil.which(tool):
            raise BenchError(f"{tool} not found on PATH")
    started_at = datetime.datetime.now(datetime.timezone.utc)
    results_dir = args.results_dir or os.path.join(
        ROOT, "target", "load-results", started_at.strftime("%Y%m%dT%H%M%SZ"))
    results_dir_is_new = not os.path.exists(results_dir)
    os.makedirs(os.path.join(results_dir, "wrk"), exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="lb-load.")
    log(f"working dir {workdir}; results in {results_dir}")

    procs = Procs()

    def on_signal(signum, _frame):
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        raise KeyboardInterrupt(f"signal {signum}")

    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, on_signal)

    try:
        return (run_tls if args.tls else run)(args, procs, workdir, results_dir, started_at)
    except KeyboardInterrupt:
        log("interrupted: stopping what this run started")
        return 130
    finally:
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        procs.stop_all()
        if results_dir_is_new and not os.listdir(os.path.join(results_dir, "wrk")):
            shutil.rmtree(results_dir, ignore_errors=True)  # nothing was measured
        if args.keep:
            log(f"kept the working dir {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args, procs, workdir, results_dir, started_at):
    notes = []
    targets = list(args.targets)
    lb_targets = [t for t in targets if t in LB_STRATEGIES]
    lb_threads_note = ""

    # The balancer's configs, checked before anything starts.
    n_ports = args.backends + len(targets)
    ports = free_ports(n_ports)
    backends = ports[:args.backends]
    target_ports = dict(zip(targets, ports[args.backends:]))
    target_ports["direct"] = backends[0]
    lb_configs = {}
    if lb_targets:
        probe = os.path.join(workdir, "probe.json")
        write_json(probe, lb_config(target_ports[lb_targets[0]], backends, "round-robin", True))
        ok, out = lb_check(args.binary, probe)
        worker_threads, lb_threads_note = takes_worker_threads(ok, out, notes)
        for t in lb_targets:
            path = os.path.join(workdir, f"{t}.json")
            write_json(path, lb_config(target_ports[t], backends, LB_STRATEGIES[t], worker_threads))
            ok, out = lb_check(args.binary, path)
            out = out.replace(workdir + os.sep, "")
            if ok:
                lb_configs[t] = path
            elif t in OPTIONAL:
                notes.append(f"{t} skipped: `--check` rejected strategy `{LB_STRATEGIES[t]}`: {out.splitlines()[0] if out else '(no output)'}")
                log(notes[-1])
                targets.remove(t)
            else:
                raise BenchError(f"{t}: `rust_load_balancer --check` rejected {path}:\n{out}")

    # Backends first, then every target.
    logs = {}
    proc, logs["backends"] = start_backends(procs, workdir, backends)

    running = {"direct": (proc, logs["backends"])}
    _, _, maxconn = limits()
    for t in targets:
        port = target_ports[t]
        if t in ("nginx-rr", "nginx-lc"):
            servers = "\n".join(f"        server 127.0.0.1:{b};" for b in backends)
            proc, logs[t] = start_nginx(procs, t, workdir, "nginx-proxy.conf.in", PORT=port,
                                        SERVERS=servers, METHOD="least_conn;" if t == "nginx-lc" else "")
        elif t in ("haproxy-rr", "haproxy-lc"):
            cfg = os.path.join(workdir, f"{t}.cfg")
            servers = "\n".join(f"    server b{i} 127.0.0.1:{b}" for i, b in enumerate(backends, 1))
            render("haproxy.cfg.in", cfg, NAME=t, PORT=port, MAXCONN=maxconn, SERVERS=servers,
                   METHOD="leastconn" if t == "haproxy-lc" else "roundrobin")
            logs[t] = [os.path.join(workdir, f"{t}.log")]
            proc = procs.start(t, ["haproxy", "-db", "-f", cfg], logs[t][0], cwd=workdir)
        elif t in LB_STRATEGIES:
            logs[t] = [os.path.join(workdir, f"{t}.log")]
            env = dict(os.environ, RUST_LOG="warn")
            binary = args.baseline if t == BASELINE else args.binary
            proc = procs.start(t, [binary, "--config", lb_configs[t]], logs[t][0], cwd=workdir, env=env)
        else:  # direct
            continue
        running[t] = (proc, logs[t])
    for t in targets:
        if t != "direct":
            wait_listening(t, target_ports[t], running[t][0], running[t][1][-1])
    for t in targets:
        check_answers(t, target_ports[t], running[t][1][-1])
    log("all started: " + ", ".join(f"{t} :{target_ports[t]}" for t in targets)
        + f"; backends :{' :'.join(map(str, backends))}")

    # Interleaved rounds.
    per_run = args.duration + WARMUP_SECONDS
    total = per_run * len(targets) * len(args.connections) * args.rounds
    log(f"{len(targets)} targets x {len(args.connections)} connection counts x {args.rounds} rounds "
        f"x ({WARMUP_SECONDS} s warm-up + {args.duration} s): about {total // 60} min {total % 60} s")
    results = {(t, c): [] for t in targets for c in args.connections}
    raw_rows = []
    dead = set()
    for rnd in range(1, args.rounds + 1):
        for t in round_order(targets, rnd):
            proc, target_logs = running[t]
            for conns in args.connections:
                if t not in dead and proc.poll() is not None:
                    dead.add(t)
                    notes.append(f"{t} exited with status {proc.returncode} during the run; "
                                 "its log ends with: `" + tail(target_logs[-1], 3).replace("\n", " / ") + "`")
                    log(notes[-1])
                if t in dead:
                    results[(t, conns)].append(None)
                    continue
                base = os.path.join(results_dir, "wrk", f"r{rnd}-{t}-c{conns}")
                headers = ["Connection: close"] if args.new_connections else []
                run_wrk(target_ports[t], conns, WARMUP_SECONDS, base + ".warmup.txt", headers=headers)
                perf = None
                if args.cpu_profile and t in LB_STRATEGIES:
                    # The measured run but its first and last half second.
                    data = os.path.join(workdir, "perf.data")
                    perf = start_profile(0.5, max(0.5, args.duration - 1), data)
                r = with_cpu(proc.pid, lambda: run_wrk(target_ports[t], conns, args.duration,
                                                       base + ".txt", headers=headers))
                if perf:
                    try:
                        perf.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        perf.kill()
                        perf.wait()
                    shares = profile_shares(data, proc.pid) if perf.returncode == 0 else None
                    if r is not None:
                        r["strategy_cpu_pct"], r["balancer_cpu_pct"] = shares or (None, None)
                    if os.path.exists(data):
                        os.remove(data)
                results[(t, conns)].append(r)
                raw_rows.append({"round": rnd, "target": t, "connections": conns, "result": r})
                if r:
                    cpu = ""
                    if r.get("strategy_cpu_pct") is not None:
                        cpu = (f"  strategy {r['strategy_cpu_pct']:.2f} % / balancer "
                               f"{r['balancer_cpu_pct']:.1f} % of busy CPU")
                    log(f"round {rnd}/{args.rounds} {t:13} c={conns:<4} {r['rps']:9.0f} req/s  "
                        f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}  "
                        f"CPU {fmt(r.get('cpu_us'), 1)} µs/req{cpu}")
                else:
                    log(f"round {rnd}/{args.rounds} {t:13} c={conns:<4} wrk gave no result, see {base}.txt")

    save_logs(logs, notes, results_dir)

    args.targets = targets
    text = table(args, results, started_at, args.binary, notes, lb_threads_note)
    with open(os.path.join(results_dir, "table.md"), "w") as f:
        f.write(text)
    write_json(os.path.join(results_dir, "results.json"), {
        "started_at": started_at.isoformat(), "duration": args.duration, "rounds": args.rounds,
        "connections": args.connections, "ports": target_ports, "runs": raw_rows, "notes": notes,
    })
    print(text, flush=True)
    log(f"table written to {os.path.join(results_dir, 'table.md')} (raw wrk outputs in {results_dir}/wrk)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as e:
        log(f"error: {e}")
        sys.exit(1)
