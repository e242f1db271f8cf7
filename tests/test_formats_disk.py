"""Disk formats (raw-bios, raw-efi, qcow2-bios, qcow2-efi, vhd, dynamic-vhd, vmdk, aws, gcp) on the
small harness images: every format byte-reproducible across directories and times, the layouts
and ids they promise, what GCE's import and qemu-img check, and clean failures (a --size too
small, a missing tool). The harness kernel is fake, so nothing here boots; the slow boot tests
of each format are with ``mobykit run qemu``."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from harness.images import SPEC, standard_images
from mobykit.cli.main import main
from mobykit.errors import InvalidArgument, MissingTool
from mobykit.image.build import build, source_date_epoch
from mobykit.image.cache import Cache
from mobykit.image.disk import ids, sparse, sparsetar, syslinux, tools, vhd, vmdk
from mobykit.image.disk.partition import ESP_TYPE, GIB, MIB

COMBINED = ["raw-bios", "raw-efi", "qcow2-bios", "qcow2-efi", "vhd", "vmdk", "aws", "gcp"]
FILES = {"raw-bios": "example-bios.img", "raw-efi": "example-efi.img", "qcow2-bios": "example.qcow2",
         "qcow2-efi": "example-efi.qcow2", "vhd": "example.vhd", "vmdk": "example.vmdk", "aws": "example.raw",
         "gcp": "example.img.tar.gz"}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, Cache]:
    d = tmp_path_factory.mktemp("project")
    (d / "example.yml").write_text(SPEC)
    (d / "app.json").write_text('{"app": true}\n')
    cache = Cache(d / "cache")
    standard_images(cache)
    return d / "example.yml", cache


@pytest.fixture(scope="module")
def built(project, tmp_path_factory) -> tuple[Path, Path, str]:
    """Every disk format (but dynamic-vhd, which writes NAME.vhd too) built twice: in different
    directories, from different working directories, a second and more apart."""
    spec, cache = project
    outs = []
    for n in (1, 2):
        out = tmp_path_factory.mktemp(f"out{n}")
        cwd = os.getcwd()
        os.chdir(out.parent)
        try:
            r = build([spec], formats=COMBINED, outdir=out, cache=cache)
        finally:
            os.chdir(cwd)
        outs.append(out)
        if n == 1:
            time.sleep(1.1)
    return outs[0], outs[1], r.image_id


def _qemu_info(path: Path, fmt: str | None = None) -> dict:
    argv = ["qemu-img", "info", "--output=json", *(["-f", fmt] if fmt else []), str(path)]
    return json.loads(subprocess.run(argv, capture_output=True, check=True, text=True).stdout)


def _sfdisk(path: Path) -> dict:
    return json.loads(subprocess.run(["sfdisk", "--json", str(path)], capture_output=True, check=True,
                                     text=True).stdout)["partitiontable"]


def _mtype(disk: Path, name: str) -> bytes:
    """A file from the disk's first partition (at 1 MiB), read with mtools."""
    return subprocess.run(["mtype", "-i", f"{disk}@@{MIB}", f"::/{name}"], capture_output=True, check=True,
                          env=dict(os.environ, MTOOLS_SKIP_CHECK="1")).stdout


