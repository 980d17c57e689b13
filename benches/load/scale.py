#!/usr/bin/env python3
"""Memory and scale of the balancer (release build), on loopback only.

Measures, each bounded in time and stopping only what it started:
  1. start-up: time from exec to the first proxied 200, with the default
     built-in strategy, and the idle RSS;
  2. RSS and open descriptors with N concurrent keep-alive client
     connections (default 10,000), each having made one request and kept
     open;
  3. start-up time, RSS and a short burst of requests with 1,000 backends
     configured (one asyncio server listening on 1,000 ports).

Usage: benches/load/scale.py [--binary PATH] [--connections N] [--backends N]
"""

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


async def backend_handler(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head:
                break
            writer.write(OK)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError,
            asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def start_backends(count):
    servers, ports = [], []
    for _ in range(count):
        server = await asyncio.start_server(backend_handler, "127.0.0.1", 0, backlog=1024)
        servers.append(server)
        ports.append(server.sockets[0].getsockname()[1])
    return servers, ports


async def wait_ready(port, proc, limit=30.0):
    """Time until a proxied GET / answers 200."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if proc.poll() is not None:
            raise SystemExit(f"the balancer exited with {proc.returncode}")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 2)
            writer.close()
            if line.startswith(b"HTTP/1.1 200"):
                return
        except (ConnectionError, OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.005)
    raise SystemExit("the balancer did not answer in time")


def start_balancer(binary, config, workdir):
    path = os.path.join(workdir, f"lb-{time.monotonic_ns()}.json")
    with open(path, "w") as f:
        json.dump(config, f)
    log = open(path + ".log", "w")
    started = time.monotonic()
    proc = subprocess.Popen([binary, "--config", path], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "RUST_LOG": "warn"})
    return proc, started


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def hold_connections(port, count):
    """Opens `count` keep-alive connections, one request each; returns them."""
    conns = []
    sem = asyncio.Semaphore(200)

    async def one():
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            await reader.readuntil(b"ok\n")
            conns.append((reader, writer))

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    return conns, failed


async def main():
    # Connections cut at the end of a phase are expected: keep quiet.
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default=os.path.join(target, "release", "rust_load_balancer"))
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--backends", type=int, default=1_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.connections + args.backends + 1000
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        sys.exit(f"need {need} descriptors, the hard limit is {hard}: raise it (ulimit -Hn)")

    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        servers, ports = await start_backends(max(args.backends, 3))
        try:
            # 1 and 2: three backends, default built-in strategy.
            port = free_port()
            config = {
                "listen_address": f"127.0.0.1:{port}",
                "backend_servers": [f"127.0.0.1:{p}" for p in ports[:3]],
                "worker_threads": args.workers,
                "max_connections": args.connections + 100,
            }
            proc, started = start_balancer(args.binary, config, workdir)
            try:
                await wait_ready(port, proc)
                startup = time.monotonic() - started
                await asyncio.sleep(0.5)
                rows.append(("idle, 3 backends, round-robin", f"{rss_mib(proc.pid):.1f}", fds(proc.pid), f"start-up to first 200: {startup * 1000:.0f} ms"))
                t = time.monotonic()
                conns, failed = await hold_connections(port, args.connections)
                took = time.monotonic() - t
                await asyncio.sleep(0.5)
                rows.append((f"{len(conns)} open keep-alive client connections", f"{rss_mib(proc.pid):.1f}", fds(proc.pid),
                             f"opened and used in {took:.1f} s; {len(failed)} failed"))
                for _, writer in conns:
                    writer.close()
                await asyncio.sleep(1.0)
                rows.append(("after they closed", f"{rss_mib(proc.pid):.1f}", fds(proc.pid), ""))
            finally:
                stop(proc)

            # 3: many backends.
            port = free_port()
            config = {
                "listen_address": f"127.0.0.1:{port}",
                "backend_servers": [f"127.0.0.1:{p}" for p in ports[:args.backends]],
                "worker_threads": args.workers,
            }
            proc, started = start_balancer(args.binary, config, workdir)
            try:
                await wait_ready(port, proc)
                startup = time.monotonic() - started
                conns, failed = await hold_connections(port, 2000)
                for _, writer in conns:
                    writer.close()
                await asyncio.sleep(0.5)
                rows.append((f"{args.backends} backends, after 2000 requests", f"{rss_mib(proc.pid):.1f}", fds(proc.pid),
                             f"start-up to first 200: {startup * 1000:.0f} ms; {len(failed)} failed"))
            finally:
                stop(proc)
        finally:
            for server in servers:
                server.close()

    print(f"## Memory and scale ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} CPUs, {args.workers} workers, `benches/load/scale.py`)\n")
    print("| situation | RSS MiB | open fds | notes |")
    print("|---|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
    asyncio.run(main())
