"""iso-bios, iso-efi and iso-efi-initrd: LinuxKit's file names, the boot loader configs carrying the
spec's command line, the tree's metadata on the iso-efi root, the root loader, byte-reproducible
builds (two directories, two times). Nothing is booted here (the boot tests live with `mobykit run
qemu`); every tool the formats use runs."""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from harness.images import SPEC, standard_images
from mobykit.errors import BuildError, MissingTool
from mobykit.image.build import build
from mobykit.image.cache import Cache
from mobykit.image.disk import tools
from mobykit.image.disk.iso9660 import quote
from mobykit.image.outputs import FORMATS, OutputContext
from mobykit.image.tree import Entry, Tree, write_tar

ISO_FORMATS = {"iso-bios": "moby.iso", "iso-efi": "moby-efi.iso", "iso-efi-initrd": "moby-efi-initrd.iso"}
BUSYBOX = Path("/bin/busybox")  # statically linked on the test machines (Debian's busybox-static)
CMDLINE = "console=ttyS0 quiet mobykit.metadata=none"
WEIRD = 'etc/we"ird \\ *name?\nwith ünïcode'


def _ctx(tar: Path, image_id: str, where: Path, mtime: int = 0) -> OutputContext:
    (where / "out").mkdir(parents=True)
    (where / "work").mkdir()
    return OutputContext(name="moby", outdir=where / "out", tar_path=tar, image_id=image_id, mtime=mtime,
                         workdir=where / "work")


def _tar(tree: Tree, path: Path) -> tuple[Path, str]:
    with open(path, "wb") as out:
        return path, "sha256:" + write_tar(tree, out, 0)


def _tree(busybox: bytes | None = None) -> Tree:
    """A small image with every kind of entry and metadata the ISO root must keep."""
    tree = Tree()
    tree.add_bytes("boot/kernel", b"bzImage" * 2000)
    tree.add_bytes("boot/cmdline", CMDLINE.encode())
    tree.add_bytes("init", b"#!/bin/sh\necho init\n", mode=0o755)
    tree.add_bytes("bin/busybox", busybox if busybox is not None else BUSYBOX.read_bytes(), mode=0o755)
    tree.add(Entry("containers/onboot/000-x/lower/bin/busybox", "hardlink", 0, linkname="bin/busybox"))
    tree.add_symlink("bin/sh", "busybox")
    tree.add_dir("home/user", mode=0o700, uid=1000, gid=1000)
    tree.add_bytes("home/user/secret", b"s", mode=0o600, uid=1000, gid=100)
    tree.add_bytes("etc/shadow", b"root:*:1::::::\n", mode=0o000, gid=42)
    tree.add_bytes("usr/bin/su", b"su", mode=0o4755)
    tree.add_dir("tmp", mode=0o1777)
    tree.add(Entry("dev/null", "char", 0o666, devmajor=1, devminor=3))
    tree.add(Entry("run/fifo", "fifo", 0o600))
    tree.add_bytes(WEIRD, b"odd name", mode=0o640)
    tree.add_bytes("lib/modules/6.1.0-test/kernel/fs/fake.ko", b"\x7fELF module")
    tree.add_bytes("lib/modules/6.1.0-test/modules.dep", b"kernel/fs/fake.ko:\n")
    return tree


def _listing(iso: Path) -> dict[str, tuple[str, str, str]]:
    """ISO path -> (mode string, uid, gid), from xorriso's own reading of the Rock Ridge tree."""
    out = subprocess.run(["xorriso", "-indev", str(iso), "-find", "/", "-exec", "lsdl", "--"],
                         capture_output=True, check=True).stdout.decode("utf-8", "surrogateescape")
    lines = re.finditer(r"^(\S{10})\s+\d+\s+(\d+)\s+(\d+)\s+\d+\s+\w+\s+\d+\s+\S+\s+'([^']*)'", out, re.M)
    return {m.group(4): (m.group(1), m.group(2), m.group(3)) for m in lines}  # a name may span lines


def _extract(iso: Path, path: str, dest: Path) -> bytes:
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", path, str(dest)],
                   capture_output=True, check=True)
    return dest.read_bytes()


def _efi_config(iso: Path, where: Path) -> str:
    """The grub config embedded in the El Torito EFI image's BOOTX64.EFI."""
    where.mkdir()
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract_boot_images", str(where)],
                   capture_output=True, check=True)
    efi = next(p for p in where.iterdir() if "uefi" in p.name)
    loader = subprocess.run(["mcopy", "-n", "-i", str(efi), "::/EFI/BOOT/BOOTX64.EFI", "-"], capture_output=True,
                            check=True, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}).stdout
    return loader[loader.index(b"serial --unit"):].split(b"\0", 1)[0].decode()


