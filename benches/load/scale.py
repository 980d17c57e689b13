#!/usr/bin/env python3
"""Memory and scale of the balancer (release build), on loopback only.

Measures, each bounded in time and stopping only what it started:
  1. start-up: time from exec to the first proxied 200, with the default
     built-in strategy, and the idle RSS;
  2. RSS and open descriptors with N concurrent keep-alive client
     connections (default 10,000), each having made one request and kept
     open;
  3. start-up time, RSS and a short burst of requests with 1,000 backends
     configured (one asyncio server listening on 1,000 ports);
  4. beside 2, the same N idle keep-alive connections held open to NGINX
     (master and 2 workers, benches/load/nginx-proxy.conf.in in front of the
     same three backends), RSS summed over its processes;
  5. with --tls: RSS with N idle TLS client connections, each having
     completed a handshake and one request over the TLS listener and kept
     open, for this balancer and for NGINX (nginx-proxy-tls.conf.in), both
     with one self-signed ECDSA P-256 certificate made with openssl for the
     run; TLS 1.2 and 1.3, each server's default ciphers and session tickets.

The second table gives KiB per idle connection: (RSS with the N connections
open - RSS just before they were opened) / N, in each server's processes
(the kernel's socket buffers are not in RSS), measured twice: 0.5 s after
the last connection was opened, and 4 s later. This balancer parks a plain
keep-alive connection idle for one to two seconds (no task of its own, see
src/proxy/parked.rs), so the second figure is that of parked connections
(the balancer's lb_client_connections_parked gauge says how many) and the
first mostly of waiting ones; NGINX's does not change. NGINX allocates its connection
slots (worker_connections, here N plus room for the upstream connections,
per worker) when a worker starts: they are in its idle RSS, not in the
per-connection figure. TLS clients are Python's ssl module over memory BIOs
with asyncio: after its request a client keeps only the TCP socket and drops
its TLS state without a close_notify, so the server holds an open, idle TLS
connection while this process stays small. Each phase is bounded in time;
every process started (the balancer, nginx) is stopped by its PID.

Usage: benches/load/scale.py [--binary PATH] [--connections N] [--backends N] [--tls]
"""

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
import run as load  # noqa: E402  (the load bench's templates and process helpers)

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n"
# Concurrent connection attempts while opening the N connections.
OPEN_CONCURRENCY = 200
# Time allowed to open and use the N connections (TLS handshakes included).
OPEN_TIMEOUT = 240.0
# How long the idle connections are measured after the first measurement
# (half a second after the last was opened): this balancer parks a
# kept-alive connection idle for one to two seconds, so the second
# measurement shows parked connections, the first mostly waiting ones.
IDLE_SETTLE = 4.0
# Descriptors this process needs beyond its N client sockets and the
# backends' listening ones: the backend side of the servers' upstream
# connections (nginx keeps up to 512 per worker, the balancer 128 per backend
# and worker) and some slack.
EXTRA_FDS = 2500


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


def write_config(config, workdir):
    path = os.path.join(workdir, f"lb-{time.monotonic_ns()}.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def start_balancer(binary, config, workdir):
    path = write_config(config, workdir)
    log = open(path + ".log", "w")
    started = time.monotonic()
    proc = subprocess.Popen([binary, "--config", path], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "RUST_LOG": "warn"})
    return proc, started


