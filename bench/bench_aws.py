"""AWS provider benchmark against a local moto server: AMI publish throughput and group converge time.

    .venv/bin/python bench/bench_aws.py [--data-mib 128] [--rtt-ms 20,50] [--latency-ms 200] [--size 20]
                                        [--only publish|converge] [--rounds 5] [--trace] [--compare]

moto runs in a child process (``--serve``: ThreadedMotoServer behind the tests' fault/latency
middleware and moto extensions, ``tests/harness/moto_server.py``) so the server does not share
this process's GIL with the client being measured.

1. Publish: a 1 GiB sparse ``aws`` disk with ``--data-mib`` of non-zero data is published twice
   in the same run, as two image ids with the same blocks: once with parallel PutSnapshotBlock
   (the provider's default) and once strictly one block at a time (``parallel=1``), both through
   the same code (StartSnapshot, 512 KiB blocks with SHA256, CompleteSnapshot, RegisterImage).
   Measured with no added latency and with each ``--rtt-ms`` per call (a network round trip:
   localhost has none, the real service always does). Without latency both are bound by CPU: moto's
   own per block (one Python process, ~6 ms a block) and the client's (~3.6 ms), on 2 shared cores;
   the columns "CPU ms/block" show both.
2. Converge: the real group controller, moby flavor and InstanceCore over the provider, every AWS
   call delayed by ``--latency-ms``; time for 0 -> 1 and 0 -> ``--size`` (the AMI published before).
   ``--compare`` also runs the provider with the consoles of a group read after its listing
   returns (the earlier way; everything else as now), interleaved with the default, so both see
   the same load.
   ``--trace`` prints every AWS call of the last 0 -> ``--size`` run (start, end, operation,
   thread, as the client saw them): where the serial waits are.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

MIB = 1 << 20
ROUNDS = 5  # converge runs per size (--rounds): the median is reported (the machine is shared)


def serve(latency: float) -> None:
    """Child mode: run moto with ``latency`` seconds per call until stdin closes."""
    from harness.moto_server import MotoServer, extend_moto

    os.environ["MOTO_EC2_LOAD_DEFAULT_AMIS"] = "false"
    server = MotoServer()
    server.start()
    server.faults.latency = latency
    with extend_moto():
        print(server.url, flush=True)
        sys.stdin.read()
    server.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def moto(latency: float) -> Iterator[subprocess.Popen]:
    """A moto child process (its URL is in the environment); yields it, and stops it (by closing
    its stdin, then by PID)."""
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(latency)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = proc.stdout.readline().strip()
        if not url.startswith("http"):
            raise SystemExit("bench: moto did not start")
        from harness.moto_server import aws_env

        with aws_env(url):
            yield proc
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def disk(path: Path, data_mib: int) -> None:
    """1 GiB, ``data_mib`` of random data in 4 MiB runs spread over it, the rest holes."""
    from harness.moto_server import sparse_disk

    runs = max(1, data_mib // 4)
    stride = (1 << 30) // runs
    sparse_disk(path, 1 << 30, {i * stride: os.urandom(4 * MIB) for i in range(runs)})


@dataclasses.dataclass
class Run:
    seconds: float
    client_cpu: float  # this process: reading blocks, checksums, botocore, HTTP
    server_cpu: float  # moto's process


def publish_once(path: Path, seed: str, parallel: int, server: subprocess.Popen) -> Run:
    import hashlib

    from mobykit.providers.aws import AWSProvider
    from mobykit.providers.base import BootImage

    image = BootImage(id="sha256:" + hashlib.sha256(seed.encode()).hexdigest(), name=seed, kernel=path,
                      initrd=path, cmdline="", files=lambda name, size=None: [path])
    p = AWSProvider({})
    p.poll, p.parallel = 0.05, parallel
    p.settle = 0.0  # no second server here: time the upload, not publish.SETTLE's wait
    p.publisher()  # the clients (botocore loads the EC2 model: ~0.5 s of CPU, once per process) before the clock
    c0, s0, t0 = time.process_time(), cpu_seconds(server.pid), time.perf_counter()
    p.publish_image(image, {"Image": image.id})
    return Run(time.perf_counter() - t0, time.process_time() - c0, cpu_seconds(server.pid) - s0)


def bench_publish(data_mib: int, rtts: list[float]) -> None:
    from mobykit.providers.aws.blocks import PARALLEL

    with tempfile.TemporaryDirectory(prefix="bench-aws-") as tmp:
        path = Path(tmp) / "image.raw"
        disk(path, data_mib)
        print(f"publish: 1024 MiB disk, {data_mib} MiB of data ({data_mib * 2} blocks of 512 KiB), rest zeros")
        print(f"{'added latency':>14} {'mode':>22} {'seconds':>8} {'disk MB/s':>10} {'data MB/s':>10} {'x':>6} "
              f"{'client CPU ms/block':>20} {'moto CPU ms/block':>18}")
        blocks = data_mib * 2
        for latency in (0.0, *rtts):
            with moto(latency) as server:
                seq = publish_once(path, f"seq-{latency}", 1, server)
                par = publish_once(path, f"par-{latency}", PARALLEL, server)
            for mode, r in (("sequential", seq), (f"parallel ({PARALLEL})", par)):
                t = r.seconds
                print(f"{latency * 1000:>12.0f}ms {mode:>22} {t:>8.2f} {1024 * MIB / t / 1e6:>10.0f} "
                      f"{data_mib * MIB / t / 1e6:>10.1f} {seq.seconds / t:>6.1f} "
                      f"{r.client_cpu / blocks * 1000:>20.1f} {r.server_cpu / blocks * 1000:>18.1f}")


class Trace:
    """Every AWS call a provider's clients make: (start, end, operation, thread), from ``t0``."""

    def __init__(self, provider) -> None:
        import threading

        self.calls: list[tuple[float, float, str, str]] = []
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()
        events = provider.clients._boto_session().events  # before any client is made: they copy it

        def before(context, **_):
            context["bench_t"] = time.perf_counter()

        def after(model, context, **_):
            end = time.perf_counter()
            with self._lock:
                self.calls.append((context.get("bench_t", end) - self.t0, end - self.t0, model.name,
                                   threading.current_thread().name))

        events.register("before-call", before)
        events.register("after-call", after)

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
            self.t0 = time.perf_counter()

    def show(self) -> None:
        """Calls of one operation that overlap are one line (a parallel wave)."""
        waves: list[list[tuple[float, float, str, str]]] = []
        for c in sorted(self.calls):
            for w in waves:
                if w[0][2] == c[2] and c[0] < max(x[1] for x in w) and c[0] - w[0][0] < 0.1:
                    w.append(c)
                    break
            else:
                waves.append([c])
        for w in sorted(waves, key=lambda w: w[0][0]):
            print(f"  {w[0][0]:6.2f} - {max(x[1] for x in w):6.2f}  {w[0][2]:<20} x{len(w):<3} "
                  f"({', '.join(sorted({x[3].rsplit('_', 1)[0] for x in w}))})")


