"""LinuxKit's build-time ``volumes:`` in a booted guest: the init (specs/pkgs/init/rootfs/init, via
usr/bin/mobykit-volumes) mounts every /containers/volumes/NAME before the onboot containers run.

The volumes are laid out by hand exactly as mobykit.image.assemble lays them out (lower/, merged/,
and tmp/ unless read-only; what the build does is tested in test_volumes.py), and the containers
bind their merged/ directories as the build rewrites ``binds: [NAME:/path]``. One boot (module
fixture); each test checks one promise against the console."""

from __future__ import annotations

import re

import pytest

from harness import guestkit as gk

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

IMAGE_ID = "sha256:" + "70" * 32
VOLUMES = "/containers/volumes"

# The service: every result on one line each, then it stays up (a service).
READER = r"""
echo "reader: content=$(cat /content/greeting.txt)"
echo "reader: scratch=$(cat /scratch/from-onboot 2>&1)"
if echo x > /content/new 2>/dev/null; then echo "reader: content-write=ok"; else echo "reader: content-write=refused"; fi
if echo x > /ro/new 2>/dev/null; then echo "reader: ro-write=ok"; else echo "reader: ro-write=refused"; fi
echo "reader: ro=$(cat /ro/fixed.txt)"
echo "reader: done"
exec sleep 3600
"""

# An onboot container after the writer that sees /containers/volumes (recursively, so with the
# init's mounts on each merged/) at /volumes: what is mounted where, and lower/ untouched.
INSPECT = r"""
for v in content scratch ro; do
  echo "mounts: $v $(grep " /volumes/$v/merged " /proc/self/mounts | cut -d' ' -f3,4 | cut -d, -f1)"
done
[ -e /volumes/scratch/lower/from-onboot ] && echo "lower: scratch changed" || echo "lower: scratch untouched"
"""


def _bind(name: str, dest: str, opts: str = "rw") -> dict:
    return {"destination": dest, "type": "bind", "source": f"{VOLUMES}/{name}/merged", "options": ["rbind", opts]}


def _volume(img: gk.GuestImage, name: str, files: dict[str, str], *, readonly: bool = False) -> None:
    """containers/volumes/NAME as the build lays it out (mobykit.image.assemble)."""
    v = img.root / "containers" / "volumes" / name
    (v / "lower").mkdir(parents=True)
    (v / "merged").mkdir()
    if not readonly:
        (v / "tmp").mkdir()
    for rel, text in files.items():
        (v / "lower" / rel).write_text(text)


@pytest.fixture(scope="module")
def console() -> str:
    parts = gk.parts()
    with gk.workdir() as w:
        img = gk.GuestImage(w, parts)
        img.add_system(image_id=IMAGE_ID)
        # "content": laid out from an image (its root filesystem is lower/); writable
        _volume(img, "content", {"greeting.txt": "hello from a volume image\n"})
        # "scratch": blank, writable; "ro": readonly: true
        _volume(img, "scratch", {})
        _volume(img, "ro", {"fixed.txt": "fixed\n"}, readonly=True)

        writer = gk.oci_config(["/bin/sh", "-c", "echo written-at-boot > /scratch/from-onboot && echo writer: ok"])
        writer["mounts"].append(_bind("scratch", "/scratch"))
        b = img.add_bundle("onboot", "000-writer", writer)
        (b / "rootfs" / "scratch").mkdir()
        inspect = gk.oci_config(["/bin/sh", "-c", INSPECT])
        inspect["mounts"].append({"destination": "/volumes", "type": "bind", "source": VOLUMES,
                                  "options": ["rbind", "rw"]})
        b = img.add_bundle("onboot", "001-inspect", inspect)
        (b / "rootfs" / "volumes").mkdir()

        reader = gk.oci_config(["/bin/sh", "-c", READER])
        # the readonly volume is bound read-write on purpose: the init's read-only bind must hold
        reader["mounts"] += [_bind("content", "/content"), _bind("scratch", "/scratch"), _bind("ro", "/ro")]
        b = img.add_bundle("services", "reader", reader)
        for d in ("content", "scratch", "ro"):
            (b / "rootfs" / d).mkdir()

        initrd = img.write_initrd(w / "initrd.gz")
        with gk.boot(parts.kernel, initrd, w, append="mobykit.metadata=none", http=False) as g:
            g.wait_for(r"^mobykit: (not )?ready .*$", 150)
            g.wait_for(r"^reader: done", 60)
            return g.text()


def test_boot_is_ready_with_volumes(console):
    assert f"mobykit: ready {IMAGE_ID}" in console, console[-3000:]
    assert "mobykit: volume" not in console


def test_service_reads_a_file_from_a_volume_laid_out_from_an_image(console):
    assert "reader: content=hello from a volume image" in console


def test_writable_volume_is_shared_between_containers(console):
    assert "writer: ok" in console
    assert "reader: scratch=written-at-boot" in console
    assert "reader: content-write=ok" in console


def test_writes_go_to_the_overlay_not_the_image(console):
    assert "mounts: content overlay rw" in console
    assert "mounts: scratch overlay rw" in console
    assert "lower: scratch untouched" in console


def test_readonly_volume_is_not_writable_even_bound_rw(console):
    assert re.search(r"^mounts: ro \S+ ro$", console, re.M), console[-3000:]
    assert "reader: ro=fixed" in console
    assert "reader: ro-write=refused" in console
    assert "reader: ro-write=ok" not in console