def _same_bytes(a: Path, b: Path) -> bool:
    """Whether two (mostly sparse) disk files hold the same bytes, reading only their data: outside
    ``data_extents`` both are zeros by definition."""
    if a.stat().st_size != b.stat().st_size:
        return False
    extents = sparse.data_extents(a)
    if extents != sparse.data_extents(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for offset, length in extents:
            fa.seek(offset)
            fb.seek(offset)
            if fa.read(length) != fb.read(length):
                return False
    return True


def test_every_disk_format_is_byte_reproducible(built):
    one, two, _ = built
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for fmt, name in FILES.items():
        assert _same_bytes(one / name, two / name), f"{fmt}: {name} differs between builds"


def test_a_format_built_alone_equals_the_one_built_with_others(project, built, tmp_path):
    spec, cache = project
    build([spec], formats=["vmdk"], outdir=tmp_path / "alone", cache=cache)
    assert (tmp_path / "alone" / "example.vmdk").read_bytes() == (built[0] / "example.vmdk").read_bytes()


def test_dynamic_vhd_is_reproducible_and_reads_back_at_the_disk_size(project, built, tmp_path):
    spec, cache = project
    paths = []
    for n in (1, 2):
        build([spec], formats=["dynamic-vhd"], outdir=tmp_path / f"d{n}", cache=cache)
        paths.append(tmp_path / f"d{n}" / "example.vhd")
        time.sleep(1.1 if n == 1 else 0)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    raw = built[0] / "example-bios.img"
    info = _qemu_info(paths[0])
    assert info["format"] == "vpc" and info["virtual-size"] == raw.stat().st_size
    assert paths[0].read_bytes()[:8] == b"conectix"  # dynamic: the footer's copy at the start
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "vpc", str(raw), str(paths[0])], check=True)


def test_vhd_and_dynamic_vhd_in_one_build_is_refused_not_overwritten(project, tmp_path):
    spec, cache = project
    with pytest.raises(InvalidArgument, match="vhd and dynamic-vhd both write example.vhd"):
        build([spec], formats=["vhd", "dynamic-vhd"], outdir=tmp_path / "o", cache=cache)
    assert not any((tmp_path / "o").iterdir())


def test_raw_bios_is_an_mbr_disk_booted_by_syslinux_with_the_spec_cmdline(built):
    out, _, image_id = built
    disk = out / "example-bios.img"
    assert disk.stat().st_size % MIB == 0
    table = _sfdisk(disk)
    assert table["label"] == "dos" and int(table["id"], 16) == ids.serial32(image_id, "mbr")
    (part,) = table["partitions"]
    assert part["start"] == 2048 and part["bootable"] and part["type"] in ("1", "e", "c")
    assert part["start"] + part["size"] == disk.stat().st_size // 512  # the partition fills the disk
    head = disk.read_bytes()[:512]
    assert head[:440] == Path(syslinux.MBR_BIN).read_bytes()[:440] and head[510:] == b"\x55\xaa"
    cfg = _mtype(disk, "syslinux.cfg").decode()
    assert cfg.startswith("SERIAL 0 115200\n") and "  APPEND console=ttyS0\n" in cfg and "root=" not in cfg
    assert _mtype(disk, "kernel") == b"\xfaKERNEL" * 4096
    assert _mtype(disk, "ldlinux.sys")  # syslinux installed
    boot_sector = disk.read_bytes()[MIB:MIB + 512]
    assert struct.unpack_from("<I", boot_sector, 28)[0] == 2048  # hidden sectors: the partition start
    assert struct.unpack_from("<I", boot_sector, 39 if boot_sector[38] == 0x29 else 67)[0] == \
        ids.serial32(image_id, "fat-bios")  # FAT volume id


def test_raw_efi_is_a_gpt_disk_with_an_esp_booting_grub(built):
    out, _, image_id = built
    disk = out / "example-efi.img"
    table = _sfdisk(disk)
    assert table["label"] == "gpt" and uuid.UUID(table["id"]) == ids.uuid_for(image_id, "gpt-disk")
    (part,) = table["partitions"]
    assert part["type"] == ESP_TYPE and uuid.UUID(part["uuid"]) == ids.uuid_for(image_id, "esp")
    assert part["start"] == 2048 and disk.stat().st_size % MIB == 0
    assert _mtype(disk, "EFI/BOOT/BOOTX64.EFI")[:2] == b"MZ"
    assert _mtype(disk, f"boot/mobykit-{ids.short_hex(image_id)}").decode() == image_id + "\n"
    assert _mtype(disk, "boot/kernel") == b"\xfaKERNEL" * 4096
    loader = _mtype(disk, "EFI/BOOT/BOOTX64.EFI")
    assert b"linux /boot/kernel 'console=ttyS0'\n" in loader  # the embedded config, cmdline unchanged


