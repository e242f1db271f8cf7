"""accel.detect: the forced override, the boot probe's verdict on this host, and its cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mobykit.errors import InvalidArgument
from mobykit.run import accel

ROOT = Path(__file__).resolve().parent.parent
DEBS = ROOT / ".cache" / "debs"


@pytest.fixture
def probe_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Linux kernel from the cached Debian kernel .deb (downloaded by the pkg tests / CI)."""
    monkeypatch.setenv("MOBYKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MOBYKIT_DEB_CACHE", str(DEBS))
    monkeypatch.delenv("MOBYKIT_ACCEL", raising=False)
    monkeypatch.delenv("MOBYKIT_ACCEL_KERNEL", raising=False)
    if not list(DEBS.glob("linux-image-*-amd64_*.deb")):
        # first run on a fresh checkout: fetch the kernel .deb the kernel recipe uses (once)
        from mobykit.pkg import apt, build, recipe

        _, kpkg = build.resolve_packages(recipe.load(ROOT / "specs" / "pkgs" / "kernel"), DEBS / "resolved.json")
        apt.download(kpkg, DEBS)
    kernel = accel.find_probe_kernel()
    assert kernel is not None and kernel.is_file()
    return kernel


def test_forced_by_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOBYKIT_CACHE", str(tmp_path))
    for value in ("kvm", "tcg"):
        monkeypatch.setenv("MOBYKIT_ACCEL", value)
        assert accel.detect() == value
    monkeypatch.setenv("MOBYKIT_ACCEL", "hvf")
    with pytest.raises(InvalidArgument, match="MOBYKIT_ACCEL"):
        accel.detect()
    assert not (tmp_path / "accel.json").exists()  # a forced answer is not a probe result


def test_probe_recognises_a_working_boot(probe_kernel: Path) -> None:
    # Under TCG the kernel boots to its no-root panic and qemu exits: the probe must say yes.
    assert accel.probe_kvm(probe_kernel, deadline=60, accel="tcg") is True


@pytest.mark.slow
def test_detect_says_tcg_here_and_caches(probe_kernel: Path, tmp_path: Path) -> None:
    if os.access("/dev/kvm", os.R_OK | os.W_OK) and os.environ.get("MOBYKIT_HOST_KVM_WORKS"):
        pytest.skip("this host has a working KVM")
    cache_file = tmp_path / "cache" / "accel.json"
    assert accel.detect(deadline=6) == "tcg"
    data = json.loads(cache_file.read_text())
    assert list(data.values()) == ["tcg"]
    (key,) = data
    assert key == accel.cache_key(probe_kernel)
    # The second answer comes from the cache: a planted verdict is returned without probing.
    cache_file.write_text(json.dumps({key: "kvm"}))
    assert accel.detect(deadline=6) == "kvm"
    assert accel.detect(deadline=6, refresh=True) == "tcg"
    assert json.loads(cache_file.read_text()) == {key: "tcg"}
