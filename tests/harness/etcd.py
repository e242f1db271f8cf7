"""A real 3-member etcd cluster (Debian's etcd-server) on loopback ports, for the store and
leadership tests. Each member is a child process stopped by its PID; data lives under one temp
dir removed at the end. Members can be stopped and started again (partition tests)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together so none is handed out twice)."""
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


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"


@dataclass
class EtcdCluster:
    members: list[Member]
    root: Path
    cluster_token: str
    _initial: str = field(default="")

    @property
    def url(self) -> str:
        """The store URL naming every member."""
        return "etcd://" + ",".join(m.endpoint for m in self.members)

    def start(self, m: Member, state: str = "new") -> None:
        args = [
            ETCD, "--name", m.name, "--data-dir", str(m.data_dir),
            "--listen-client-urls", f"http://127.0.0.1:{m.client_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{m.client_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{m.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{m.peer_port}",
            "--initial-cluster", self._initial, "--initial-cluster-state", state,
            "--initial-cluster-token", self.cluster_token,
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--log-outputs", "stderr", "--logger", "zap",
        ]
        with open(m.log, "ab") as log:
            m.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop(self, m: Member) -> None:
        if m.proc is not None and m.proc.poll() is None:
            os.kill(m.proc.pid, signal.SIGKILL)
            m.proc.wait()
        m.proc = None

    def restart(self, m: Member) -> None:
        self.start(m, state="existing")

    def wait_healthy(self, members: list[Member] | None = None, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for m in members or self.members:
            while True:
                try:
                    r = requests.get(f"http://{m.endpoint}/health", timeout=1)
                    if r.status_code == 200 and r.json().get("health") == "true":
                        break
                except (requests.RequestException, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd {m.name} not healthy; log:\n{m.log.read_text()[-3000:]}")
                if m.proc is not None and m.proc.poll() is not None:
                    raise RuntimeError(f"etcd {m.name} exited; log:\n{m.log.read_text()[-3000:]}")
                time.sleep(0.1)

    def stop_all(self) -> None:
        for m in self.members:
            self.stop(m)


@contextlib.contextmanager
def etcd_cluster(size: int = 3) -> Iterator[EtcdCluster]:
    """Start ``size`` members on free loopback ports; stop them by PID and remove their data."""
    root = Path(tempfile.mkdtemp(prefix="mobykit-etcd-"))
    ports = free_ports(2 * size)
    members = [Member(f"m{i}", ports[2 * i], ports[2 * i + 1], root / f"m{i}", root / f"m{i}.log") for i in range(size)]
    cluster = EtcdCluster(members, root, cluster_token=root.name)
    cluster._initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in members)
    try:
        for m in members:
            cluster.start(m)
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop_all()
        shutil.rmtree(root, ignore_errors=True)
