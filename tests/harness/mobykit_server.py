"""mobykit's own servers for tests: in-process gRPC/JSON-RPC servers over in-memory plugins, a
real ``mobykit serve`` child process (started and stopped by PID), TLS material made with the
``cryptography`` package, and an HTTP client over AF_UNIX as Infrakit's Go client talks."""

from __future__ import annotations

import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobykit.core.instance import InstanceCore
from mobykit.errors import InvalidArgument, NotFound
from mobykit.providers.memory import MemoryProvider
from mobykit.rpc.plugins import Plugins
from mobykit.spi.group import GroupDescription, GroupSpec
from mobykit.spi.types import Health, Spec

ROOT = Path(__file__).resolve().parents[2]
PYTHON = str(ROOT / ".venv" / "bin" / "python")


# -- small in-memory plugins (wire tests need exact, deterministic behaviour) ----------------------


class EchoFlavor:
    """A vanilla-like flavor: Properties {Init: [lines], Tags: {...}}; healthy when the instance has
    tag ``health`` = "1", unhealthy when "2", else unknown; drain records the id."""

    def __init__(self):
        self.drained: list[str] = []

    def validate(self, type, properties, allocation):
        if not isinstance(properties, dict):
            raise InvalidArgument("Properties: must be an object")
        unknown = sorted(set(properties) - {"Init", "Tags"})
        if unknown:
            raise InvalidArgument(f"Properties: unknown key(s) {', '.join(unknown)}")

    def prepare(self, type, properties, spec: Spec, allocation, index):
        self.validate(type, properties, allocation)
        lines = [spec.init] if spec.init else []
        lines += list(properties.get("Init", []))
        tags = dict(spec.tags)
        tags.update(properties.get("Tags", {}))
        tags["sequence"] = str(index.sequence)
        return Spec(properties=spec.properties, tags=tags, init="\n".join(lines), logical_id=spec.logical_id, attachments=spec.attachments)

    def healthy(self, type, properties, instance):
        return {"1": Health.HEALTHY, "2": Health.UNHEALTHY}.get(instance.tags.get("health"), Health.UNKNOWN)

    def drain(self, type, properties, instance):
        self.drained.append(instance.id)


@dataclass
class DictGroup:
    """A group plugin that only remembers specs and sizes (wire shape tests, not the controller)."""

    specs: dict[str, GroupSpec] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    def _get(self, id):
        if id not in self.specs:
            raise NotFound(f"group {id!r} not found")
        return self.specs[id]

    def commit_group(self, spec, pretend):
        if not pretend:
            self.specs[spec.id] = spec
            self.sizes[spec.id] = int(spec.properties.get("Allocation", {}).get("Size", 0))
        return f"{'would manage' if pretend else 'managing'} group {spec.id}"

    def free_group(self, id):
        self._get(id)
        del self.specs[id]

    def describe_group(self, id):
        self._get(id)
        return GroupDescription(instances=[], converged=True)

    def destroy_group(self, id):
        self.free_group(id)

    def inspect_groups(self):
        return [self.specs[k] for k in sorted(self.specs)]

    def destroy_instances(self, id, instances):
        self._get(id)
        self.sizes[id] = max(0, self.sizes[id] - len(instances))

    def size(self, id):
        self._get(id)
        return self.sizes[id]

    def set_size(self, id, size):
        self._get(id)
        self.sizes[id] = size


def memory_plugins(provider: Any | None = None, name: str = "memory", config: dict[str, Any] | None = None, **kwargs) -> Plugins:
    """Plugins whose instance core serves ``provider`` (a fresh MemoryProvider by default) as
    provider ``name``, which is also the default provider."""
    provider = provider if provider is not None else MemoryProvider()
    config = {"default_provider": name, **(config or {})}
    core = InstanceCore(config, providers={name: provider})
    defaults: dict[str, Any] = {"flavors": {"vanilla": EchoFlavor()}, "group": DictGroup(), "config": config}
    defaults.update(kwargs)
    return Plugins(instance=core, **defaults)


# -- servers -------------------------------------------------------------------------------------


@contextlib.contextmanager
def grpc_server(plugins: Plugins, *, tcp: bool = False, tls=None) -> Iterator[tuple[Any, list[str], Path]]:
    """An in-process gRPC server on a unix socket in a temp dir (and 127.0.0.1:0 when ``tcp``);
    yields (server, bound addresses, temp dir)."""
    from mobykit.rpc import server as rpc_server

    tmp = Path(tempfile.mkdtemp(prefix="mobykit-grpc-"))
    listens = [rpc_server.Listen.parse(f"unix:{tmp}/grpc.sock")]
    if tcp:
        listens.append(rpc_server.Listen.parse("tcp://127.0.0.1:0"))
    server, bound = rpc_server.make_server(plugins, listens, tls=tls, insecure=tcp and tls is None, max_workers=8)
    try:
        yield server, bound, tmp
    finally:
        rpc_server.stop(server, grace=5)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def jsonrpc_server(plugins: Plugins) -> Iterator[Any]:
    from mobykit.rpc.jsonrpc import JsonRpcServer

    tmp = Path(tempfile.mkdtemp(prefix="mobykit-jsonrpc-"))
    server = JsonRpcServer(plugins, tmp / "plugins" / "mobykit").start()
    try:
        yield server
    finally:
        server.stop(grace=5)
        shutil.rmtree(tmp, ignore_errors=True)


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over AF_UNIX, as Infrakit's Go client dials a plugin socket."""

    def __init__(self, path: str | Path, timeout: float = 15.0):
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


