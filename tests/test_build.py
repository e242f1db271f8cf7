"""The build pipeline end to end on small real images: outputs, NAME.json, reproducibility,
no rebuild of an unchanged spec, and no partial outputs on failure."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from harness.images import SPEC, Layer, put_image, standard_images
from mobykit.errors import ImageError, SpecError
from mobykit.image import outputs
from mobykit.image.build import build
from mobykit.image.cache import Cache


@pytest.fixture
def project(tmp_path: Path) -> Path:
    d = tmp_path / "project"
    d.mkdir()
    (d / "example.yml").write_text(SPEC)
    (d / "app.json").write_text('{"app": true}\n')
    return d


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    c = Cache(tmp_path / "cache")
    standard_images(c)
    return c


def _files(outdir: Path) -> set[str]:
    return {p.name for p in outdir.iterdir()}


def test_build_writes_formats_json_and_the_id_of_the_canonical_tar(project, cache, tmp_path):
    out = tmp_path / "out"
    r = build([project / "example.yml"], formats=["tar", "kernel+initrd"], outdir=out, cache=cache)
    assert _files(out) == {"example.tar", "example-kernel", "example-initrd.img", "example-cmdline", "example.json",
                           "example.spdx.json"}
    assert r.image_id == "sha256:" + hashlib.sha256((out / "example.tar").read_bytes()).hexdigest()
    meta = json.loads((out / "example.json").read_text())
    assert meta["image-id"] == r.image_id
    assert {i["ref"] for i in meta["inputs"]} == {"example.test/kernel:1", "example.test/init:1", "example.test/svc:1"}
    assert all(i["digest"] == cache.resolve(i["ref"], "amd64").digest for i in meta["inputs"])
    assert (out / "example-kernel").read_bytes() == b"\xfaKERNEL" * 4096
    assert (out / "example-cmdline").read_text() == "console=ttyS0"


def test_canonical_tar_has_linuxkit_layout(project, cache, tmp_path):
    out = tmp_path / "out"
    build([project / "example.yml"], formats=["tar"], outdir=out, cache=cache)
    with tarfile.open(out / "example.tar") as tf:
        members = {m.name: m for m in tf.getmembers()}
        names = list(members)
        assert names == sorted(names), "entries are in canonical (sorted) order"
        assert {"boot/kernel", "boot/cmdline", "init", "bin/busybox", "lib/modules/6.1.0-test/kernel/fake.ko"} <= set(names)
        # onboot entries are numbered, services by name, onshutdown numbered
        for prefix in ("containers/onboot/000-first", "containers/services/svc", "containers/onshutdown/000-bye"):
            assert f"{prefix}/config.json" in members and f"{prefix}/runtime.json" in members
        cfg = json.load(tf.extractfile("containers/services/svc/config.json"))
        assert cfg["process"]["args"] == ["/usr/bin/svc"]  # from the image's Entrypoint
        assert "CAP_NET_BIND_SERVICE" in cfg["process"]["capabilities"]["bounding"]  # from the label
        onboot = json.load(tf.extractfile("containers/onboot/000-first/config.json"))
        assert onboot["process"]["args"] == ["/bin/echo", "hello"]  # YAML over image
        assert tf.extractfile("etc/motd").read() == b"welcome\n"
        assert members["etc/motd"].mode == 0o644
        assert tf.extractfile("etc/app/config.json").read() == b'{"app": true}\n'
        assert members["etc/app/config.json"].mode == 0o600  # LinuxKit's default for files
        assert {m.mtime for m in members.values()} == {0}
        # a read-only bundle has its mount points made at build time
        ro = json.load(tf.extractfile("containers/services/svc/config.json"))["root"]
        if ro.get("readonly"):
            assert "containers/services/svc/rootfs/proc" in members


def test_reproducible_across_cache_order_timestamps_and_machines(project, tmp_path):
    outs = []
    for i, order in enumerate((("kernel", "init", "svc"), ("svc", "init", "kernel"))):
        c = Cache(tmp_path / f"cache{i}")
        standard_images(c, order)
        (project / "app.json").touch()
        os.utime(project / "app.json", (1_000_000 * (i + 1), 1_000_000 * (i + 1)))
        out = tmp_path / f"out{i}"
        outs.append((build([project / "example.yml"], formats=["tar", "kernel+initrd"], outdir=out, cache=c), out))
    (a, da), (b, db) = outs
    assert a.image_id == b.image_id
    for name in ("example.tar", "example-initrd.img", "example-kernel", "example-cmdline", "example.spdx.json"):
        assert (da / name).read_bytes() == (db / name).read_bytes(), name


def test_source_date_epoch_sets_every_timestamp(project, cache, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    build([project / "example.yml"], formats=["tar"], outdir=tmp_path / "out", cache=cache)
    with tarfile.open(tmp_path / "out" / "example.tar") as tf:
        assert {m.mtime for m in tf.getmembers()} == {1700000000}


def test_unchanged_spec_is_not_rebuilt_and_reads_no_layer(project, cache, tmp_path):
    out = tmp_path / "out"
    first = build([project / "example.yml"], outdir=out, cache=cache)
    assert first.rebuilt
    # Garble every layer blob: a rebuild that read any layer would now fail its digest check.
    for ref in ("example.test/kernel:1", "example.test/init:1", "example.test/svc:1"):
        for layer in cache.resolve(ref, "amd64").layers:
            path = cache.blob_path(layer.digest)
            path.chmod(0o644)
            path.write_bytes(b"garbage")
    again = build([project / "example.yml"], outdir=out, cache=cache)
    assert not again.rebuilt and again.image_id == first.image_id
    # A changed local file changes the inputs, so this one must rebuild (and now fails on the layers).
    (project / "app.json").write_text('{"app": false}\n')
    with pytest.raises(Exception):  # noqa: B017 - any failure: the point is that it tried
        build([project / "example.yml"], outdir=out, cache=cache)


def test_failed_build_leaves_no_partial_outputs(project, tmp_path):
    c = Cache(tmp_path / "cache")
    standard_images(c)
    # A hostile service image: a layer entry that climbs out of the root.
    put_image(c, "example.test/svc:1", [Layer({"../../etc/evil": b"x"})])
    out = tmp_path / "out"
    with pytest.raises(ImageError) as e:
        build([project / "example.yml"], formats=["tar", "kernel+initrd"], outdir=out, cache=c)
    assert "example.test/svc:1" in str(e.value) and "etc/evil" in str(e.value)
    assert not out.exists() or _files(out) == set()
    assert list((c.root / "tmp").iterdir()) == [] if (c.root / "tmp").exists() else True


def test_interrupted_build_leaves_previous_outputs_alone(project, cache, tmp_path, monkeypatch):
    out = tmp_path / "out"
    build([project / "example.yml"], formats=["kernel+initrd"], outdir=out, cache=cache)
    before = {n: (out / n).read_bytes() for n in _files(out)}
    (project / "app.json").write_text('{"changed": 1}\n')

    def interrupted(ctx):
        (ctx.outdir / f"{ctx.name}-kernel.partial").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setitem(outputs.FORMATS, "kernel+initrd", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build([project / "example.yml"], formats=["kernel+initrd"], outdir=out, cache=cache)
    assert {n: (out / n).read_bytes() for n in _files(out)} == before


def test_spec_error_names_file_line_field_before_any_fetch(tmp_path):
    spec = tmp_path / "bad.yml"
    spec.write_text("kernel:\n  image: example.test/kernel:1\nservices:\n  - name: x\n    image: nowhere.invalid/x:1\n    capabilities: [CAP_FOO]\n")
    with pytest.raises(SpecError) as e:
        build([spec], outdir=tmp_path / "out", cache=Cache(tmp_path / "cache"))
    assert str(e.value) == f"{spec}:6: services[0].capabilities: unknown capability CAP_FOO"
    assert not (tmp_path / "out").exists()


def test_cli_prints_image_id_last_and_exits_2_on_bad_spec(project, cache, tmp_path):
    env = dict(os.environ, MOBYKIT_CACHE=str(cache.root))
    ok = subprocess.run([sys.executable, "-m", "mobykit.cli.main", "build", "-o", str(tmp_path / "o"), "-f", "tar",
                         str(project / "example.yml")], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    last = ok.stdout.strip().splitlines()[-1]
    assert last == json.loads((tmp_path / "o" / "example.json").read_text())["image-id"]
    (tmp_path / "bad.yml").write_text("kernel: [1, 2\n")
    bad = subprocess.run([sys.executable, "-m", "mobykit.cli.main", "build", str(tmp_path / "bad.yml")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "bad.yml:" in bad.stderr and bad.stdout == ""


def test_uncached_image_without_network_is_a_clear_error(project, tmp_path):
    c = Cache(tmp_path / "empty")
    (project / "local.yml").write_text("init:\n  - 127.0.0.1:9/nothing/here:1\n")
    with pytest.raises(Exception) as e:
        build([project / "local.yml"], outdir=tmp_path / "out", cache=c)
    assert "127.0.0.1:9/nothing/here:1" in str(e.value)


def test_cli_unwritable_output_dir_is_one_line_not_a_traceback(project, cache, tmp_path):
    env = dict(os.environ, MOBYKIT_CACHE=str(cache.root))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = subprocess.run([sys.executable, "-m", "mobykit.cli.main", "build", "-o", str(blocker / "out"),
                        str(project / "example.yml")], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("mobykit: error:") and str(blocker) in r.stderr


def test_identical_files_are_stored_once_as_hard_links(project, cache, tmp_path):
    """busybox is in the init image and in every bundle's root: the tar holds its bytes once."""
    out = tmp_path / "out"
    build([project / "example.yml"], formats=["tar"], outdir=out, cache=cache)
    with tarfile.open(out / "example.tar") as tf:
        members = {m.name: m for m in tf.getmembers()}
        copies = [n for n in members if n.endswith("bin/busybox")]
        assert len(copies) >= 4
        holders = [n for n in copies if members[n].isfile()]
        assert holders == [min(copies)]  # the first path in canonical order holds the bytes
        assert all(members[n].islnk() and members[n].linkname == holders[0] for n in copies if n not in holders)
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["tar", "-C", str(dest), "-xf", str(out / "example.tar")], check=True)
    data = Path("/bin/busybox").read_bytes()
    assert all((dest / n).read_bytes() == data for n in copies)


