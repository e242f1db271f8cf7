"""DescribeInstances under load: 100 concurrent clients (50 gRPC, 50 Infrakit JSON-RPC) against a
real ``mobykit serve`` listing a group on libvirt's test driver.

    .venv/bin/python bench/bench_load.py [--instances 20] [--calls 1000] [--clients 100]
                                         [--floor-calls 200] [--uri URI] [--tree DIR]

What runs: a private session libvirtd (its ``test`` driver, so every listing goes through the
daemon as a real one does, with no VM started; ``--uri test:///default`` keeps the mock inside the
server instead), one ``mobykit serve`` child with both transports on unix sockets, and a group of
``--instances`` provisioned through gRPC. Then, in the same run:

- the floor: ONE client alone, per transport, ``--floor-calls`` calls, p50 and p99;
- the load: ``--clients`` clients, half gRPC (one channel each), half JSON-RPC (one keep-alive
  connection each), ``--calls`` DescribeInstances each, all started together. Clients are threads
  of two processes, one per transport, so a transport's decoding does not steal the other's GIL.

Reported per transport: calls, failures (an error, a refused call, or an answer without exactly
the group's instances), p50, p99, p99 under load / the floor's p99; in all: throughput, and the
server's CPU time per call. ``--tree DIR`` runs the server from another checkout (e.g. the code
before a change, unpacked with ``git archive``), the clients from this one: before and after with
the same bench. Everything is removed at exit (daemon and server stopped by PID).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness.mobykit_server import UnixHTTPConnection, post_raw  # noqa: E402

TYPE = "libvirt"
GROUP = {"infrakit.group": "bench-load"}
CALL_TIMEOUT = 120.0

# Runs ``mobykit`` from the checkout given as the first argument instead of the installed one.
LAUNCH_FROM_TREE = """
import importlib.util, sys
root = sys.argv.pop(1)
for name, sub in (("mobykit", "plugin"), ("mobykit.providers", "providers")):
    spec = importlib.util.spec_from_file_location(
        name, f"{root}/{sub}/__init__.py", submodule_search_locations=[f"{root}/{sub}"])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