def post_raw(path: str | Path, body: bytes, conn: UnixHTTPConnection | None = None) -> tuple[int, str, bytes]:
    """POST ``body`` to / on the socket; returns (HTTP status, content type, body)."""
    own = conn is None
    conn = conn or UnixHTTPConnection(path)
    try:
        conn.request("POST", "/", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type", ""), r.read()
    finally:
        if own:
            conn.close()


def call(path: str | Path, method: str, params: Any, id: Any = 1) -> dict[str, Any]:
    status, _, data = post_raw(path, json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": id}).encode())
    assert status == 200, data
    return json.loads(data)


@dataclass
class ServeProcess:
    """A ``mobykit serve`` child; ``addresses`` are the lines it printed after "listening on"."""

    proc: subprocess.Popen
    workdir: Path
    addresses: list[str]
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stderr():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server never logged {text!r}:\n{self.stderr()}")
            time.sleep(0.05)

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "mobykit.cli.main", *args], capture_output=True, text=True, env=env, timeout=timeout)


@contextlib.contextmanager
def serve_process(args: list[str], config: dict[str, Any] | None = None, expect: int = 2) -> Iterator[ServeProcess]:
    """Run ``mobykit serve ARGS`` (with a config file written from ``config``) in a temp dir
    until it has printed ``expect`` listening lines; stop it by PID afterwards."""
    import yaml

    work = Path(tempfile.mkdtemp(prefix="mobykit-serve-"))
    cfg = work / "config.yml"
    cfg.write_text(yaml.safe_dump(config or {"default_provider": "memory", "providers": {"memory": {}}}))
    env = dict(os.environ, HOME=str(work / "home"), INFRAKIT_PLUGINS_DIR=str(work / "plugins"), MOBYKIT_CACHE=str(work / "cache"))
    env.pop("MOBYKIT_CONFIG", None)
    err = work / "stderr.log"
    with open(err, "w") as errf:
        proc = subprocess.Popen(
            [PYTHON, "-m", "mobykit.cli.main", "serve", "--config", str(cfg), *args],
            stdout=subprocess.PIPE,
            stderr=errf,
            text=True,
            env=env,
            cwd=work,
        )
    sp = ServeProcess(proc, work, [], err)
    reader = threading.Thread(target=_read_addresses, args=(sp,), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while len(sp.addresses) < expect:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mobykit serve did not start (rc={proc.poll()}):\n{sp.stderr()}")
            time.sleep(0.05)
        yield sp
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(5)  # the pipe ends with the process
        proc.stdout.close()
        shutil.rmtree(work, ignore_errors=True)


def _read_addresses(sp: ServeProcess) -> None:
    for line in sp.proc.stdout:
        if line.startswith("listening on "):
            sp.addresses.append(line[len("listening on ") :].strip())


# -- TLS -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSMaterial:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_cert: Path  # a client certificate signed by a CA the server does not trust
    other_key: Path


def make_tls(directory: Path) -> TLSMaterial:
    """A CA, a server certificate for 127.0.0.1/localhost, and client certificates (one from the
    CA, one from a stranger CA), all written as PEM into ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def ca_cert(k, cn):
        return (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(k, hashes.SHA256())
        )

    def leaf(k, cn, issuer_key, issuer, usage, san=None):
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer.subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(path: Path, obj) -> Path:
        if hasattr(obj, "private_bytes"):
            data = obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        else:
            data = obj.public_bytes(serialization.Encoding.PEM)
        path.write_bytes(data)
        return path

    directory.mkdir(parents=True, exist_ok=True)
    ca_key, other_ca_key = key(), key()
    ca, other_ca = ca_cert(ca_key, "mobykit test CA"), ca_cert(other_ca_key, "stranger CA")
    skey, ckey, okey = key(), key(), key()
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    scert = leaf(skey, "mobykit server", ca_key, ca, ExtendedKeyUsageOID.SERVER_AUTH, san)
    ccert = leaf(ckey, "mobykit client", ca_key, ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    ocert = leaf(okey, "intruder", other_ca_key, other_ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    return TLSMaterial(
        ca=write(directory / "ca.pem", ca),
        server_cert=write(directory / "server.pem", scert),
        server_key=write(directory / "server.key", skey),
        client_cert=write(directory / "client.pem", ccert),
        client_key=write(directory / "client.key", ckey),
        other_cert=write(directory / "other.pem", ocert),
        other_key=write(directory / "other.key", okey),
    )


__all__ = [
    "DictGroup",
    "EchoFlavor",
    "ServeProcess",
    "TLSMaterial",
    "UnixHTTPConnection",
    "call",
    "grpc_server",
    "jsonrpc_server",
    "make_tls",
    "memory_plugins",
    "post_raw",
    "run_cli",
    "serve_process",
]