def test_converted_formats_read_back_with_qemu_img_as_the_raw_disk(built):
    out, _, image_id = built
    for raw_name, name, fmt, qfmt in (("example-bios.img", "example.qcow2", "qcow2-bios", "qcow2"),
                                      ("example-efi.img", "example-efi.qcow2", "qcow2-efi", "qcow2"),
                                      ("example-bios.img", "example.vhd", "vhd", "vpc"),
                                      ("example-bios.img", "example.vmdk", "vmdk", "vmdk")):
        raw, conv = out / raw_name, out / name
        info = _qemu_info(conv, qfmt)  # a fixed VHD has its footer only at the end: qemu probes it as raw
        assert info["format"] == qfmt and info["virtual-size"] == raw.stat().st_size, fmt
        if qfmt != "vpc":
            subprocess.run(["qemu-img", "check", "-q", "-f", qfmt, str(conv)], check=True)
        subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", qfmt, str(raw), str(conv)], check=True)
    assert _qemu_info(out / "example.vmdk")["format-specific"]["data"]["create-type"] == "streamOptimized"


def test_vhd_footer_carries_the_build_time_and_an_id_from_the_image(built):
    out, _, image_id = built
    data = (out / "example.vhd").read_bytes()
    size = (out / "example-bios.img").stat().st_size
    footer = data[-512:]
    assert len(data) == size + 512 and footer[:8] == b"conectix"
    assert struct.unpack(">I", footer[24:28])[0] == max(0, source_date_epoch() - vhd.EPOCH)  # VHD time starts in 2000
    assert footer[68:84] == ids.uuid_for(image_id, f"vhd:{size}").bytes
    assert struct.unpack(">I", footer[64:68])[0] == vhd.checksum(footer)


def test_vmdk_descriptor_names_its_own_file_and_a_cid_from_the_image(built):
    out, _, image_id = built
    data = (out / "example.vmdk").read_bytes()
    text = data[512:512 * 21].split(b"\0", 1)[0].decode()
    size = (out / "example-bios.img").stat().st_size
    assert f"CID={ids.serial32(image_id, f'vmdk:{size}'):08x}\n" in text
    assert f'RW {size // 512} SPARSE "example.vmdk"' in text


def test_gcp_passes_the_checks_gce_applies(built, tmp_path):
    """GCE's import: a gzip'd tar holding exactly one file, disk.raw, a whole number of GiB, with
    a partition table it can boot (here: MBR, active partition)."""
    out, _, _ = built
    archive = out / "example.img.tar.gz"
    raw = archive.read_bytes()
    assert raw[:3] == b"\x1f\x8b\x08" and raw[3] & 0x08 == 0 and raw[4:8] == b"\0\0\0\0"  # no name, mtime 0
    with tarfile.open(archive, "r:gz") as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == ["disk.raw"]
        (m,) = members
        assert m.isfile() and m.issparse() and m.size % GIB == 0 and m.size >= GIB
        assert (m.mode, m.uid, m.gid, m.uname, m.mtime) == (0o644, 0, 0, "root", source_date_epoch())
        tf.extractall(tmp_path / "py", filter="data")
    disk = tmp_path / "py" / "disk.raw"
    assert disk.stat().st_size == m.size
    head = disk.read_bytes()[:512]
    assert head[510:] == b"\x55\xaa" and any(head[446 + 16 * i] == 0x80 for i in range(4))  # an active partition
    assert _sfdisk(disk)["label"] == "dos"
    assert _same_bytes(disk, out / "example.raw")  # the aws disk: the same BIOS disk in whole GiB
    if shutil.which("tar"):  # GNU tar, which GCE's documentation makes these with, reads it back too
        listing = subprocess.run(["tar", "-tvzf", str(archive)], capture_output=True, check=True, text=True).stdout
        assert listing.split()[-1] == "disk.raw" and str(m.size) in listing
        (tmp_path / "gnu").mkdir()
        subprocess.run(["tar", "-xzf", str(archive), "-C", str(tmp_path / "gnu")], check=True)
        assert _same_bytes(tmp_path / "gnu" / "disk.raw", disk)


