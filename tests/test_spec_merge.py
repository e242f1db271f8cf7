"""Several spec files on one command line combine as LinuxKit's AppendConfig combines them."""

from __future__ import annotations

from pathlib import Path

import pytest

from mobykit.errors import SpecError
from mobykit.spec import load

DATA = Path(__file__).parent / "data" / "specs"


def test_later_kernel_fields_override_and_lists_append():
    spec = load([DATA / "base.yml", DATA / "extra.yml"])
    # extra.yml sets cmdline and tar but no image: the image stays, the rest is replaced.
    assert spec.kernel.image == "linuxkit/kernel:6.6.71"
    assert spec.kernel.cmdline == "console=tty0 quiet"
    assert spec.kernel.tar == "none" and spec.kernel.tar_name is None
    assert spec.init == ["linuxkit/init:v1", "linuxkit/runc:v1"]
    assert [e.name for e in spec.onboot] == ["sysctl", "dhcpcd"]
    assert [e.name for e in spec.services] == ["getty", "sshd"]
    assert [e.name for e in spec.onshutdown] == ["bye"]
    assert [f.path for f in spec.files] == ["etc/one", "etc/two"]
    assert spec.trust == {"image": ["nginx"], "org": ["linuxkit"]}
    assert spec.sources == [str(DATA / "base.yml"), str(DATA / "extra.yml")]


def test_merged_entries_are_renumbered_and_keep_their_own_file():
    spec = load([DATA / "base.yml", DATA / "extra.yml"])
    dhcpcd = spec.onboot[1]
    assert dhcpcd.prefix == "containers/onboot/001-dhcpcd"
    assert (dhcpcd.file, dhcpcd.line, dhcpcd.field) == (str(DATA / "extra.yml"), 7, "onboot[0]")
    # Container ids follow the merged order: onboot, onshutdown, services.
    assert spec.idmap() == {"sysctl": 100, "dhcpcd": 101, "bye": 102, "getty": 103, "sshd": 104}


def test_order_matters_as_in_linuxkit():
    a = load([DATA / "base.yml", DATA / "extra.yml"])
    b = load([DATA / "extra.yml", DATA / "base.yml"])
    assert b.kernel.cmdline == "console=ttyS0"
    assert b.init == ["linuxkit/runc:v1", "linuxkit/init:v1"]
    assert a.canonical() != b.canonical()


def test_duplicate_service_across_files_names_both_places():
    with pytest.raises(SpecError) as info:
        load([DATA / "base.yml", DATA / "dup-service.yml"])
    e = info.value
    assert e.file == str(DATA / "dup-service.yml") and e.line == 4 and e.field == "services[1].name"
    assert f"duplicate service name 'getty' (first used at {DATA / 'base.yml'}:10)" in str(e)


def test_later_file_may_use_names_from_earlier_file_for_uids(tmp_path):
    extra = tmp_path / "files.yml"
    extra.write_text("files:\n  - path: etc/getty.conf\n    contents: x\n    uid: getty\n    gid: sysctl\n")
    spec = load([DATA / "base.yml", extra])
    f = spec.files[-1]
    assert (f.uid, f.gid) == (101, 100)


def test_a_kernel_fragment_alone_is_an_error_but_merged_is_fine(tmp_path):
    frag = tmp_path / "cmdline.yml"
    frag.write_text("kernel:\n  cmdline: console=ttyS0 debug\n")
    with pytest.raises(SpecError, match=r"cmdline\.yml:1: kernel\.image: kernel section has no image"):
        load([frag])
    assert load([DATA / "base.yml", frag]).kernel.cmdline == "console=ttyS0 debug"


def test_outputs_merge_without_duplicates(tmp_path):
    one = tmp_path / "one.yml"
    one.write_text("outputs:\n  - format: kernel+initrd\n")
    two = tmp_path / "two.yml"
    two.write_text("outputs:\n  - format: iso-bios\n  - format: kernel+initrd\n")
    assert load([one, two]).outputs == ["kernel+initrd", "iso-bios"]


def test_no_files_is_an_error():
    with pytest.raises(SpecError, match="no spec file given"):
        load([])
