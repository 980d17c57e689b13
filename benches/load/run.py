#!/usr/bin/env python3
"""Load benchmark driver: rust_load_balancer against NGINX and HAProxy.

Run it through benches/load/run.sh, which installs the tools, builds the
release binary and raises the descriptor limit; the header of run.sh says
what is measured and how. This file starts the backends and every target on
free 127.0.0.1 ports, drives them with wrk in interleaved rounds, parses
wrk's output and prints a markdown table of medians.

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
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# Fixed order: every round drives them in this order.
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
}
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


class BenchError(Exception):
    """A failure that ends the run with a clear message."""


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
                   help="wrk connection counts, space or comma separated (default \"64 256\")")
    p.add_argument("--only", default="", metavar="LIST",
                   help="comma-separated targets to run (default all): " + ",".join(TARGETS))
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
    if a.only:
        wanted = [t.strip() for t in a.only.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in TARGETS]
        if unknown:
            p.error(f"--only: unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
        a.targets = [t for t in TARGETS if t in wanted]
    else:
        a.targets = list(TARGETS)
    if not a.parse_only and not a.binary:
        p.error("run it through benches/load/run.sh (it builds the binary and passes --binary)")
    return a


# ---------------------------------------------------------------- processes

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _child_setup():
    # In the child between fork and exec: get SIGTERM if this driver dies.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _children_of(pid):
    """PIDs whose parent is pid (nginx workers of a master), from /proc."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(d))
    return found


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


def check_answers(name, port, logfile):
    """One GET must come back 200 "ok\\n" (http.client: no proxy settings apply)."""
    deadline = time.monotonic() + START_TIMEOUT
    last = None
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
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


def run_wrk(port, conns, seconds, out_path):
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}/"]
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
        f.write(f"$ {' '.join(argv)}\n{text}\n[exit status: {status}]\n")
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


def versions(binary):
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
    header = "| target | conns | req/s | p50 ms | p99 ms | errors | vs nginx-rr | vs direct |"
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
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
            row = (f"| {target} | {conns} | {fmt(rps, 0)} | {fmt(p50, 2)} | {fmt(p99, 2)} "
                   f"| {errors} | {ratios[0]} | {ratios[1]} |")
            if args.cpu_profile:
                for key in ("strategy_cpu_pct", "balancer_cpu_pct"):
                    values = [r[key] for r in runs if r.get(key) is not None]
                    row += f" {fmt(statistics.median(values), 2) if values else '–'} |"
            lines.append(row)
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


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


# ---------------------------------------------------------------- main

def main(argv):
    args = parse_args(argv)
    if args.parse_only:
        return 0
    for tool in ("wrk", "nginx", "haproxy"):
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
        return run(args, procs, workdir, results_dir, started_at)
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
        worker_threads = True
        probe = os.path.join(workdir, "probe.json")
        write_json(probe, lb_config(target_ports[lb_targets[0]], backends, "round-robin", True))
        ok, out = lb_check(args.binary, probe)
        if not ok and "worker_threads" in out:
            worker_threads = False
            lb_threads_note = " (balancer: this build rejects `worker_threads`, so tokio's default of one per CPU)"
            notes.append(f"`--check` rejected `worker_threads`, so it was left out of the balancer's configs "
                         f"(tokio's default: one worker thread per CPU, {os.cpu_count()} here): {out.splitlines()[0]}")
            log(notes[-1])
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
    backend_servers = "\n".join(
        f"    server {{\n        listen 127.0.0.1:{b};\n        return 200 \"ok\\n\";\n    }}" for b in backends)
    proc, logs["backends"] = start_nginx(procs, "backends", workdir, "nginx-backends.conf.in",
                                         SERVERS=backend_servers)
    for b in backends:
        wait_listening("backend nginx", b, proc, logs["backends"][-1])
    for b in backends:
        check_answers("backend nginx", b, logs["backends"][-1])

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
            proc = procs.start(t, [args.binary, "--config", lb_configs[t]], logs[t][0], cwd=workdir, env=env)
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
        for t in targets:
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
                run_wrk(target_ports[t], conns, WARMUP_SECONDS, base + ".warmup.txt")
                perf = None
                if args.cpu_profile and t in LB_STRATEGIES:
                    # The measured run but its first and last half second.
                    data = os.path.join(workdir, "perf.data")
                    perf = start_profile(0.5, max(0.5, args.duration - 1), data)
                r = run_wrk(target_ports[t], conns, args.duration, base + ".txt")
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
                        f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}{cpu}")
                else:
                    log(f"round {rnd}/{args.rounds} {t:13} c={conns:<4} wrk gave no result, see {base}.txt")

    # Problems seen in the servers' logs (the balancer logs at warn and above).
    for name, paths in logs.items():
        problem = log_problems(name, paths)
        if problem:
            notes.append(problem)
    # Copies of the servers' logs beside the results (the working dir goes away).
    for name, paths in logs.items():
        for p in paths:
            if os.path.exists(p):
                os.makedirs(os.path.join(results_dir, "logs", name), exist_ok=True)
                dest = os.path.join(results_dir, "logs", name, os.path.basename(p))
                with open(p, "rb") as src, open(dest, "wb") as dst:
                    src.seek(max(0, os.path.getsize(p) - 256 * 1024))
                    dst.write(src.read())

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