def test_aws_is_the_bios_disk_in_whole_gib(built):
    out, _, _ = built
    disk = out / "example.raw"
    assert disk.stat().st_size == GIB  # the default: 1 GiB when the image fits
    assert _sfdisk(disk)["partitions"][0]["bootable"]


def test_size_sets_the_disk_size_rounded_to_mib_or_for_clouds_gib(project, tmp_path):
    spec, cache = project
    build([spec], formats=["raw-efi", "aws"], outdir=tmp_path / "o", cache=cache, size=64 * MIB + 1)
    assert (tmp_path / "o" / "example-efi.img").stat().st_size == 65 * MIB
    assert (tmp_path / "o" / "example.raw").stat().st_size == GIB
    table = _sfdisk(tmp_path / "o" / "example-efi.img")
    part = table["partitions"][0]
    assert part["start"] + part["size"] == (65 * MIB - MIB) // 512  # the ESP fills all but the backup GPT MiB


def test_size_too_small_exits_2_naming_size_need_and_format_and_leaves_nothing(project, tmp_path):
    spec, cache = project
    env = dict(os.environ, MOBYKIT_CACHE=str(cache.root))
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "mobykit.cli.main", "build", "-o", str(out), "-f", "raw-bios",
                        "--size", "1M", str(spec)], capture_output=True, text=True, env=env)
    assert r.returncode == 2, r.stderr
    assert "--size 1M is too small for raw-bios: the image needs at least " in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert list(out.iterdir()) == []
    with pytest.raises(InvalidArgument, match="--size 3T is too large for raw-efi: at most 2T"):
        build([spec], formats=["raw-efi"], outdir=out, cache=cache, size=3 << 40)
    assert list(out.iterdir()) == []


def test_missing_tool_exits_2_naming_the_debian_package_and_leaves_nothing(project, tmp_path, monkeypatch, capsys):
    spec, cache = project
    real_which, real_access = shutil.which, os.access
    monkeypatch.setattr(tools.shutil, "which", lambda p, *a, **k: None if p == "sfdisk" else real_which(p, *a, **k))
    monkeypatch.setattr(tools.os, "access", lambda p, m, **k: False if str(p).endswith("/sfdisk") else real_access(p, m))
    out = tmp_path / "o"
    with pytest.raises(MissingTool, match=r"sfdisk is not installed \(Debian package fdisk"):
        build([spec], formats=["raw-bios"], outdir=out, cache=cache)
    assert list(out.iterdir()) == []
    monkeypatch.setenv("MOBYKIT_CACHE", str(cache.root))
    assert main(["build", "-o", str(out), "-f", "gcp", str(spec)]) == 2
    assert "apt-get install fdisk" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_missing_boot_code_names_its_package(project, tmp_path, monkeypatch):
    spec, cache = project
    monkeypatch.setattr(syslinux, "MBR_BIN", "/usr/lib/syslinux/mbr/no-such-mbr.bin")
    with pytest.raises(MissingTool, match="syslinux-common"):
        build([spec], formats=["raw-bios"], outdir=tmp_path / "o", cache=cache)
    assert list((tmp_path / "o").iterdir()) == []


# The pieces on their own.