def parked_note(admin_port):
    """How many client connections the balancer has parked, from its
    lb_client_connections_parked gauge."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError as error:
        return f"parked: unknown ({error})"
    for line in text.splitlines():
        if line.startswith("lb_client_connections_parked "):
            return f"{float(line.split()[1]):.0f} of them parked"
    return "parked: no lb_client_connections_parked in /metrics"


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


def tree_pids(pid):
    """pid and its children (an nginx master and its workers)."""
    return [pid] + load._children_of(pid)


def tree_rss_mib(pid):
    return sum(rss_mib(p) for p in tree_pids(pid))


def tree_fds(pid):
    return sum(fds(p) for p in tree_pids(pid))


async def hold_tls_connections(port, count, ctx):
    """Opens `count` TLS connections, each a full handshake (SNI and name
    check: localhost) and one request; returns their TCP sockets, the TLS
    state dropped (no close_notify: the server still holds a TLS
    connection)."""
    loop = asyncio.get_running_loop()
    socks = []
    sem = asyncio.Semaphore(OPEN_CONCURRENCY)
    request = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"

    async def one():
        async with sem:
            sock = socket.socket()
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, ("127.0.0.1", port))
                incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
                tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")

                async def drive(step):
                    # Run one TLS step, moving bytes between the BIOs and the socket.
                    while True:
                        try:
                            result = step()
                        except ssl.SSLWantReadError:
                            result = None
                        else:
                            pending = outgoing.read()
                            if pending:
                                await loop.sock_sendall(sock, pending)
                            return result
                        pending = outgoing.read()
                        if pending:
                            await loop.sock_sendall(sock, pending)
                        data = await loop.sock_recv(sock, 65536)
                        if not data:
                            raise ConnectionError("closed by the server")
                        incoming.write(data)

                await drive(tls.do_handshake)
                await drive(lambda: tls.write(request))
                answer = b""
                while not answer.endswith(b"ok\n"):
                    chunk = await drive(lambda: tls.read(65536))
                    if not chunk:
                        raise ConnectionError("TLS connection closed before the answer")
                    answer += chunk
                if not answer.startswith(b"HTTP/1.1 200"):
                    raise ConnectionError(f"answered {answer[:40]!r}")
                socks.append(sock)
            except BaseException:
                sock.close()
                raise

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    return socks, failed


async def tls_ready(port, ctx, proc, limit=30.0):
    """Until one GET over TLS answers 200 (the servers start their TLS
    listener after, or beside, the plain one)."""
    start = time.monotonic()
    last = None
    while time.monotonic() - start < limit:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before its TLS listener answered")
        socks, failed = await hold_tls_connections(port, 1, ctx)
        for sock in socks:
            sock.close()
            return
        last = failed[0] if failed else None
        await asyncio.sleep(0.05)
    raise SystemExit(f"no TLS answer on 127.0.0.1:{port} within {limit:.0f} s: {last!r}")


def nginx_worker_connections(connections):
    """Room for every client in one worker (the kernel may not spread them
    evenly) plus its upstream keep-alive (512) and slack."""
    return connections + 1100


def nginx_note(connections):
    return (f"worker_connections {nginx_worker_connections(connections)} per worker, "
            "allocated at start (in RSS before)")


def start_nginx(workdir, name, template, port, backend_ports, connections, **values):
    """NGINX (master + 2 workers) from a load-bench template, in front of
    backend_ports, with room for `connections` clients per worker."""
    d = os.path.join(workdir, name)
    os.makedirs(os.path.join(d, "tmp"))
    conf = os.path.join(d, "nginx.conf")
    worker_connections = nginx_worker_connections(connections)
    load.render(template, conf, DIR=d, NOFILE=2 * worker_connections,
                WORKER_CONNECTIONS=worker_connections, NAME=name, TEMP_PATHS=load.nginx_temp_paths(d),
                PORT=port, METHOD="", SERVERS="\n".join(f"        server 127.0.0.1:{b};" for b in backend_ports),
                **values)
    log = open(os.path.join(d, "stderr.log"), "w")
    proc = subprocess.Popen(["nginx", "-p", d + "/", "-c", conf, "-e", os.path.join(d, "error.log")],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=d,
                            preexec_fn=load._child_setup)
    return proc


def stop_nginx(proc):
    """SIGTERM to the master; if it had to be killed, its workers too."""
    workers = load._children_of(proc.pid)
    stop(proc)
    for w in workers:
        try:
            with open(f"/proc/{w}/comm") as f:
                if f.read().strip() != "nginx":
                    continue
            os.kill(w, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def make_certificate(workdir):
    """The run's certificate (as run.sh --tls makes it): cert.pem, key.pem."""
    cert, key = os.path.join(workdir, "cert.pem"), os.path.join(workdir, "key.pem")
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        sys.exit(f"openssl req failed: {(r.stdout + r.stderr).strip()}")
    return cert, key


