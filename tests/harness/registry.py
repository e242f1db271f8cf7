"""A real distribution registry (Debian's ``docker-registry``) with token auth, for tests.

The registry runs as a child process on 127.0.0.1:<free port> from a config file in a temp dir and
is stopped by PID. Auth is the real Docker token flow: the registry answers 401 with a Bearer
challenge pointing at a small token server run here (a thread), which issues RS256 JWTs signed by
a key whose self-signed certificate is the registry's ``rootcertbundle`` (sent as ``x5c``).

Token server policy: user ``alice``/``secret`` gets what it asks for; anonymous callers get pull
on repositories under ``public/`` and nothing else (so private pulls need credentials).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

USER, PASSWORD = "alice", "secret"
SERVICE, ISSUER = "mobykit-test-registry", "mobykit-test-issuer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- token server ----------------------------------------------------------------------------
@dataclass
class TokenServer:
    workdir: Path
    port: int = 0
    requests: list[tuple[str | None, list[str]]] = field(default_factory=list)
    fail_next: int = 0  # answer this many requests with 503 (a transient failure) first

    def start(self) -> TokenServer:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mobykit test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        self.cert_path = self.workdir / "token-cert.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def do_GET(self):
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        import jwt

        if self.fail_next > 0:
            self.fail_next -= 1
            self.requests.append(("503", []))
            h.send_response(503)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        q = parse_qs(urlsplit(h.path).query)
        scopes = q.get("scope", [])
        user = None
        authz = h.headers.get("Authorization", "")
        if authz.startswith("Basic "):
            u, _, p = base64.b64decode(authz[6:]).decode().partition(":")
            if (u, p) != (USER, PASSWORD):
                self.requests.append((f"bad:{u}", scopes))
                h.send_response(401)
                h.end_headers()
                return
            user = u
        self.requests.append((user, scopes))
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            granted = wanted if user else [a for a in wanted if a == "pull" and name.startswith("public/")]
            if kind == "repository" and granted:
                access.append({"type": "repository", "name": name, "actions": granted})
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": user or "", "aud": SERVICE, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": uuid.uuid4().hex, "access": access}
        token = jwt.encode(claims, self._key_pem, algorithm="RS256", headers={"x5c": [self._x5c]})
        body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


# --- registry ----------------------------------------------------------------------------------
@dataclass
class RegistryServer:
    workdir: Path
    realm: str
    cert_path: Path | None  # None: htpasswd (Basic) auth instead of tokens
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    def start(self) -> RegistryServer:
        self.port = self.port or free_port()
        cfg = self.workdir / "config.yml"
        cfg.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n"
            + (
                f"auth:\n  token:\n    realm: {self.realm}\n    service: {SERVICE}\n    issuer: {ISSUER}\n"
                f"    rootcertbundle: {self.cert_path}\n"
                if self.cert_path else
                f"auth:\n  htpasswd:\n    realm: {self.realm}\n    path: {self._htpasswd()}\n"
            )
        )
        self.log = open(self.workdir / "registry.log", "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self.proc = subprocess.Popen(["docker-registry", "serve", str(cfg)], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {(self.workdir / 'registry.log').read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("docker-registry did not start listening")

    def _htpasswd(self) -> Path:
        import bcrypt

        path = self.workdir / "htpasswd"
        path.write_text(f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")
        return path

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()

    def blob_file(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def push(self, layout: Path, tag: str, dest: str, *, all_platforms: bool = False, v2s2: bool = False) -> None:
        """skopeo copy oci:<layout>:<tag> docker://<host>/<dest>, as alice, preserving digests."""
        cmd = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--dest-creds", f"{USER}:{PASSWORD}",
               "--preserve-digests"]
        if all_platforms:
            cmd.append("--all")
        if v2s2:
            cmd = [c for c in cmd if c != "--preserve-digests"] + ["--format", "v2s2"]
        cmd += [f"oci:{layout}:{tag}", f"docker://{self.host}/{dest}"]
        env = dict(os.environ, HOME=str(self.workdir), XDG_RUNTIME_DIR=str(self.workdir))
        subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=120)

    def manifest_digest(self, repo_tag: str) -> str:
        """The digest the registry itself reports for a tag (ground truth for assertions)."""
        env = dict(os.environ, HOME=str(self.workdir), XDG_RUNTIME_DIR=str(self.workdir))
        out = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", "--creds", f"{USER}:{PASSWORD}",
                              f"docker://{self.host}/{repo_tag}"], check=True, capture_output=True, env=env, timeout=60)
        return "sha256:" + hashlib.sha256(out.stdout).hexdigest()


