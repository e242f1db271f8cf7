"""mobykit pkg build: recipes -> content-tagged OCI images that boot-time code can rely on.

The .debs are kept in /work/main/.cache/debs (MOBYKIT_DEB_CACHE) so only the first run downloads;
each test gets its own empty image cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mobykit.errors import SpecError
from mobykit.image.cache import Cache
from mobykit.pkg import build as pkgbuild
from mobykit.pkg import recipe as recipe_mod

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "specs" / "pkgs"
DEBS = ROOT / ".cache" / "debs"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cache:
    monkeypatch.setenv("MOBYKIT_DEB_CACHE", str(DEBS))
    monkeypatch.setenv("MOBYKIT_CACHE", str(tmp_path / "cache"))
    return Cache(tmp_path / "cache")


def _layer_and_config(cache: Cache, ref: str) -> tuple[Path, dict]:
    info = cache.resolve(ref, "amd64")
    assert len(info.layers) == 1
    return cache.blob_path(info.layers[0].digest), info.config


def _unpack(cache: Cache, ref: str, dest: Path) -> dict:
    layer, config = _layer_and_config(cache, ref)
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-xzf", str(layer), "-C", str(dest)], check=True)
    return config


def _label(config: dict) -> dict:
    return json.loads(config["config"]["Labels"]["org.mobyproject.config"])


# --- recipe errors: no apt, no network -------------------------------------------------------

def _write(tmp_path: Path, text: str) -> Path:
    d = tmp_path / "thing"
    d.mkdir(exist_ok=True)
    (d / "build.yml").write_text(text)
    return d


@pytest.mark.parametrize(
    "text, where",
    [
        ("packages: [busybox-static]\nkeeep: [bin/busybox]\n", "build.yml:2: keeep: unknown field"),
        ("packages:\n  - busybox-static\n  - 'Bad Name'\n", "build.yml:3: packages[1]: 'Bad Name' is not a valid name"),
        ("packages: [busybox-static]\nfiles:\n  - source: nothere\n", "build.yml:3: files[0].source:"),
        ("packages: [busybox-static]\nfiles:\n  - {source: ../x}\n", "build.yml:3: files[0].source: must be a relative path"),
        ("packages: [busybox-static]\nlabel: [net, host]\n", "build.yml:2: label: must be a mapping"),
        ("packages: [busybox-static]\nkeep: [../../etc]\n", "build.yml:2: keep[0]:"),
        ("kernel: {package: linux-image-cloud-amd64, modules: ['virtio net']}\n", "build.yml:1: kernel.modules[0]:"),
        ("env: [NOEQUALS]\nsymlinks: {bin/sh: busybox}\n", "build.yml:1: env[0]: 'NOEQUALS' is not NAME=value"),
        ("name: Bad_Name\nsymlinks: {bin/sh: busybox}\n", "build.yml:1: name:"),
        ("{}\n", "needs packages, kernel, files or symlinks"),
    ],
)
def test_bad_recipe_names_file_line_field(tmp_path: Path, text: str, where: str) -> None:
    d = _write(tmp_path, text)
    with pytest.raises(SpecError) as e:
        recipe_mod.load(d)
    assert str(d / "build.yml") in str(e.value)
    assert where in str(e.value)


def test_unknown_package_is_a_clear_build_error(tmp_path: Path, cache: Cache) -> None:
    from mobykit.errors import BuildError

    d = _write(tmp_path, "packages: [no-such-package-mobykit]\n")
    with pytest.raises(BuildError, match="no-such-package-mobykit"):
        pkgbuild.build(d, cache=cache)
    assert cache.images() == []


def test_cli_bad_recipe_exit_code(tmp_path: Path) -> None:
    d = _write(tmp_path, "packages: [busybox-static]\nbogus: 1\n")
    r = subprocess.run([sys.executable, "-m", "mobykit.cli.main", "pkg", "build", str(d)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2
    assert f"{d}/build.yml:2: bogus: unknown field" in r.stderr


def test_shipped_recipes_validate() -> None:
    names = sorted(p.name for p in pkgbuild.find_recipes(RECIPES))
    assert {"crun", "getty", "httpd", "init", "kernel", "runc", "sysctl"} <= set(names)
    for d in pkgbuild.find_recipes(RECIPES):
        assert recipe_mod.load(d).name == d.name


# --- builds (download once into .cache/debs) -------------------------------------------------

@pytest.mark.slow
def test_reproducible_across_fresh_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOBYKIT_DEB_CACHE", str(DEBS))
    results = []
    for name in ("a", "b"):
        c = Cache(tmp_path / name)
        results.append([pkgbuild.build(RECIPES / r, cache=c) for r in ("runc", "init")])
    a, b = results
    assert [(x.ref, x.digest) for x in a] == [(x.ref, x.digest) for x in b]
    assert all(x.rebuilt for x in a + b)
    # the blobs themselves are identical, not only the manifests
    for x in a:
        la, _ = _layer_and_config(Cache(tmp_path / "a"), x.ref)
        lb, _ = _layer_and_config(Cache(tmp_path / "b"), x.ref)
        assert la.read_bytes() == lb.read_bytes()


@pytest.mark.slow
def test_unchanged_recipe_not_rebuilt_changed_one_is(tmp_path: Path, cache: Cache) -> None:
    d = tmp_path / "httpd"
    shutil.copytree(RECIPES / "httpd", d)
    first = pkgbuild.build(d, cache=cache)
    manifest = cache.blob_path(first.digest)
    before = manifest.stat().st_mtime_ns
    again = pkgbuild.build(d, cache=cache)
    assert (again.ref, again.digest, again.rebuilt) == (first.ref, first.digest, False)
    assert manifest.stat().st_mtime_ns == before
    script = d / "rootfs" / "usr" / "bin" / "mobykit-httpd"
    script.write_text(script.read_text() + "# changed\n")
    changed = pkgbuild.build(d, cache=cache)
    assert changed.rebuilt and changed.ref != first.ref and changed.ref.startswith("mobykit/httpd:")
    assert not list((cache.root / "tmp").iterdir())  # no work dirs left behind


@pytest.mark.slow
def test_cli_build_all_and_show(tmp_path: Path, cache: Cache) -> None:
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "mobykit.cli.main", "pkg", "build", "--all", "--root", str(RECIPES)],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    refs = r.stdout.split()
    by_name = {x.split(":")[0].removeprefix("mobykit/"): x for x in refs}
    assert [x.split(":")[0] for x in refs] == sorted(x.split(":")[0] for x in refs)  # recipe order
    assert {"crun", "getty", "httpd", "init", "kernel", "runc", "sysctl"} <= set(by_name)
    for ref in refs:
        cache.resolve(ref, "amd64")
    s = subprocess.run([sys.executable, "-m", "mobykit.cli.main", "pkg", "show", "httpd", "--root", str(RECIPES)],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert s.returncode == 0 and s.stdout.split() == [by_name["httpd"]]
    again = subprocess.run([sys.executable, "-m", "mobykit.cli.main", "pkg", "build", str(RECIPES / "runc")],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    assert again.stdout.strip().splitlines()[-1] == by_name["runc"] and "up to date" in again.stderr


@pytest.mark.slow
def test_kernel_image_layout_and_modules(tmp_path: Path, cache: Cache) -> None:
    res = pkgbuild.build(RECIPES / "kernel", cache=cache)
    root = tmp_path / "k"
    _unpack(cache, res.ref, root)
    assert sorted(p.name for p in root.iterdir()) == ["kernel", "kernel.tar"]
    assert b"HdrS" in (root / "kernel").read_bytes()[:1024]  # a bzImage
    mods = tmp_path / "m"
    mods.mkdir()
    subprocess.run(["tar", "-xf", str(root / "kernel.tar"), "-C", str(mods)], check=True)
    (ver,) = [p.name for p in (mods / "lib" / "modules").iterdir()]
    dep = (mods / "lib" / "modules" / ver / "modules.dep").read_text()
    line = next(x for x in dep.splitlines() if x.startswith("kernel/drivers/net/virtio_net.ko:"))
    assert "net_failover.ko" in line and "failover.ko" in line  # dependencies resolved
    order = (mods / "etc" / "modules-load.d" / "mobykit.conf").read_text().split()
    for m in ("virtio_pci", "virtio_net", "virtio_blk", "isofs", "vfat", "overlay", "sr_mod", "veth", "bridge"):
        assert m in order
    assert order.index("virtio_ring") < order.index("virtio_pci") < order.index("virtio_net")
    assert order.index("fat") < order.index("vfat") and order.index("llc") < order.index("bridge")
    assert "ext4" not in order  # built into the cloud kernel
    # what the init's coldplug (device modaliases) and the kernel's on-demand loads look up
    aliases = (mods / "lib" / "modules" / ver / "modules.alias").read_text()
    assert re.search(r"^alias virtio:d00000001v\* virtio_net$", aliases, re.M)
    assert re.search(r"^alias pci:v00008086d00007010sv\*sd\*bc\*sc\*i\* ata_piix$", aliases, re.M)
    for alias, module in (("fs-iso9660", "isofs"), ("fs-overlay", "overlay"), ("rtnl-link-veth", "veth")):
        assert f"alias {alias} {module}\n" in aliases
    # every module listed is in the tar; nothing more than asked-for plus dependencies
    kos = sorted(p.name[:-3] for p in (mods / "lib" / "modules" / ver).rglob("*.ko"))
    assert kos == sorted(order)


@pytest.mark.slow
def test_crun_runs_from_its_image_alone(tmp_path: Path, cache: Cache) -> None:
    res = pkgbuild.build(RECIPES / "crun", cache=cache)
    root = tmp_path / "c"
    _unpack(cache, res.ref, root)
    # crun re-executes itself through /proc/self/exe: give the chroot a /proc, in a mount
    # namespace of its own so nothing is left mounted
    (root / "proc").mkdir(exist_ok=True)
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        f"mount -t proc proc '{root}/proc' && exec chroot '{root}' /usr/bin/crun --version"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "crun version 1." in r.stdout and "+SECCOMP" in r.stdout
    # only the binary and what it links: no Debian docs, no man pages
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.parts[len(root.parts)] != "proc")
    assert "usr/bin/crun" in files and all(f.startswith(("usr/bin/", "lib", "usr/lib")) for f in files), files


@pytest.mark.slow
def test_runc_runs_from_its_image_alone(tmp_path: Path, cache: Cache) -> None:
    res = pkgbuild.build(RECIPES / "runc", cache=cache)
    root = tmp_path / "r"
    _unpack(cache, res.ref, root)
    r = subprocess.run(["chroot", str(root), "/usr/sbin/runc", "--version"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "runc version" in r.stdout and "libseccomp" in r.stdout


@pytest.mark.slow
def test_init_image_has_init_and_applets(tmp_path: Path, cache: Cache) -> None:
    res = pkgbuild.build(RECIPES / "init", cache=cache)
    root = tmp_path / "i"
    _unpack(cache, res.ref, root)
    assert os.access(root / "init", os.X_OK)
    for applet in ("bin/sh", "bin/mount", "sbin/modprobe", "sbin/switch_root", "sbin/udhcpc", "sbin/poweroff"):
        assert os.readlink(root / applet) == "/bin/busybox", applet
    r = subprocess.run(["chroot", str(root), "/bin/sh", "-c", "echo $((6*7)); cat /init | head -1"],
                       capture_output=True, text=True)
    assert r.stdout.splitlines() == ["42", "#!/bin/sh"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_service_images_labels_and_httpd_serves(tmp_path: Path, cache: Cache) -> None:
    refs = {n: pkgbuild.build(RECIPES / n, cache=cache).ref for n in ("httpd", "getty", "sysctl")}
    root = tmp_path / "h"
    config = _unpack(cache, refs["httpd"], root)
    assert _label(config)["net"] == "host"
    assert "CAP_NET_BIND_SERVICE" in _label(config)["capabilities"]
    getty = _label(_layer_and_config(cache, refs["getty"])[1])
    assert getty["capabilities"] == ["all"] and "/dev:/dev" in getty["binds"]
    sysctl_cfg = _layer_and_config(cache, refs["sysctl"])[1]
    assert sysctl_cfg["config"]["Entrypoint"] == ["/usr/bin/mobykit-sysctl"]
    assert _label(sysctl_cfg)["readonly"] is True
    # run the httpd service's entrypoint in its own root on a loopback port and fetch the page
    port = _free_port()
    (root / "etc" / "mobykit").mkdir(parents=True)
    (root / "etc" / "mobykit" / "image-id").write_text("ab12cd\n")
    proc = subprocess.Popen(["chroot", str(root), "/usr/bin/env", f"PORT=127.0.0.1:{port}",
                             *config["config"]["Entrypoint"]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        body = ""
        for _ in range(100):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
                break
            except OSError:
                time.sleep(0.1)
        assert "mobykit demo: image sha256:ab12cd" in body
    finally:
        proc.kill()
        proc.wait()


# --- the image format, with a files-only recipe (no apt, fast) -------------------------------

def test_files_recipe_layer_is_canonical(tmp_path: Path, cache: Cache) -> None:
    import gzip
    import tarfile

    d = tmp_path / "demo"
    (d / "rootfs" / "usr" / "bin").mkdir(parents=True)
    (d / "rootfs" / "usr" / "bin" / "tool").write_text("#!/bin/sh\necho hi\n")
    (d / "rootfs" / "usr" / "bin" / "tool").chmod(0o775)  # a checkout's umask must not matter
    (d / "rootfs" / "etc").mkdir()
    (d / "rootfs" / "etc" / "conf").write_text("x=1\n")
    (d / "rootfs" / "etc" / "conf").chmod(0o600)
    (d / "secret").write_text("s\n")
    os.utime(d / "secret", (12345, 12345))
    (d / "build.yml").write_text(
        "files:\n  - {source: rootfs, dest: /}\n  - {source: secret, dest: /var/lib/app/secret, mode: '0400', uid: 100, gid: 101}\n"
        "symlinks: {bin/tool: /usr/bin/tool}\ncmd: [/usr/bin/tool]\nenv: [A=b]\n"
        "label: {net: host, binds: ['/etc:/hostroot/etc']}\n")
    res = pkgbuild.build(d, cache=cache)
    assert res.rebuilt and res.ref.startswith("mobykit/demo:")
    layer, config = _layer_and_config(cache, res.ref)
    raw = layer.read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0"  # gzip, header mtime 0
    with tarfile.open(layer) as tf:
        members = {m.name: m for m in tf.getmembers()}
        names = [m.name for m in tf.getmembers()]
    assert names == sorted(names)
    assert all(m.mtime == 0 for m in members.values())
    assert members["usr/bin/tool"].mode == 0o755 and members["etc/conf"].mode == 0o644
    s = members["var/lib/app/secret"]
    assert (s.mode, s.uid, s.gid) == (0o400, 100, 101)
    assert all(m.uid == 0 and m.gid == 0 for n, m in members.items() if n != "var/lib/app/secret")
    assert members["bin/tool"].issym() and members["bin/tool"].linkname == "/usr/bin/tool"
    diff_id = "sha256:" + __import__("hashlib").sha256(gzip.decompress(raw)).hexdigest()
    assert config["rootfs"] == {"type": "layers", "diff_ids": [diff_id]}
    assert config["config"]["Cmd"] == ["/usr/bin/tool"]
    assert config["config"]["Env"][-1] == "A=b" and config["config"]["Env"][0].startswith("PATH=")
    assert _label(config) == {"net": "host", "binds": ["/etc:/hostroot/etc"]}
    # same inputs in another cache: same digest; a file's mtime is not an input
    os.utime(d / "secret", (99999, 99999))
    other = pkgbuild.build(d, cache=Cache(tmp_path / "other"))
    assert (other.ref, other.digest) == (res.ref, res.digest)