def bench_converge(latency: float, size: int, trace: bool = False, compare: bool = False,
                   rounds: int = ROUNDS) -> None:
    from harness.images import SPEC, standard_images
    from mobykit.core import paths
    from mobykit.core.instance import InstanceCore
    from mobykit.flavor.moby import MobyFlavor
    from mobykit.group.controller import GroupController, Options
    from mobykit.group.spec import parse
    from mobykit.image.cache import Cache
    from mobykit.providers.aws import AWSProvider
    from mobykit.spi.group import GroupSpec

    with tempfile.TemporaryDirectory(prefix="bench-aws-") as tmp, moto(latency) as server:
        root = Path(tmp) / "root"
        root.mkdir()
        (root / "app.json").write_text("{}\n")
        (root / "spec.yml").write_text(SPEC)
        cache = Cache(Path(tmp) / "cache")
        standard_images(cache)
        config = {"cache": str(cache.root), "default_provider": "aws", "providers": {"aws": {}}}
        provider = AWSProvider({})
        provider.poll = 0.05
        calls = Trace(provider) if trace else None
        core = InstanceCore(config, providers={"aws": provider})
        flavor = MobyFlavor(config, instances=core)

        server_cpu: dict[int, list[float]] = {1: [], size: []}  # moto's CPU seconds per converge, by size
        client_cpu: dict[int, list[float]] = {1: [], size: []}  # this process's (controller, provider, botocore)

        def converge(name: str, n: int) -> float:
            props = {"Allocation": {"Size": n},
                     "Instance": {"Plugin": "mobykit/aws", "Properties": {"RunInstancesInput": {"InstanceType": "t3.micro"}}},
                     "Flavor": {"Plugin": "mobykit/moby", "Properties": {"Image": str(root / "spec.yml")}}}
            ctl = GroupController(parse(GroupSpec(name, props)), core, flavor,
                                  options=Options(poll_interval=1.0, max_parallel=max(16, n)))
            if calls is not None:
                calls.reset()
            s0, c0, t0 = cpu_seconds(server.pid), time.process_time(), time.perf_counter()
            ctl.start()
            try:
                end = t0 + 300
                while not (ctl.status().converged and ctl.status().healthy == n):
                    if time.perf_counter() > end:
                        raise SystemExit(f"bench: {name} did not converge: {ctl.status()}")
                    time.sleep(0.01)
                took = time.perf_counter() - t0
                server_cpu.setdefault(n, []).append(cpu_seconds(server.pid) - s0)
                client_cpu.setdefault(n, []).append(time.process_time() - c0)
                return took
            finally:
                ctl.stop()

        variants = [("consoles read during the listing", True)]
        if compare:
            variants.append(("consoles read after the listing returns (the earlier way)", False))
        times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name, _ in variants}
        with paths.using(paths.PathPolicy.under([root])):
            warm = converge("warm", 1)  # builds the image and publishes the AMI
            server_cpu[1].clear()
            client_cpu[1].clear()
            for i in range(rounds):  # interleaved, so the variants and sizes share the machine's load
                for name, early in variants:
                    provider.early_consoles = provider.consoles.share = early
                    times[name][0].append(converge(f"one-{i}-{early}", 1))
                    times[name][1].append(converge(f"many-{i}-{early}", size))
        flavor.close()
        provider.close()
    print(f"\nconverge with {latency * 1000:.0f} ms per AWS call (AMI already published; first group, "
          f"which published it: {warm:.2f} s); median of {rounds} groups each, interleaved")
    for name, (ones, manys) in times.items():
        ones, manys = sorted(ones), sorted(manys)
        one, many = ones[rounds // 2], manys[rounds // 2]
        print(f"{name}:\n{'instances':>10} {'seconds':>8} {'x one':>6}")
        print(f"{1:>10} {one:>8.2f} {1.0:>6.2f}   all: {' '.join(f'{t:.2f}' for t in ones)}")
        print(f"{size:>10} {many:>8.2f} {many / one:>6.2f}   all: {' '.join(f'{t:.2f}' for t in manys)}")
    cpu = {n: sorted(v)[len(v) // 2] for n, v in server_cpu.items() if v}
    print(f"moto's own CPU per converge (median): {cpu[1]:.2f} s for 1 instance, {cpu[size]:.2f} s for {size} "
          "(one Python process serving every call: the part of the difference the real service would not add)")
    cpu = {n: sorted(v)[len(v) // 2] for n, v in client_cpu.items() if v}
    print(f"this process's CPU per converge (median; controller, flavor, provider, botocore): {cpu[1]:.2f} s for "
          f"1 instance, {cpu[size]:.2f} s for {size}")
    if calls is not None:
        print(f"\nAWS calls of the last 0 -> {size} run (seconds from the commit; overlapping calls of one "
              "operation are one line):")
        calls.show()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data-mib", type=int, default=128)
    ap.add_argument("--rtt-ms", default="20,50", help="comma-separated added latencies for the publish runs")
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--size", type=int, default=20)
    ap.add_argument("--only", choices=("publish", "converge"), default=None)
    ap.add_argument("--trace", action="store_true", help="print the AWS calls of the last 0 -> size run")
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="converge runs per size and variant")
    ap.add_argument("--compare", action="store_true",
                    help="also converge with consoles read after the listing, interleaved")
    args = ap.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return 0
    import logging

    logging.basicConfig(level=logging.WARNING)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.only in (None, "publish"):
        bench_publish(args.data_mib, [float(x) / 1000 for x in args.rtt_ms.split(",") if x])
    if args.only in (None, "converge"):
        bench_converge(args.latency_ms / 1000, args.size, args.trace, args.compare, args.rounds)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