@contextlib.contextmanager
def registry_with_auth(realm: str | None = None) -> Iterator[tuple[RegistryServer, TokenServer]]:
    """A token server plus a registry using it; ``realm`` overrides the realm the registry
    advertises (to test what the client does with a hostile challenge)."""
    work = Path(tempfile.mkdtemp(prefix="mobykit-registry-"))
    tokens = TokenServer(work).start()
    reg = RegistryServer(work, realm or tokens.realm, tokens.cert_path)
    try:
        reg.start()
        yield reg, tokens
    finally:
        reg.stop()
        tokens.stop()
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def registry_with_basic_auth() -> Iterator[RegistryServer]:
    """A registry using htpasswd (HTTP Basic) auth: alice/secret may do anything, nobody else anything."""
    work = Path(tempfile.mkdtemp(prefix="mobykit-registry-"))
    reg = RegistryServer(work, "mobykit-basic", None)
    try:
        reg.start()
        yield reg
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def local_registry() -> Iterator[RegistryServer]:
    """One registry for a whole test session (token auth; push as alice)."""
    with registry_with_auth() as (reg, tokens):
        reg.tokens = tokens
        yield reg


@pytest.fixture
def fresh_registry() -> Iterator[RegistryServer]:
    """A registry of the test's own, which the test may stop."""
    with registry_with_auth() as (reg, tokens):
        reg.tokens = tokens
        yield reg


# --- building test images ----------------------------------------------------------------------
def layer_tar(files: dict[str, bytes], *, gz: bool = True) -> bytes:
    """A reproducible layer tar (optionally gzip'd with mtime 0) holding ``files`` (path -> bytes, mode 0755)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        dirs = sorted({str(Path(p).parent) for p in files if str(Path(p).parent) != "."})
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(ti)
        for p in sorted(files):
            ti = tarfile.TarInfo(p)
            ti.size, ti.mode = len(files[p]), 0o755
            tf.addfile(ti, io.BytesIO(files[p]))
    data = buf.getvalue()
    if gz:
        data = gzip.compress(data, mtime=0)
    return data


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _blob(layout: Path, data: bytes) -> dict:
    d = _sha(data)
    p = layout / "blobs/sha256" / d[7:]
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return {"digest": d, "size": len(data)}


def write_image(layout: Path, layers: list[bytes], *, arch: str = "amd64", gz: bool = True,
                cmd: list[str] | None = None) -> dict:
    """Write one image's blobs (config, layers, manifest) into ``layout``; return the manifest
    descriptor (with platform). Call write_index to tag it."""
    diff_ids = [_sha(gzip.decompress(layer) if gz else layer) for layer in layers]
    config = {"architecture": arch, "os": "linux", "config": {"Cmd": cmd or ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    cdesc = _blob(layout, json.dumps(config, sort_keys=True).encode())
    ltype = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gz else "")
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cdesc},
        "layers": [{"mediaType": ltype, **_blob(layout, layer)} for layer in layers],
    }
    mdesc = _blob(layout, json.dumps(manifest, sort_keys=True).encode())
    return {"mediaType": "application/vnd.oci.image.manifest.v1+json", **mdesc,
            "platform": {"architecture": arch, "os": "linux"}}


def write_multiarch(layout: Path, per_arch: dict[str, list[bytes]]) -> dict:
    """An OCI index over one image per architecture; returns the index descriptor."""
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [write_image(layout, layers, arch=a) for a, layers in sorted(per_arch.items())]}
    return {"mediaType": "application/vnd.oci.image.index.v1+json", **_blob(layout, json.dumps(index, sort_keys=True).encode())}


def write_index(layout: Path, tagged: dict[str, dict]) -> None:
    """index.json + oci-layout for ``layout``; ``tagged`` maps ref.name annotation -> descriptor."""
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    manifests = []
    for name, desc in sorted(tagged.items()):
        d = {k: v for k, v in desc.items() if k != "platform"}
        d["annotations"] = {"org.opencontainers.image.ref.name": name}
        manifests.append(d)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))


def unique_layer(label: str = "") -> bytes:
    """A small layer no other test shares (registry blobs are global: tampering must stay local)."""
    return layer_tar({f"etc/{label or 'id'}": uuid.uuid4().bytes})


def busybox_layer() -> bytes:
    return layer_tar({"bin/busybox": Path("/bin/busybox").read_bytes()})
