"""LinuxKit's build-time ``volumes:``: LinuxKit's own specs that use them build, each volume is laid
out at containers/volumes/NAME as LinuxKit lays it out, binds and mounts naming a volume are
rewritten to its merged directory in config.json, and bad volumes stop the build at load time with
file:line and the field."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from harness.images import Layer, busybox_layer, put_image, standard_images
from mobykit.errors import SpecError
from mobykit.image.build import build
from mobykit.image.cache import Cache
from mobykit.spec.load import load, loads

DATA = Path(__file__).parent / "data" / "specs" / "linuxkit-volumes"
ACCEPTED = ["000_rw_on_rw", "001_ro_on_ro", "003_ro_on_rw", "004_blank", "005_image", "006_mount_types",
            "example-volumes"]
MERGED = "/containers/volumes/{}/merged"


def _images(cache: Cache) -> None:
    """Every image the rewritten LinuxKit specs name: small busybox images."""
    standard_images(cache)
    shell = {"Entrypoint": ["/bin/sh"], "Env": ["PATH=/bin"]}
    for ref in ("runc:1", "alpine:3.20", "containerd:1", "ca-certificates:1", "sysctl:1", "dhcpcd:1",
                "busybox:latest", "getty:1", "rngd:1", "nginx:1.19.5-alpine"):
        put_image(cache, f"example.test/{ref}", [busybox_layer()], config=shell)
    put_image(cache, "example.test/poweroff:1", [busybox_layer({"poweroff.sh": b"#!/bin/sh\npoweroff -f\n"})], config=shell)
    put_image(cache, "example.test/alpine:3.19", [busybox_layer({"etc/alpine-release": b"3.19.0\n"})], config=shell)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Cache:
    c = Cache(tmp_path_factory.mktemp("volcache"))
    _images(c)
    return c


def _build(spec: Path | list[Path], cache: Cache, out: Path):
    specs = spec if isinstance(spec, list) else [spec]
    result = build(specs, formats=["tar"], outdir=out, cache=cache, name="img")
    return result, tarfile.open(out / "img.tar")


def _config(tf: tarfile.TarFile, bundle: str) -> dict:
    return json.load(tf.extractfile(f"containers/{bundle}/config.json"))


def _mount(cfg: dict, dest: str) -> dict:
    return next(m for m in cfg["mounts"] if m["destination"] == dest)


@pytest.mark.parametrize("name", ACCEPTED)
def test_linuxkit_volume_specs_build_with_linuxkits_layout(name, cache, tmp_path):
    spec = load([DATA / f"{name}.yml"])
    _, tf = _build(DATA / f"{name}.yml", cache, tmp_path / "out")
    with tf:
        members = {m.name: m for m in tf.getmembers()}
        for vol in spec.volumes:
            d = f"containers/volumes/{vol.name}"
            assert members[f"{d}/lower"].isdir() and members[f"{d}/merged"].isdir()
            assert not [n for n in members if n.startswith(f"{d}/merged/")], "merged is an empty mount point"
            # LinuxKit's init overlays a writable volume (upper layer on a tmpfs at tmp/) and
            # bind-mounts a read-only one: tmp/ is how it tells them apart.
            assert (f"{d}/tmp" in members) == (not vol.readonly)
            lower = [n for n in members if n.startswith(f"{d}/lower/")]
            if vol.image:
                assert tf.extractfile(f"{d}/lower/etc/alpine-release").read() == b"3.19.0\n"
                assert members[f"{d}/lower/bin/busybox"].isfile() or members[f"{d}/lower/bin/busybox"].islnk()
            else:
                assert lower == [], "a blank volume is an empty directory"
        for entry in spec.entries():
            cfg = _config(tf, entry.prefix.removeprefix("containers/"))
            sources = [m["source"] for m in cfg["mounts"]]
            assert not [s for s in sources if s in {v.name for v in spec.volumes}], "every volume name is rewritten"
            for key in ("binds", "binds.add"):
                for bind in entry.config.get(key, []):
                    src, dest, *opts = bind.split(":")
                    if spec.volume(src):
                        m = _mount(cfg, dest)
                        assert m["source"] == MERGED.format(src) and m["type"] == "bind"
                        assert ("ro" in m["options"]) == (opts == ["ro"])
            for mount in entry.config.get("mounts", []):
                if spec.volume(mount["source"]):
                    assert _mount(cfg, mount["destination"])["source"] == MERGED.format(mount["source"])


def test_the_spec_keeps_the_names_it_was_written_with(cache, tmp_path):
    """metadata: yaml (LinuxKit's etc/linuxkit-config) is the spec as written, volumes included."""
    _, tf = _build(DATA / "example-volumes.yml", cache, tmp_path / "out")
    with tf:
        text = tf.extractfile("etc/linuxkit-config").read().decode()
    assert "- blank:/blank" in text and "- alpine:/alpine" in text
    assert "volumes:\n- name: blank\n- image: example.test/alpine:3.19\n  name: alpine\n" in text


def test_a_read_write_bind_of_a_read_only_volume_is_refused_before_anything_is_written(cache, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SpecError) as e:
        _build(DATA / "002_rw_on_ro.yml", cache, out)
    assert str(e.value) == (f"{DATA / '002_rw_on_ro.yml'}:12: onboot[0].binds[1]: volume 'vola' is read-only "
                            "(volumes[].readonly) but is mounted read-write here; add the 'ro' option")
    assert not out.exists()


HEAD = "kernel:\n  image: k:1\ninit: [i:1]\n"


@pytest.mark.parametrize("text, message", [
    (HEAD + "services:\n  - name: s\n    image: s:1\n    binds:\n      - /etc:/etc\n      - data:/data\n",
     "x.yml:9: services[0].binds[1]: no volume named 'data' (a bind source without a leading '/' names a volume; "
     "volumes: none are declared)"),
    (HEAD + "onboot:\n  - name: s\n    image: s:1\n    binds.add:\n      - dat:/data\nvolumes:\n  - name: data\n",
     "x.yml:8: onboot[0].binds.add[0]: no volume named 'dat' (a bind source without a leading '/' names a volume; "
     "volumes: data)"),
    (HEAD + "onshutdown:\n  - name: s\n    image: s:1\n    mounts:\n      - type: bind\n        options: [rw]\n"
     "        source: data\n        destination: /d\nvolumes:\n  - name: data\n    readonly: true\n",
     "x.yml:10: onshutdown[0].mounts[0].source: volume 'data' is read-only (volumes[].readonly) but is mounted "
     "read-write here; add the 'ro' option"),
    (HEAD + "services:\n  - name: s\n    image: s:1\n    binds:\n      - data:/d:rshared\n"
     "volumes:\n  - name: data\n    readonly: true\n",
     "x.yml:8: services[0].binds[0]: volume 'data' is read-only (volumes[].readonly) but is mounted read-write "
     "here; add the 'ro' option"),
    (HEAD + "volumes:\n  - name: Data\n", "x.yml:5: volumes[0].name: volume name 'Data' must be lower-case letters, "
     "digits, '-' or '_'"),
    (HEAD + "volumes:\n  - name: a.b\n", "x.yml:5: volumes[0].name: volume name 'a.b' must be lower-case letters, "
     "digits, '-' or '_'"),
    (HEAD + "volumes:\n  - name: data\n  - name: logs\n  - name: data\n",
     "x.yml:7: volumes[2].name: duplicate volume name 'data' (first declared at line 5)"),
    (HEAD + "volumes:\n  - name: data\n    image: a:1\n    format: squashfs\n",
     "x.yml:7: volumes[0].format: format 'squashfs' is not 'filesystem' or 'oci'"),
    (HEAD + "volumes:\n  - name: data\n    format: oci\n",
     "x.yml:6: volumes[0].format: format is only for a volume made from an image (give 'image')"),
    (HEAD + "volumes:\n  - name: data\n    image: a:1\n    platforms: [linux/arm64]\n",
     "x.yml:7: volumes[0].platforms: platforms are only for a volume with format: oci"),
    (HEAD + "volumes:\n  - name: data\n    image: a:1\n    format: oci\n    platforms: [arm64]\n",
     "x.yml:8: volumes[0].platforms[0]: platform 'arm64' is not linux/ARCH or linux/ARCH/VARIANT"),
    (HEAD + "volumes:\n  - name: data\n    size: 1G\n", "x.yml:6: volumes[0].size: unknown field 'size'"),
    (HEAD + "volumes:\n  - image: a:1\n", "x.yml:5: volumes[0]: missing required field 'name'"),
    (HEAD + "volumes:\n  - name: data\n    readonly: yes please\n",
     "x.yml:6: volumes[0].readonly: expected true or false, got a string"),
    (HEAD + "volumes:\n  - name: data\n    persistent: true\n    image: a:1\n",
     "x.yml:7: volumes[0].image: a persistent volume is blank (backed by the machine's disk 'data'): remove 'image'"),
    (HEAD + "volumes:\n  - name: data\n    image: a:1\n    format: oci\n    persistent: true\n",
     "x.yml:6: volumes[0].image: a persistent volume is blank (backed by the machine's disk 'data'): remove 'image'"),
    (HEAD + "volumes:\n  - name: data\n    persistent: true\n    platforms: [linux/amd64]\n",
     "x.yml:7: volumes[0].platforms: a persistent volume is blank (backed by the machine's disk 'data'): "
     "remove 'platforms'"),
    (HEAD + "volumes:\n  - name: data\n    persistent: 1\n",
     "x.yml:6: volumes[0].persistent: expected true or false, got a number"),
])
def test_bad_volumes_are_refused_with_file_line_and_field(text, message):
    with pytest.raises(SpecError) as e:
        loads(text, "x.yml")
    assert str(e.value) == message


def test_volumes_merge_across_files_and_names_stay_unique(tmp_path):
    (tmp_path / "a.yml").write_text(HEAD + "services:\n  - name: s\n    image: s:1\n    binds: [data:/d]\n")
    (tmp_path / "b.yml").write_text("volumes:\n  - name: data\n")
    spec = load([tmp_path / "a.yml", tmp_path / "b.yml"])  # declared in a later file: fine, as in LinuxKit
    assert [v.name for v in spec.volumes] == ["data"]
    (tmp_path / "c.yml").write_text("volumes:\n  - name: other\n  - name: data\n")
    with pytest.raises(SpecError) as e:
        load([tmp_path / "a.yml", tmp_path / "b.yml", tmp_path / "c.yml"])
    assert str(e.value) == (f"{tmp_path / 'c.yml'}:3: volumes[1].name: duplicate volume name 'data' "
                            f"(first declared at {tmp_path / 'b.yml'}:2)")


def _index(cache: Cache, ref: str, arches: dict[str, str]) -> None:
    """Tag ``ref`` as a manifest list of the images tagged ``arches`` (arch -> single-arch ref)."""
    manifests = []
    for arch, single in arches.items():
        digest = cache.lookup(single)
        manifests.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest,
                          "size": cache.blob_path(digest).stat().st_size, "platform": {"architecture": arch, "os": "linux"}})
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": manifests}).encode()
    cache.tag(ref, cache.write_blob(index))


