"""Pulling from a REAL registry (Debian's docker-registry) with real token auth: anonymous tokens,
credentials from a docker config.json, manifest lists, digest checks, offline resolution."""

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.registry import (
    fresh_registry,  # noqa: F401  (fixture)
    local_registry,  # noqa: F401  (fixture)
    registry_with_auth,
    registry_with_basic_auth,
    unique_layer,
    write_image,
    write_index,
    write_multiarch,
)
from mobykit.errors import CacheMiss, RegistryError
from mobykit.image.cache import Cache
from mobykit.image.progress import Progress
from mobykit.image.registry import Registry, ensure

MAIN = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_host_docker_config(tmp_path, monkeypatch):
    """Never read the real ~/.docker: each test says which credentials exist."""
    empty = tmp_path / "docker-empty"
    empty.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(empty))


def docker_config(tmp_path: Path, host: str, user="alice", password="secret") -> Path:
    d = tmp_path / "docker"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"auths": {
        host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()},
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:hub").decode()},
    }}))
    return d


def push_image(reg, tmp_path, dest: str, layers=None, **kw) -> dict:
    lay = tmp_path / f"layout-{dest.replace('/', '_').replace(':', '_')}"
    d = write_image(lay, layers or [unique_layer()], **kw)
    write_index(lay, {"t": d})
    reg.push(lay, "t", dest)
    return d


@pytest.mark.slow
def test_private_pull_with_credentials_from_docker_config(local_registry, tmp_path, monkeypatch):  # noqa: F811
    reg = local_registry
    d = push_image(reg, tmp_path, "private/app:1")
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_config(tmp_path, reg.host)))
    cache = Cache(tmp_path / "cache")
    seen = len(reg.tokens.requests)
    info = Registry(cache).pull(f"{reg.host}/private/app:1", "amd64")
    assert info.digest == d["digest"] == reg.manifest_digest("private/app:1")
    assert info.ref == f"{reg.host}/private/app:1"
    assert all(cache.has_blob(layer.digest) for layer in info.layers)
    assert cache.resolve(f"{reg.host}/private/app:1", "amd64").digest == d["digest"]
    assert ("alice", ["repository:private/app:pull"]) in reg.tokens.requests[seen:]


@pytest.mark.slow
def test_anonymous_token_flow_for_public_repo(local_registry, tmp_path):  # noqa: F811
    reg = local_registry
    d = push_image(reg, tmp_path, "public/tool:1")
    seen = len(reg.tokens.requests)
    info = Registry(Cache(tmp_path / "cache")).pull(f"{reg.host}/public/tool:1", "amd64")
    assert info.digest == d["digest"]
    assert reg.tokens.requests[seen:] == [(None, ["repository:public/tool:pull"])]  # one token, reused for blobs


@pytest.mark.slow
def test_private_repo_without_credentials_is_unauthorized(local_registry, tmp_path):  # noqa: F811
    reg = local_registry
    push_image(reg, tmp_path, "private/secret:1")
    cache = Cache(tmp_path / "cache")
    with pytest.raises(RegistryError, match="unauthorized"):
        Registry(cache).pull(f"{reg.host}/private/secret:1", "amd64")
    assert cache.images() == []


@pytest.mark.slow
def test_wrong_password_is_reported_with_the_config_file(local_registry, tmp_path):  # noqa: F811
    reg = local_registry
    push_image(reg, tmp_path, "private/pw:1")
    cfg = docker_config(tmp_path, reg.host, password="wrong") / "config.json"
    with pytest.raises(RegistryError) as e:
        Registry(Cache(tmp_path / "cache"), auth_file=cfg).pull(f"{reg.host}/private/pw:1", "amd64")
    assert "'alice'" in str(e.value) and str(cfg) in str(e.value)


@pytest.mark.slow
def test_manifest_list_resolves_to_the_requested_arch(local_registry, tmp_path):  # noqa: F811
    reg = local_registry
    lay = tmp_path / "multi"
    amd_layer, arm_layer = unique_layer("amd"), unique_layer("arm")
    idx = write_multiarch(lay, {"amd64": [amd_layer], "arm64": [arm_layer]})
    write_index(lay, {"t": idx})
    reg.push(lay, "t", "public/multi:1", all_platforms=True)
    index_doc = json.loads((lay / "blobs/sha256" / idx["digest"][7:]).read_bytes())
    by_arch = {m["platform"]["architecture"]: m["digest"] for m in index_doc["manifests"]}
    cache = Cache(tmp_path / "cache")
    info = Registry(cache).pull(f"{reg.host}/public/multi:1", "arm64")
    assert (info.digest, info.index_digest) == (by_arch["arm64"], idx["digest"])
    assert info.config["architecture"] == "arm64"
    # only the arm64 image was downloaded; amd64 is a cache miss until pulled
    amd_manifest = json.loads((lay / "blobs/sha256" / by_arch["amd64"][7:]).read_bytes())
    assert not cache.has_blob(amd_manifest["layers"][0]["digest"])
    with pytest.raises(CacheMiss):
        cache.resolve(f"{reg.host}/public/multi:1", "amd64")
    assert ensure(cache, f"{reg.host}/public/multi:1", "amd64", registry=Registry(cache)).digest == by_arch["amd64"]
    with pytest.raises(Exception, match="no linux/s390x"):
        Registry(cache).pull(f"{reg.host}/public/multi:1", "s390x")