def test_data_extents_depend_on_content_not_on_holes(tmp_path):
    dense, holey = tmp_path / "dense", tmp_path / "holey"
    content = bytearray(3 * MIB)
    content[5000:5010] = b"x" * 10
    content[2 * MIB + 100] = 1
    dense.write_bytes(content)  # zeros written out
    with open(holey, "wb") as f:
        f.truncate(len(content))
        for offset, length in ((4096, 4096), (2 * MIB, 4096)):
            f.seek(offset)
            f.write(content[offset:offset + length])
    assert sparse.data_extents(dense) == sparse.data_extents(holey) == [(4096, 4096), (2 * MIB, 4096)]
    sparse.copy(dense, tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == bytes(content)


def test_data_extents_scan_a_block_once_when_hole_edges_are_not_block_aligned(tmp_path, monkeypatch):
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.truncate(4 * MIB)
        f.seek(5000)
        f.write(b"a")
    monkeypatch.setattr(sparse, "_allocated", lambda fd, size: iter([(0, 5000), (6000, 9000), (3 * MIB, 4 * MIB)]))
    assert sparse.data_extents(path) == [(4096, 4096)]


def test_sparse_tar_with_many_runs_and_a_trailing_hole_reads_back(tmp_path):
    src = tmp_path / "disk.raw"
    with open(src, "wb") as f:  # 30 runs: the header's 4 and two extension blocks
        f.truncate(64 * MIB)
        for i in range(30):
            f.seek(i * MIB + 8192)
            f.write(bytes([i + 1]) * (4096 * (1 + i % 3)))
    buf = io.BytesIO()
    sparsetar.write(buf, src, "disk.raw", mtime=1_650_000_000)
    data = buf.getvalue()
    assert len(data) % sparsetar.RECORD == 0 and data[156:157] == b"S" and data[257:265] == b"ustar  \0"
    assert data[1024:1536][5 * 24:6 * 24] == b"%011o\0%011o\0" % (64 * MIB, 0)  # run 31 (2nd extension): the end
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        (m,) = tf.getmembers()
        assert m.size == 64 * MIB and m.mtime == 1_650_000_000 and len(m.sparse) == 30
        tf.extractall(tmp_path / "out", filter="data")
    assert (tmp_path / "out" / "disk.raw").read_bytes() == src.read_bytes()
    if shutil.which("tar"):
        (tmp_path / "gnu").mkdir()
        subprocess.run(["tar", "-xf", "-", "-C", str(tmp_path / "gnu")], input=data, check=True)
        assert (tmp_path / "gnu" / "disk.raw").read_bytes() == src.read_bytes()


def test_tar_numbers_switch_to_base_256_past_eleven_octal_digits():
    assert sparsetar.number(GIB, 12) == b"10000000000\0"
    big = 16 * GIB
    field = sparsetar.number(big, 12)
    assert field[0] == 0x80 and int.from_bytes(field[1:], "big") == big
    assert tarfile.nti(field) == big


def test_vhd_footer_fixup_recomputes_the_checksum_qemu_would(tmp_path):
    raw = tmp_path / "d.raw"
    with open(raw, "wb") as f:
        f.truncate(2 * MIB)
    out = tmp_path / "d.vhd"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on",
                    str(raw), str(out)], check=True)
    footer = out.read_bytes()[-512:]
    assert struct.unpack(">I", footer[64:68])[0] == vhd.checksum(footer)  # our checksum is qemu's
    vhd.fix(out, mtime=vhd.EPOCH + 12345, unique_id=uuid.UUID(int=7))
    fixed = out.read_bytes()[-512:]
    assert struct.unpack(">I", fixed[24:28])[0] == 12345 and fixed[68:84] == uuid.UUID(int=7).bytes
    assert _qemu_info(out, "vpc")["virtual-size"] == 2 * MIB


def test_vmdk_descriptor_fixup_keeps_everything_else():
    text = 'version=1\nCID=c889109e\nparentCID=ffffffff\ncreateType="streamOptimized"\nRW 8 SPARSE ".x.vmdk.tmp"\n'
    assert vmdk.fixed_descriptor(text, cid=0x1234, extent_name="x.vmdk") == \
        'version=1\nCID=00001234\nparentCID=ffffffff\ncreateType="streamOptimized"\nRW 8 SPARSE "x.vmdk"\n'