def test_format_oci_lays_the_image_out_as_an_oci_image_layout_for_its_platforms(cache, tmp_path):
    put_image(cache, "example.test/tool-amd64:1", [Layer({"tool": b"amd64 tool\n"})], arch="amd64")
    put_image(cache, "example.test/tool-arm64:1", [Layer({"tool": b"arm64 tool\n"})], arch="arm64")
    _index(cache, "example.test/tool:1", {"amd64": "example.test/tool-amd64:1", "arm64": "example.test/tool-arm64:1"})
    put_image(cache, "example.test/armonly:1", [Layer({"tool": b"arm only\n"})], arch="arm64")
    spec = tmp_path / "oci.yml"
    spec.write_text(HEAD.replace("k:1", "example.test/kernel:1").replace("i:1", "example.test/init:1") +
                    "services:\n  - name: s\n    image: example.test/alpine:3.20\n    binds: [tools:/tools:ro]\n"
                    "volumes:\n  - name: tools\n    image: example.test/tool:1\n    format: oci\n"
                    "    platforms: [linux/amd64, linux/arm64]\n    readonly: true\n"
                    "  - name: armonly\n    image: example.test/armonly:1\n    format: oci\n"
                    "    platforms: [linux/arm64]\n")
    result, tf = _build(spec, cache, tmp_path / "out")
    with tf:
        names = set(tf.getnames())
        root = "containers/volumes/tools/lower"
        assert json.load(tf.extractfile(f"{root}/oci-layout")) == {"imageLayoutVersion": "1.0.0"}
        index = json.load(tf.extractfile(f"{root}/index.json"))
        assert [(m["platform"]["architecture"], m["digest"]) for m in index["manifests"]] == [
            ("amd64", cache.lookup("example.test/tool-amd64:1")), ("arm64", cache.lookup("example.test/tool-arm64:1"))]
        assert {m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]} == {"example.test/tool:1"}
        blobs = {n for n in names if n.startswith(f"{root}/blobs/sha256/")}
        for m in index["manifests"]:  # every blob a manifest needs is there, with the bytes its digest says
            manifest = json.load(tf.extractfile(f"{root}/blobs/sha256/{m['digest'][7:]}"))
            for d in [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]:
                data = tf.extractfile(f"{root}/blobs/sha256/{d[7:]}").read()
                assert "sha256:" + hashlib.sha256(data).hexdigest() == d
        assert len(blobs) == 6  # two manifests, two configs, two layers
        assert not [n for n in names if n.startswith(f"{root}/tool")], "an OCI volume is not unpacked"
        # an image that exists only for another platform is carried, never resolved for the build's
        arm = json.load(tf.extractfile("containers/volumes/armonly/lower/index.json"))
        assert [m["platform"]["architecture"] for m in arm["manifests"]] == ["arm64"]
        assert "containers/volumes/tools/tmp" not in names and "containers/volumes/armonly/tmp" in names
    assert "example.test/armonly:1" not in result.inputs