@pytest.mark.slow
def test_docker_schema2_media_types(local_registry, tmp_path):  # noqa: F811
    reg = local_registry
    lay = tmp_path / "v2"
    write_index(lay, {"t": write_image(lay, [unique_layer()])})
    reg.push(lay, "t", "public/v2s2:1", v2s2=True)
    info = Registry(Cache(tmp_path / "cache")).pull(f"{reg.host}/public/v2s2:1", "amd64")
    assert info.digest == reg.manifest_digest("public/v2s2:1")
    assert [layer.media_type for layer in info.layers] == ["application/vnd.docker.image.rootfs.diff.tar.gzip"]


@pytest.mark.slow
def test_pull_by_digest(local_registry, tmp_path):  # noqa: F811
    reg = local_registry
    d = push_image(reg, tmp_path, "public/bydigest:1")
    cache = Cache(tmp_path / "cache")
    ref = f"{reg.host}/public/bydigest@{d['digest']}"
    assert Registry(cache).pull(ref, "amd64").digest == d["digest"]
    assert (ref, d["digest"]) == cache.images()[0][:2]


@pytest.mark.slow
def test_tampered_blob_in_registry_is_refused(local_registry, tmp_path):  # noqa: F811
    reg = local_registry
    layer = unique_layer("tamper")
    d = push_image(reg, tmp_path, "public/tampered:1", layers=[layer])
    manifest = json.loads(reg.blob_file(d["digest"]).read_bytes())
    digest = manifest["layers"][0]["digest"]
    blob = reg.blob_file(digest)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x55
    blob.write_bytes(bytes(data))
    cache = Cache(tmp_path / "cache")
    with pytest.raises(RegistryError) as e:
        Registry(cache).pull(f"{reg.host}/public/tampered:1", "amd64")
    assert digest in str(e.value) and "mismatch" in str(e.value)
    assert not cache.has_blob(digest) and cache.images() == []


@pytest.mark.slow
def test_cached_build_makes_no_network_call(fresh_registry, tmp_path):  # noqa: F811
    reg = fresh_registry
    d = push_image(reg, tmp_path, "public/offline:1")
    cache = Cache(tmp_path / "cache")
    ref = f"{reg.host}/public/offline:1"
    client = Registry(cache)
    assert ensure(cache, ref, "amd64", registry=client).digest == d["digest"]
    made = client.requests_made
    reg.stop()  # the registry is gone: everything below must come from the cache
    assert ensure(cache, ref, "amd64", registry=client).digest == d["digest"]
    assert ensure(cache, f"{reg.host}/public/offline@{d['digest']}", "amd64", pull=True, registry=client).digest == d["digest"]
    assert client.requests_made == made
    with pytest.raises(RegistryError, match="cannot reach"):
        ensure(cache, ref, "amd64", pull=True, registry=Registry(cache, retries=0))


@pytest.mark.slow
def test_pull_true_refreshes_a_moved_tag(local_registry, tmp_path):  # noqa: F811
    reg = local_registry
    first = push_image(reg, tmp_path, "public/moving:latest")
    cache = Cache(tmp_path / "cache")
    ref = f"{reg.host}/public/moving"
    assert ensure(cache, ref, "amd64").digest == first["digest"]
    lay = tmp_path / "second"
    second = write_image(lay, [unique_layer("v2")])
    write_index(lay, {"t": second})
    reg.push(lay, "t", "public/moving:latest")
    assert ensure(cache, ref, "amd64").digest == first["digest"]  # cached: not refreshed
    assert ensure(cache, ref, "amd64", pull=True).digest == second["digest"]
    assert ensure(cache, ref, "amd64").digest == second["digest"]


@pytest.mark.slow
def test_plain_http_token_realm_on_a_non_loopback_host_is_refused(tmp_path):
    # 192.0.2.1 is TEST-NET-1: never routed. The refusal must come before any connection attempt.
    with registry_with_auth(realm="http://192.0.2.1/token") as (reg, _tokens):
        with pytest.raises(RegistryError) as e:
            Registry(Cache(tmp_path / "cache")).pull(f"{reg.host}/public/x:1", "amd64")
    assert "refusing plain http to 192.0.2.1" in str(e.value) and "--insecure-registry" in str(e.value)


