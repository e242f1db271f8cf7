"""cidata ISOs: the NoCloud contract (label, file names, contents) and byte reproducibility."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mobykit.errors import InvalidArgument
from mobykit.run.cidata import make_iso


def _isoinfo(iso: Path, *args: str) -> str:
    return subprocess.run(["isoinfo", "-i", str(iso), *args], capture_output=True, text=True, check=True).stdout


def test_label_and_files_readable(tmp_path: Path) -> None:
    iso = make_iso(tmp_path / "ci.iso", "#cloud-config\nhostname: a\n", "instance-id: i-1\n",
                   extra={"network-config": b"version: 2\n"})
    assert iso == tmp_path / "ci.iso"
    assert "Volume id: cidata" in _isoinfo(iso, "-d")
    assert _isoinfo(iso, "-R", "-x", "/user-data") == "#cloud-config\nhostname: a\n"
    assert _isoinfo(iso, "-R", "-x", "/meta-data") == "instance-id: i-1\n"
    assert _isoinfo(iso, "-R", "-x", "/network-config") == "version: 2\n"
    listing = subprocess.run(["xorriso", "-indev", str(iso), "-ls", "/"], capture_output=True, text=True,
                             check=True).stdout
    assert sorted(listing.split()) == ["'meta-data'", "'network-config'", "'user-data'"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ci.iso"]  # no staging left behind


def test_reproducible_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    a = make_iso(tmp_path / "a" / "ci.iso", b"\x00binary\xff user data")
    b = make_iso(tmp_path / "b" / "ci.iso", b"\x00binary\xff user data")
    c = make_iso(tmp_path / "c" / "ci.iso", b"other data")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_overwrite_is_atomic_and_bad_names_rejected(tmp_path: Path) -> None:
    out = tmp_path / "ci.iso"
    make_iso(out, "one")
    with pytest.raises(InvalidArgument, match="../evil"):
        make_iso(out, "two", extra={"../evil": b"x"})
    assert _isoinfo(out, "-R", "-x", "/user-data") == "one"  # the old ISO is untouched
    make_iso(out, "two")
    assert _isoinfo(out, "-R", "-x", "/user-data") == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ci.iso"]