async def idle_memory(label, pid, open_conns, close_conns, extra=""):
    """RSS (summed over pid's tree) before and with the connections open;
    a row of the per-connection table."""
    await asyncio.sleep(0.5)
    before = tree_rss_mib(pid)
    t = time.monotonic()
    try:
        conns, failed = await asyncio.wait_for(open_conns(), OPEN_TIMEOUT)
    except asyncio.TimeoutError:
        return (label, "–", f"{before:.1f}", "–", "–", "–", "–", "–", f"not all opened within {OPEN_TIMEOUT:.0f} s")
    took = time.monotonic() - t
    await asyncio.sleep(0.5)
    with_conns = tree_rss_mib(pid)
    await asyncio.sleep(IDLE_SETTLE)
    settled = tree_rss_mib(pid)
    open_fds = tree_fds(pid)
    close_conns(conns)
    note = f"opened and used in {took:.1f} s; {len(failed)} failed"
    if extra:
        note += f"; {extra}"
    if took > 60:
        note += " (the first were idle over 60 s: an idle timeout may have closed some, see open fds)"
    if failed:
        note += f" (first: {failed[0]!r:.120})"
    return (label, len(conns), f"{before:.1f}", *per_connection(before, with_conns, settled, len(conns)),
            open_fds, note)


def per_connection(before, with_conns, settled, count):
    """The per-connection table's RSS and KiB columns, 0.5 s after the
    connections were opened and IDLE_SETTLE s later."""
    def kib(rss):
        return f"{(rss - before) * 1024 / count:.1f}" if count else "–"
    return f"{with_conns:.1f}", kib(with_conns), f"{settled:.1f}", kib(settled)