@pytest.fixture(scope="module")
def harness_tar(tmp_path_factory) -> tuple[Path, str]:
    """The canonical tar of the harness spec (tiny fake kernel, busybox, three bundles)."""
    d = tmp_path_factory.mktemp("harness")
    (d / "example.yml").write_text(SPEC)
    (d / "app.json").write_text('{"app": true}\n')
    cache = Cache(d / "cache")
    standard_images(cache)
    build([d / "example.yml"], formats=["tar"], outdir=d / "out", cache=cache)
    tar = d / "out" / "example.tar"
    return tar, "sha256:" + hashlib.sha256(tar.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built_twice(harness_tar, tmp_path_factory) -> list[dict[str, bytes]]:
    """Every ISO format built from the same tar in two directories, 1.2 s apart."""
    tar, image_id = harness_tar
    runs = []
    for i in (1, 2):
        where = tmp_path_factory.mktemp(f"run{i}")
        if i == 2:  # free inode numbers out of order, so the staging copy gets different ones
            for n in range(300):
                (where / f"pad{n}").write_bytes(b"x")
            for n in range(0, 300, 2):
                (where / f"pad{n}").unlink()
        ctx = _ctx(tar, image_id, where)
        for fmt in ISO_FORMATS:
            FORMATS[fmt](ctx)
        runs.append({p.name: p.read_bytes() for p in ctx.outdir.iterdir()})
        if i == 1:
            time.sleep(1.2)
    return runs


@pytest.fixture(scope="module")
def odd_iso(tmp_path_factory) -> tuple[Path, str]:
    """iso-efi of ``_tree()``: the root file system is the ISO itself."""
    d = tmp_path_factory.mktemp("odd")
    tar, image_id = _tar(_tree(), d / "c.tar")
    ctx = _ctx(tar, image_id, d)
    return FORMATS["iso-efi"](ctx)[0], image_id


def test_linuxkit_file_names_and_byte_reproducible(built_twice):
    first, second = built_twice
    assert sorted(first) == sorted(ISO_FORMATS.values())
    for name in first:
        assert first[name] == second[name], f"{name} differs between two builds"


def test_iso_bios_boots_isolinux_with_the_cmdline_unchanged(harness_tar, tmp_path):
    tar, image_id = harness_tar
    iso = FORMATS["iso-bios"](_ctx(tar, image_id, tmp_path))[0]
    names = _listing(iso)
    assert {"/boot/kernel", "/boot/initrd.img", "/isolinux/isolinux.bin", "/isolinux/ldlinux.c32",
            "/isolinux/isolinux.cfg"} <= set(names)
    cfg = _extract(iso, "/isolinux/isolinux.cfg", tmp_path / "isolinux.cfg").decode()
    assert "SERIAL 0 115200" in cfg and "KERNEL /boot/kernel" in cfg and "INITRD /boot/initrd.img" in cfg
    assert "  APPEND console=ttyS0\n" in cfg  # the harness spec's cmdline, nothing added
    # the initrd is kernel+initrd's: the whole root file system with the image id
    initrd = _extract(iso, "/boot/initrd.img", tmp_path / "initrd.img")
    assert b"etc/mobykit/image-id" in gzip.decompress(initrd) and image_id.encode() in gzip.decompress(initrd)
    eltorito = subprocess.run(["xorriso", "-indev", str(iso), "-report_el_torito", "plain"], capture_output=True,
                              check=True).stdout.decode()
    assert re.search(r"El Torito boot img :\s+1\s+BIOS\s+y\s+none", eltorito)
    raw = iso.read_bytes()
    assert raw[510:512] == b"\x55\xaa"  # hybrid MBR: the ISO boots as a disk too
    info = subprocess.run(["isoinfo", "-d", "-i", str(iso)], capture_output=True, check=True).stdout.decode()
    assert f"Volume id: MOBYKIT_{image_id[7:31].upper()}\n" in info  # 32 characters, from the image id


def test_iso_efi_adds_root_for_the_cdrom_and_boots_the_root_loader(harness_tar, tmp_path):
    tar, image_id = harness_tar
    iso = FORMATS["iso-efi"](_ctx(tar, image_id, tmp_path))[0]
    cfg = _efi_config(iso, tmp_path / "boot-images")
    marker = f"/boot/mobykit-{image_id[7:19]}-efi"
    assert f"search --no-floppy --file --set=root {marker}" in cfg
    assert "linux /boot/kernel 'console=ttyS0 root=/dev/sr0'\n" in cfg  # LinuxKit's rule: root= added
    assert "initrd /boot/initrd.img" in cfg
    names = _listing(iso)
    assert marker in names and "/init" in names and "/etc/mobykit/image-id" in names  # the root is the ISO
    assert _extract(iso, "/etc/mobykit/image-id", tmp_path / "id").decode() == image_id + "\n"
    loader = gzip.decompress(_extract(iso, "/boot/initrd.img", tmp_path / "loader"))
    members = subprocess.run(["cpio", "-it", "--quiet"], input=loader, capture_output=True, check=True).stdout.split()
    assert {b"init", b"bin/busybox", b"bin/switch_root", b"etc/mobykit/image-id", b"dev/console",
            b"lib/modules/6.1.0-test/kernel/fake.ko"} <= set(members)
    assert b"containers" not in members  # only what mounting the root needs


def test_iso_efi_keeps_a_spec_root_argument(tmp_path):
    tree = _tree()
    tree.add_bytes("boot/cmdline", b"console=ttyS0 root=/dev/sr1")
    tar, image_id = _tar(tree, tmp_path / "c.tar")
    iso = FORMATS["iso-efi"](_ctx(tar, image_id, tmp_path))[0]
    assert "linux /boot/kernel 'console=ttyS0 root=/dev/sr1'\n" in _efi_config(iso, tmp_path / "b")


def test_iso_efi_initrd_boots_the_whole_initrd_with_the_cmdline_unchanged(harness_tar, tmp_path):
    tar, image_id = harness_tar
    iso = FORMATS["iso-efi-initrd"](_ctx(tar, image_id, tmp_path))[0]
    cfg = _efi_config(iso, tmp_path / "boot-images")
    assert "linux /boot/kernel 'console=ttyS0'\n" in cfg
    assert f"/boot/mobykit-{image_id[7:19]}-efi-initrd" in cfg
    assert "/init" not in _listing(iso)  # the root file system is in the initrd, not on the ISO
    initrd = gzip.decompress(_extract(iso, "/boot/initrd.img", tmp_path / "initrd.img"))
    assert b"containers/services/svc/config.json" in initrd


def test_iso_efi_root_keeps_owners_modes_and_odd_names(odd_iso):
    iso, _ = odd_iso
    names = _listing(iso)
    assert names["/home/user"] == ("drwx------", "1000", "1000")
    assert names["/home/user/secret"] == ("-rw-------", "1000", "100")
    assert names["/etc/shadow"] == ("----------", "0", "42")
    assert names["/usr/bin/su"] == ("-rwsr-xr-x", "0", "0")
    assert names["/tmp"] == ("drwxrwxrwt", "0", "0")
    assert names["/run/fifo"] == ("prw-------", "0", "0")
    assert names["/bin/sh"][0].startswith("l")
    # a hard link is a node of its own with its holder's metadata; the content is stored once
    assert names["/containers/onboot/000-x/lower/bin/busybox"] == names["/bin/busybox"] == ("-rwxr-xr-x", "0", "0")
    assert len(iso.read_bytes()) < 2 * BUSYBOX.stat().st_size + 4 * 1024 * 1024
    assert "/dev/null" not in names and "/dev" in names  # device nodes are left out (see disk.iso9660)
    assert names["/" + WEIRD] == ("-rw-r-----", "0", "0")


def test_quote_protects_every_special_character():
    assert quote('/a b"c\\d\ne*?') == '"/a b\\x22c\\x5cd\\x0ae*?"'
    assert quote("/ü") == '"/\\xc3\\xbc"'


def test_root_loader_needs_a_static_busybox(tmp_path):
    tar, image_id = _tar(_tree(busybox=Path("/bin/ls").read_bytes()), tmp_path / "c.tar")
    ctx = _ctx(tar, image_id, tmp_path)
    with pytest.raises(BuildError, match="statically linked /bin/busybox"):
        FORMATS["iso-efi"](ctx)
    assert os.listdir(ctx.outdir) == []


@pytest.mark.parametrize("fmt", ["iso-bios", "iso-efi-initrd"])
def test_missing_xorriso_names_the_debian_package(harness_tar, tmp_path, monkeypatch, fmt):
    which = tools.shutil.which
    monkeypatch.setattr(tools.shutil, "which", lambda name: None if name == "xorriso" else which(name))
    tar, image_id = harness_tar
    ctx = _ctx(tar, image_id, tmp_path)
    with pytest.raises(MissingTool, match=r"xorriso is not installed \(Debian package xorriso") as e:
        FORMATS[fmt](ctx)
    assert e.value.exit_code == 2
    assert os.listdir(ctx.outdir) == []