def test_sharing_needs_equal_bytes_and_metadata():
    from mobykit.image.assemble import share_identical_files
    from mobykit.image.tree import Tree

    tree = Tree()
    blob = bytes(range(256)) * 32
    tree.add_bytes("a/same", blob, mode=0o755)
    tree.add_bytes("b/same", blob, mode=0o755)
    tree.add_bytes("c/other-mode", blob, mode=0o644)
    tree.add_bytes("d/other-owner", blob, mode=0o755, uid=1000)
    tree.add_bytes("e/other-bytes", blob[:-1] + b"x", mode=0o755)
    tree.add_bytes("f/small", b"tiny", mode=0o755)
    tree.add_bytes("g/small", b"tiny", mode=0o755)
    assert share_identical_files(tree) == 1
    kinds = {e.path: (e.type, e.linkname) for e in tree if e.type != "dir"}
    assert kinds["b/same"] == ("hardlink", "a/same")
    assert all(kinds[p][0] == "file" for p in ("a/same", "c/other-mode", "d/other-owner", "e/other-bytes", "f/small", "g/small"))


def test_initrd_from_the_held_tree_equals_one_from_the_canonical_tar(project, cache, tmp_path):
    """The build hands formats the tree it wrote the tar from; parsing the tar gives the same bytes."""
    out = tmp_path / "out"
    r = build([project / "example.yml"], formats=["tar", "kernel+initrd"], outdir=out, cache=cache)
    again = tmp_path / "again"
    again.mkdir()
    ctx = outputs.OutputContext(name="example", outdir=again, tar_path=out / "example.tar", image_id=r.image_id, mtime=0)
    outputs.FORMATS["kernel+initrd"](ctx)
    for suffix in ("-kernel", "-initrd.img", "-cmdline"):
        assert (again / f"example{suffix}").read_bytes() == (out / f"example{suffix}").read_bytes(), suffix


def test_the_same_spec_built_from_another_directory_is_the_same_image(project, cache, tmp_path):
    """A checkout in another place (another user, CI) must give the same image id: nothing in the
    image may depend on where the spec and its local files are."""
    import shutil

    other = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(project, other)
    a = build([project / "example.yml"], formats=["tar"], outdir=tmp_path / "a", cache=cache)
    b = build([other / "example.yml"], formats=["tar"], outdir=tmp_path / "b", cache=cache)
    assert a.image_id == b.image_id
    assert (tmp_path / "a" / "example.spdx.json").read_bytes() == (tmp_path / "b" / "example.spdx.json").read_bytes()