async def main():
    # Connections cut at the end of a phase are expected: keep quiet.
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)
    root = os.path.dirname(os.path.dirname(HERE))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default=os.path.join(target, "release", "rust_load_balancer"))
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--backends", type=int, default=1_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tls", action="store_true",
                        help="also idle TLS connections, to this balancer's TLS listener and to NGINX")
    args = parser.parse_args()
    os.environ["PATH"] += ":/usr/sbin:/sbin"
    have_nginx = shutil.which("nginx") is not None
    if args.tls and not shutil.which("openssl"):
        sys.exit("--tls needs openssl (for the certificate) on PATH")

    # Every descriptor the hard limit allows, then check that it is enough:
    # the N client sockets, the backends' listening sockets and EXTRA_FDS.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.connections + args.backends + EXTRA_FDS
    if soft != resource.RLIM_INFINITY and soft < need:
        sys.exit(f"need {need} descriptors (--connections {args.connections}, --backends {args.backends}, "
                 f"{EXTRA_FDS} more), the hard limit is {hard}: raise it (ulimit -Hn) or ask for fewer")

    rows = []
    idle = []  # the per-connection table
    notes = []
    if not have_nginx:
        notes.append("nginx is not on PATH: its rows are left out")
    with tempfile.TemporaryDirectory() as workdir:
        servers, ports = await start_backends(max(args.backends, 3))
        try:
            # 1 and 2: three backends, default built-in strategy.
            port = free_port()
            admin_port = free_port()
            config = {
                "listen_address": f"127.0.0.1:{port}",
                "admin_address": f"127.0.0.1:{admin_port}",
                "backend_servers": [f"127.0.0.1:{p}" for p in ports[:3]],
                "worker_threads": args.workers,
                "max_connections": args.connections + 100,
            }
            proc, started = start_balancer(args.binary, config, workdir)
            try:
                await wait_ready(port, proc)
                startup = time.monotonic() - started
                await asyncio.sleep(0.5)
                idle_rss = rss_mib(proc.pid)
                rows.append(("idle, 3 backends, round-robin", f"{idle_rss:.1f}", fds(proc.pid), f"start-up to first 200: {startup * 1000:.0f} ms"))
                t = time.monotonic()
                conns, failed = await hold_connections(port, args.connections)
                took = time.monotonic() - t
                await asyncio.sleep(0.5)
                open_rss = rss_mib(proc.pid)
                rows.append((f"{len(conns)} open keep-alive client connections", f"{open_rss:.1f}", fds(proc.pid),
                             f"opened and used in {took:.1f} s; {len(failed)} failed"))
                await asyncio.sleep(IDLE_SETTLE)
                settled_rss = rss_mib(proc.pid)
                rows.append((f"the same, {IDLE_SETTLE + 0.5:.1f} s after the last was opened", f"{settled_rss:.1f}",
                             fds(proc.pid), parked_note(admin_port)))
                idle.append(("rust_load_balancer, plain keep-alive", len(conns), f"{idle_rss:.1f}",
                             *per_connection(idle_rss, open_rss, settled_rss, len(conns)),
                             fds(proc.pid), f"the rows above; {len(failed)} failed"))
                for _, writer in conns:
                    writer.close()
                await asyncio.sleep(1.0)
                rows.append(("after they closed", f"{rss_mib(proc.pid):.1f}", fds(proc.pid), ""))
            finally:
                stop(proc)

            # 4: NGINX, the same idle keep-alive connections.
            if have_nginx:
                port = free_port()
                proc = start_nginx(workdir, "nginx-plain", "nginx-proxy.conf.in", port, ports[:3],
                                   args.connections)
                try:
                    await wait_ready(port, proc)

                    def close_plain(conns):
                        for _, writer in conns:
                            writer.close()

                    idle.append(await idle_memory(
                        "nginx (master + 2 workers), plain keep-alive", proc.pid,
                        lambda: hold_connections(port, args.connections), close_plain,
                        nginx_note(args.connections)))
                finally:
                    stop_nginx(proc)

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

            # 5: idle TLS connections, this balancer and NGINX.
            if args.tls:
                cert, key = make_certificate(workdir)
                ctx = ssl.create_default_context(cafile=cert)

                def close_socks(socks):
                    for sock in socks:
                        sock.close()

                port, tls_port = free_port(), free_port()
                config = {
                    "listen_address": f"127.0.0.1:{port}",
                    "tls_listen_address": f"127.0.0.1:{tls_port}",
                    "tls_certificates": [{"cert": "cert.pem", "key": "key.pem"}],
                    "backend_servers": [f"127.0.0.1:{p}" for p in ports[:3]],
                    "worker_threads": args.workers,
                    "max_connections": args.connections + 100,
                }
                check = subprocess.run([args.binary, "--check", "--config", write_config(config, workdir)],
                                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
                if check.returncode != 0:
                    out = (check.stdout + check.stderr).strip().replace(workdir + os.sep, "")
                    notes.append("rust_load_balancer TLS row left out: `--check` rejected the TLS config: "
                                 + (out.splitlines()[0][:240] if out else "(no output)"))
                else:
                    proc, _ = start_balancer(args.binary, config, workdir)
                    try:
                        await wait_ready(port, proc)
                        await tls_ready(tls_port, ctx, proc)
                        idle.append(await idle_memory(
                            "rust_load_balancer, TLS (handshake + 1 request each)", proc.pid,
                            lambda: hold_tls_connections(tls_port, args.connections, ctx), close_socks))
                    finally:
                        stop(proc)
                if have_nginx:
                    port = free_port()
                    proc = start_nginx(workdir, "nginx-tls", "nginx-proxy-tls.conf.in", port, ports[:3],
                                       args.connections, CERT=cert, KEY=key)
                    try:
                        await tls_ready(port, ctx, proc)
                        idle.append(await idle_memory(
                            "nginx (master + 2 workers), TLS (handshake + 1 request each)", proc.pid,
                            lambda: hold_tls_connections(port, args.connections, ctx), close_socks,
                            nginx_note(args.connections)))
                    finally:
                        stop_nginx(proc)
        finally:
            for server in servers:
                server.close()

    print(f"## Memory and scale ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} CPUs, {args.workers} workers, `{' '.join(['benches/load/scale.py'] + sys.argv[1:])}`)\n")
    print("| situation | RSS MiB | open fds | notes |")
    print("|---|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print("\n### Idle client connections: KiB each\n")
    print("RSS summed over the server's processes; KiB per connection = (RSS with them open - RSS just before) / "
          f"connections, 0.5 s after the last was opened and {IDLE_SETTLE + 0.5:.1f} s after.\n")
    print("| server | connections | RSS before MiB | RSS open MiB (0.5 s) | KiB per connection (0.5 s) "
          f"| RSS open MiB ({IDLE_SETTLE + 0.5:.1f} s) | KiB per connection ({IDLE_SETTLE + 0.5:.1f} s) | open fds | notes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in idle:
        print("| " + " | ".join(str(c) for c in row) + " |")
    if notes:
        print("\nNotes:\n")
        for n in notes:
            print(f"- {n}")


if __name__ == "__main__":
    asyncio.run(main())