def test_scheme_choice():
    r = Registry(Cache("/nonexistent"), insecure=["10.1.2.3:5000", "https://reg.lan"])
    assert r.base_url("127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert r.base_url("localhost:5000") == "http://localhost:5000"
    assert r.base_url("[::1]:5000") == "http://[::1]:5000"
    assert r.base_url("10.1.2.3:5000") == "http://10.1.2.3:5000"
    assert r.base_url("reg.lan") == "http://reg.lan"
    assert r.base_url("10.1.2.3:5001") == "https://10.1.2.3:5001"
    assert r.base_url("ghcr.io") == "https://ghcr.io"
    with pytest.raises(RegistryError, match="refusing plain http to example.com"):
        r.check_url("http://example.com/v2/", "test")


def test_docker_config_credentials(tmp_path, monkeypatch):
    from mobykit.image.registry import load_credentials

    monkeypatch.setenv("DOCKER_CONFIG", str(docker_config(tmp_path, "reg.example:5000")))
    creds = load_credentials()
    assert creds["reg.example:5000"] == ("alice", "secret")
    assert creds["docker.io"] == ("hub", "hub")  # https://index.docker.io/v1/ is the Hub
    assert Registry(Cache(tmp_path / "c"))._credentials("registry-1.docker.io") == ("hub", "hub")
    bad = tmp_path / "bad.json"
    bad.write_text('{"auths": {"h": {"auth": "not base64!"}}}')
    with pytest.raises(RegistryError, match=r"bad.json: auths.h.auth"):
        load_credentials(bad)


@pytest.mark.slow
def test_cli_pull_then_ls(local_registry, tmp_path):  # noqa: F811
    reg = local_registry
    d = push_image(reg, tmp_path, "public/cli:1")
    cache = tmp_path / "cache"
    r = subprocess.run([sys.executable, "-m", "mobykit.cli.main", "cache", "pull", f"{reg.host}/public/cli:1",
                        "--arch", "amd64", "--cache", str(cache)], capture_output=True, text=True, cwd=MAIN, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{reg.host}/public/cli:1\t{d['digest']}\n"
    r = subprocess.run([sys.executable, "-m", "mobykit.cli.main", "cache", "ls", "--cache", str(cache)],
                       capture_output=True, text=True, cwd=MAIN, timeout=60)
    assert r.stdout.split("\t")[:2] == [f"{reg.host}/public/cli:1", d["digest"]]


@pytest.mark.slow
def test_busybox_image_roundtrip(local_registry, tmp_path):  # noqa: F811
    """A realistic image (busybox-static, 2 MB layer) survives push and pull byte for byte."""
    from harness.registry import busybox_layer

    reg = local_registry
    layer = busybox_layer()
    d = push_image(reg, tmp_path, "public/busybox:1", layers=[layer])
    cache = Cache(tmp_path / "cache")
    shown = io.StringIO()
    with Progress(stream=shown, enabled=True) as progress:
        info = Registry(cache, progress=progress).pull(f"{reg.host}/public/busybox:1", "amd64")
    assert info.digest == d["digest"]
    assert cache.blob_path(info.layers[0].digest).read_bytes() == layer
    assert info.layers[0].digest[7:19] in shown.getvalue()  # the layer's download was displayed


@pytest.mark.slow
def test_transient_token_service_failure_is_retried(local_registry, tmp_path):  # noqa: F811
    reg = local_registry
    d = push_image(reg, tmp_path, "public/flaky:1")
    seen = len(reg.tokens.requests)
    reg.tokens.fail_next = 2
    assert Registry(Cache(tmp_path / "cache")).pull(f"{reg.host}/public/flaky:1", "amd64").digest == d["digest"]
    assert [u for u, _ in reg.tokens.requests[seen:]] == ["503", "503", None]


@pytest.mark.slow
def test_basic_auth_registry_uses_docker_config_credentials(tmp_path):
    with registry_with_basic_auth() as reg:
        d = push_image(reg, tmp_path, "private/basic:1")
        ref = f"{reg.host}/private/basic:1"
        with pytest.raises(RegistryError, match="requires authentication"):
            Registry(Cache(tmp_path / "anon")).pull(ref, "amd64")
        cfg = docker_config(tmp_path, reg.host) / "config.json"
        assert Registry(Cache(tmp_path / "cache"), auth_file=cfg).pull(ref, "amd64").digest == d["digest"]
