"""One fake cloud shared by several ``mobykit serve`` processes: a MemoryProvider served to them
by ``multiprocessing.managers`` (the standard library's object server; no protocol of our own).

The test process hosts the cloud, so it sees every call directly: each create/destroy/set_tags
is recorded with the leader term of the server that made it (``TermCall``), in the order the
cloud executed them. Servers are started through ``replica.py`` beside this file, which runs the
real ``mobykit serve`` with the provider ``memory`` pointed here (``RemoteMemory``) and one extra
flavor (``mobykit/echo``: health from a tag, so a test can make one config unhealthy).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.managers import BaseManager
from pathlib import Path
from typing import Any

from mobykit.providers.memory import MemoryProvider

ROOT = Path(__file__).resolve().parents[2]
PYTHON = str(ROOT / ".venv" / "bin" / "python")
ENV_ADDRESS = "MOBYKIT_TEST_CLOUD"
ENV_KEY = "MOBYKIT_TEST_CLOUD_KEY"
MUTATIONS = ("create", "destroy", "set_tags")


@dataclass(frozen=True)
class TermCall:
    op: str
    term: int
    server: str
    id: str
    tags: dict[str, str]
    at: float = 0.0  # time.monotonic() in the test process when the cloud executed it


class Cloud:
    """The shared provider. Calls are serialised, so ``calls`` is the order the cloud saw."""

    def __init__(self):
        self.provider = MemoryProvider({})
        self.calls: list[TermCall] = []
        self._lock = threading.Lock()

    def call(self, server: str, term: int, op: str, *args: Any) -> Any:
        with self._lock:
            out = getattr(self.provider, op)(*args)
            if op in MUTATIONS:
                iid = out.id if op == "create" else args[0]
                tags = dict(args[0].tags) if op == "create" else (dict(args[1]) if op == "set_tags" else {})
                self.calls.append(TermCall(op, term, server, iid, tags, time.monotonic()))
            return out


class _Manager(BaseManager):
    pass


class RemoteMemory:
    """The provider ``memory`` inside a replica: every call goes to the shared Cloud, tagged with
    the leader term this server holds at that moment (0: none)."""

    def __init__(self, config: dict[str, Any] | None = None):
        class M(BaseManager):
            pass

        M.register("cloud")
        self._m = M(address=os.environ[ENV_ADDRESS], authkey=bytes.fromhex(os.environ[ENV_KEY]))
        self._m.connect()
        self._cloud = self._m.cloud()

    def _call(self, op: str, *args: Any) -> Any:
        from harness import replica

        election = replica.ELECTION
        term = election.term if election is not None else -1
        name = election.name if election is not None else "?"
        return self._cloud.call(name, term, op, *args)

    def validate(self, properties):
        return self._call("validate", properties)

    def publish_image(self, image, properties):
        return self._call("publish_image", image, properties)

    def create(self, spec):
        return self._call("create", spec)

    def set_tags(self, id, tags):
        return self._call("set_tags", id, tags)

    def destroy(self, id):
        return self._call("destroy", id)

    def list(self, tags):
        return self._call("list", tags)

    def console_output(self, id):
        return self._call("console_output", id)


@dataclass
class SharedCloud:
    cloud: Cloud
    address: str
    key: str
    root: Path
    replicas: list[Replica] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = dict(os.environ, **{ENV_ADDRESS: self.address, ENV_KEY: self.key})
        env.pop("MOBYKIT_CONFIG", None)
        env["PYTHONPATH"] = str(ROOT / "tests") + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def start_replica(self, name: str, store: str, *extra: str, home: Path | None = None) -> Replica:
        """``mobykit serve --store STORE`` as a child process listening on a unix socket."""
        work = self.root / name
        work.mkdir(parents=True, exist_ok=True)
        sock = work / "grpc.sock"
        log = work / "serve.log"
        n = 1
        while log.exists():  # a killed predecessor's log is kept beside, for failures
            log = work / f"serve.{n}.log"
            n += 1
        env = self.env()
        env["HOME"] = str(home or work / "home")
        cfg = work / "config.yml"
        cfg.write_text('default_provider: memory\nproviders: {memory: {}}\ngroup: {PollInterval: 0.2, BackoffInitial: 0.1}\n')
        with open(log, "ab") as f:
            proc = subprocess.Popen(
                [PYTHON, "-m", "harness.replica", "serve", "--config", str(cfg), "--no-infrakit",
                 "--listen", f"unix:{sock}", "--store", store, *extra],
                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=work)
        r = Replica(name, proc, sock, log)
        self.replicas.append(r)
        return r

    def creates(self, group: str) -> list[TermCall]:
        return [c for c in list(self.cloud.calls) if c.op == "create" and c.tags.get("infrakit.group") == group]


@dataclass
class Replica:
    name: str
    proc: subprocess.Popen
    socket: Path
    log: Path

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"

    def wait_listening(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while "listening on" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"replica {self.name} did not start (rc={self.proc.poll()}):\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@contextlib.contextmanager
def shared_cloud(root: Path) -> Iterator[SharedCloud]:
    """Serve one Cloud on a unix socket under ``root``; every replica started from it is killed by
    PID at the end."""
    cloud = Cloud()
    key = secrets.token_hex(16)

    class M(BaseManager):
        pass

    M.register("cloud", callable=lambda: cloud)
    address = str(root / "cloud.sock")
    manager = M(address=address, authkey=bytes.fromhex(key))
    server = manager.get_server()
    def serve() -> None:
        with contextlib.suppress(SystemExit):  # how serve_forever ends once stop_event is set
            server.serve_forever()

    t = threading.Thread(target=serve, daemon=True, name="shared-cloud")
    t.start()
    sc = SharedCloud(cloud, address, key, root)
    try:
        yield sc
    finally:
        for r in sc.replicas:
            r.kill()
        server.stop_event.set()
        with contextlib.suppress(OSError):
            server.listener.close()  # runs the listener's finalizer now: it removes the socket