sys.modules["mobykit"].providers = sys.modules["mobykit.providers"]
from mobykit.cli.main import main
sys.exit(main())
"""


@dataclass
class WorkerResult:
    """What one client process measured (latencies in seconds, times on the system monotonic clock)."""

    transport: str
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    errors: list[str] = field(default_factory=list)  # the first few, to say what failed
    connect_retries: int = 0
    began: float = 0.0
    ended: float = 0.0


# -- clients (the worker processes) -------------------------------------------------------------------


def grpc_client(address: str, expect: int) -> Callable[[], None]:
    """One gRPC client (its own channel): a call, checked for exactly ``expect`` instances."""
    import grpc

    from mobykit.rpc.gen import mobykit_pb2 as pb
    from mobykit.rpc.gen import mobykit_pb2_grpc as pbg

    stub = pbg.InstanceStub(grpc.insecure_channel(address))
    request = pb.DescribeInstancesRequest(type=TYPE, tags=GROUP)

    def call() -> None:
        n = len(stub.DescribeInstances(request, timeout=CALL_TIMEOUT).descriptions)
        if n != expect:
            raise AssertionError(f"{n} instances listed, not {expect}")

    return call


def connect_unix(path: str, retries: list[int]) -> UnixHTTPConnection:
    """A keep-alive connection; a connect refused with EAGAIN (the server's listen backlog is
    full) is retried and counted, as a client library with a dial retry would."""
    deadline = time.monotonic() + CALL_TIMEOUT
    while True:
        conn = UnixHTTPConnection(path, timeout=CALL_TIMEOUT)
        try:
            conn.connect()
            return conn
        except BlockingIOError:
            conn.close()
            retries.append(1)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def jsonrpc_client(path: str, expect: int, retries: list[int]) -> Callable[[], None]:
    """One Infrakit JSON-RPC client (one keep-alive connection), checked like ``grpc_client``."""
    conn = connect_unix(path, retries)
    body = json.dumps({"jsonrpc": "2.0", "method": "Instance.DescribeInstances",
                       "params": {"Type": TYPE, "Tags": GROUP}, "id": 1}).encode()

    def call() -> None:
        nonlocal conn
        try:
            status, _, raw = post_raw(path, body, conn)
        except OSError:
            conn.close()
            conn = connect_unix(path, retries)  # the next call gets a fresh connection
            raise
        answer = json.loads(raw)
        if status != 200 or "result" not in answer:
            raise AssertionError(f"HTTP {status}: {raw[:200]!r}")
        n = len(answer["result"]["Descriptions"])
        if n != expect:
            raise AssertionError(f"{n} instances listed, not {expect}")

    return call


def run_worker(transport: str, address: str, threads: int, calls: int, expect: int,
               start_at: float) -> WorkerResult:
    """``threads`` clients of one transport, ``calls`` calls each, all starting at ``start_at``."""
    result = WorkerResult(transport)
    retries: list[int] = []
    make = (lambda: grpc_client(address, expect)) if transport == "grpc" else (
        lambda: jsonrpc_client(address, expect, retries))
    clients = [make() for _ in range(threads)]
    for client in clients:
        client()  # warm up: channels connected, server threads started; not measured
    lock = threading.Lock()

    def loop(client: Callable[[], None]) -> None:
        own: list[float] = []
        for _ in range(calls):
            t0 = time.monotonic()
            try:
                client()
                own.append(time.monotonic() - t0)
            except Exception as e:  # noqa: BLE001 - counted, the first few kept
                with lock:
                    result.failures += 1
                    if len(result.errors) < 5:
                        result.errors.append(f"{type(e).__name__}: {e}"[:300])
        with lock:
            result.latencies.extend(own)

    time.sleep(max(0.0, start_at - time.monotonic()))
    result.began = time.monotonic()
    workers = [threading.Thread(target=loop, args=(c,)) for c in clients]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    result.ended = time.monotonic()
    result.connect_retries = len(retries)
    return result


def spawn_worker(transport: str, address: str, threads: int, calls: int, expect: int,
                 start_at: float) -> subprocess.Popen:
    argv = [sys.executable, __file__, "--worker", transport, "--address", address, "--threads", str(threads),
            "--calls", str(calls), "--expect", str(expect), "--start-at", repr(start_at)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def collect(proc: subprocess.Popen) -> WorkerResult:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"a client process failed (exit {proc.returncode})")
    return WorkerResult(**json.loads(out))


def _split(n: int, parts: int) -> list[range]:
    """``n`` clients dealt over ``parts`` processes (none empty)."""
    parts = max(1, min(parts, n))
    return [range(i, n, parts) for i in range(parts)]


def merge(results: list[WorkerResult]) -> WorkerResult:
    """The client processes of one transport as one result."""
    out = WorkerResult(results[0].transport, began=min(r.began for r in results),
                       ended=max(r.ended for r in results))
    for r in results:
        out.latencies += r.latencies
        out.failures += r.failures
        out.errors = (out.errors + r.errors)[:5]
        out.connect_retries += r.connect_retries
    return out


# -- the server and its libvirt ------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen
    grpc: str  # unix:PATH
    infrakit: str  # PATH
    work: Path

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def libvirt_uri(uri: str | None) -> Iterator[str]:
    """``uri``, or the test driver of a private session daemon started for the run."""
    if uri:
        yield uri
        return
    from mobykit.run.libvirtd import session_libvirtd

    with session_libvirtd() as daemon:
        sock = daemon.uri.split("socket=", 1)[1]
        yield f"test+unix:///default?socket={sock}"


@contextmanager
def serve(uri: str, tree: Path | None) -> Iterator[Server]:
    """``mobykit serve`` on unix sockets in a temp dir, with the libvirt provider on ``uri``."""
    import yaml

    work = Path(tempfile.mkdtemp(prefix="mobykit-bench-load-"))
    config = work / "config.yml"
    settings = {"default_provider": TYPE, "providers": {TYPE: {"URI": uri, "Pool": "bench"}}}
    config.write_text(yaml.safe_dump(settings))
    for name in ("vmlinuz", "initrd"):  # the mock driver boots nothing: any file will do
        (work / name).write_bytes(b"\0")
    args = ["serve", "--config", str(config), "--listen", f"unix:{work / 'grpc.sock'}",
            "--infrakit-socket", str(work / "infrakit.sock")]
    cmd = [sys.executable, "-c", LAUNCH_FROM_TREE, str(tree), *args] if tree else [
        sys.executable, "-m", "mobykit.cli.main", *args]
    env = dict(os.environ, HOME=str(work))
    env.pop("MOBYKIT_CONFIG", None)
    with open(work / "stderr.log", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=work)
    try:
        listening = []
        while len(listening) < 2:
            line = proc.stdout.readline()
            if not line:
                log = (work / "stderr.log").read_text()[-3000:]
                raise RuntimeError(f"mobykit serve did not start:\n{log}")
            if line.startswith("listening on "):
                listening.append(line.removeprefix("listening on ").strip())
        infrakit = next(a for a in listening if a.startswith("infrakit:")).removeprefix("infrakit:")
        yield Server(proc, f"unix:{work / 'grpc.sock'}", infrakit, work)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        shutil.rmtree(work, ignore_errors=True)


def provision(server: Server, n: int) -> list[str]:
    """``n`` instances of the group, through gRPC, eight at a time."""
    from mobykit.rpc.client import connect
    from mobykit.spi.types import Spec

    props = {"Kernel": str(server.work / "vmlinuz"), "Initrd": str(server.work / "initrd"), "Memory": 64}
    with connect(server.grpc) as c, ThreadPoolExecutor(8) as pool:
        specs = [Spec(properties=props, tags={**GROUP, "infrakit.config.hash": "h" * 32, "n": str(i)})
                 for i in range(n)]
        return list(pool.map(lambda s: c.instance.provision(TYPE, s), specs))


# -- figures -------------------------------------------------------------------------------------------


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@dataclass
class Row:
    transport: str
    calls: int
    failures: int
    p50_ms: float
    p99_ms: float
    floor_p99_ms: float
    connect_retries: int

    @property
    def ratio(self) -> float:
        return self.p99_ms / self.floor_p99_ms


def row(load: WorkerResult, floor: WorkerResult) -> Row:
    lat = load.latencies or [float("nan")]
    return Row(load.transport, len(load.latencies) + load.failures, load.failures,
               statistics.median(lat) * 1e3, quantile(lat, 0.99) * 1e3,
               quantile(floor.latencies, 0.99) * 1e3, load.connect_retries)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, default=20)
    p.add_argument("--calls", type=int, default=1000, help="DescribeInstances per client under load")
    p.add_argument("--clients", type=int, default=100, help="half gRPC, half JSON-RPC")
    p.add_argument("--floor-calls", type=int, default=200, help="calls of the lone client (the floor)")
    p.add_argument("--processes", type=int, default=1, help="client processes per transport")
    p.add_argument("--uri", help="libvirt URI (default: the test driver of a private session libvirtd)")
    p.add_argument("--tree", type=Path,
                   help="run the server from this checkout (e.g. the code before a change)")
    p.add_argument("--worker", choices=("grpc", "jsonrpc"), help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    p.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = run_worker(args.worker, args.address, args.threads, args.calls, args.expect, args.start_at)
        print(json.dumps(asdict(result)))
        return 0

    with libvirt_uri(args.uri) as uri, serve(uri, args.tree) as server:
        t0 = time.monotonic()
        ids = provision(server, args.instances)
        provisioned = time.monotonic() - t0
        addresses = {"grpc": server.grpc, "jsonrpc": server.infrakit}
        floors = {}
        for transport, address in addresses.items():  # one lone client at a time
            floors[transport] = collect(spawn_worker(transport, address, 1, args.floor_calls, len(ids), 0.0))
        cpu0 = server.cpu_seconds()
        start_at = time.monotonic() + 3.0  # both processes connect and warm up first
        half = args.clients // 2
        per_proc = [len(part) for part in _split(half, args.processes)]
        procs = {t: [spawn_worker(t, a, n, args.calls, len(ids), start_at) for n in per_proc]
                 for t, a in addresses.items()}
        loads = {t: merge([collect(proc) for proc in ps]) for t, ps in procs.items()}
        cpu = server.cpu_seconds() - cpu0
        tree = f"server from {args.tree}" if args.tree else "server from this checkout"
        print(f"DescribeInstances of a {len(ids)}-instance group ({provisioned:.1f} s to provision), "
              f"libvirt {uri.split('?')[0]}, {tree}")
        print(f"load: {half} gRPC + {half} JSON-RPC clients x {args.calls} calls "
              f"({len(per_proc)} client process(es) per transport); "
              f"floor: one client alone x {args.floor_calls} calls, same run")
        rows = [row(loads[t], floors[t]) for t in addresses]
        print(f"{'transport':<10}{'calls':>8}{'failed':>8}{'p50 ms':>9}{'p99 ms':>9}{'floor p99':>11}"
              f"{'p99/floor':>11}{'retried connects':>18}")
        for r in rows:
            print(f"{r.transport:<10}{r.calls:>8}{r.failures:>8}{r.p50_ms:>9.1f}{r.p99_ms:>9.1f}"
                  f"{r.floor_p99_ms:>11.2f}{r.ratio:>10.1f}x{r.connect_retries:>18}")
        began = min(r.began for r in loads.values())
        ended = max(r.ended for r in loads.values())
        total = sum(r.calls for r in rows)
        print(f"in all: {total} calls, {sum(r.failures for r in rows)} failed, {ended - began:.1f} s, "
              f"{total / (ended - began):.0f} calls/s; server CPU {cpu / total * 1e3:.2f} ms per call")
        for r in loads.values():
            for e in r.errors:
                print(f"  {r.transport} failure: {e}")
        return 1 if any(r.failures for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