def test_adding_a_volume_changes_the_image(cache, tmp_path):
    base = HEAD.replace("k:1", "example.test/kernel:1").replace("i:1", "example.test/init:1")
    (tmp_path / "a.yml").write_text(base)
    (tmp_path / "b.yml").write_text(base + "volumes:\n  - name: data\n")
    a, _ = _build(tmp_path / "a.yml", cache, tmp_path / "a")
    b, _ = _build(tmp_path / "b.yml", cache, tmp_path / "b")
    assert a.image_id != b.image_id


def test_a_persistent_volume_is_blank_with_a_marker_and_no_tmp(cache, tmp_path):
    base = HEAD.replace("k:1", "example.test/kernel:1").replace("i:1", "example.test/init:1")
    (tmp_path / "p.yml").write_text(base + "services:\n  - name: s\n    image: example.test/busybox:latest\n"
                                    "    binds: [data:/data, logs:/logs:ro]\n"
                                    "volumes:\n  - name: data\n    persistent: true\n"
                                    "  - name: logs\n    persistent: true\n    readonly: true\n")
    _, tf = _build(tmp_path / "p.yml", cache, tmp_path / "out")
    names = set(tf.getnames())
    for v in ("data", "logs"):
        assert {f"containers/volumes/{v}/lower", f"containers/volumes/{v}/merged"} <= names
        assert f"containers/volumes/{v}/tmp" not in names
        assert not [n for n in names if n.startswith(f"containers/volumes/{v}/lower/")]
    assert tf.extractfile("containers/volumes/data/persistent").read() == b"rw"
    assert tf.extractfile("containers/volumes/logs/persistent").read() == b"ro"
    assert _mount(_config(tf, "services/s"), "/data")["source"] == MERGED.format("data")


def test_persistent_false_builds_the_same_image_and_true_another(cache, tmp_path):
    base = HEAD.replace("k:1", "example.test/kernel:1").replace("i:1", "example.test/init:1")
    ids = []
    for i, extra in enumerate(("", "    persistent: false\n", "    persistent: true\n")):
        (tmp_path / f"{i}.yml").write_text(base + "volumes:\n  - name: data\n" + extra)
        ids.append(_build(tmp_path / f"{i}.yml", cache, tmp_path / f"o{i}")[0].image_id)
    assert ids[0] == ids[1] != ids[2]
