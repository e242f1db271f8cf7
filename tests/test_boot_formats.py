"""Every bootable output format of specs/images/minimal.yml boots to its readiness line under qemu
TCG through ``mobykit run qemu --until-ready`` (SeaBIOS for BIOS formats, OVMF for EFI ones).

The reference spec is built once, in every bootable format at once, except ``dynamic-vhd``: it
writes ``NAME.vhd`` as ``vhd`` does (LinuxKit's file names), which one build refuses, so it is a
second build under another name (everything but the format itself comes from the first build's
cache). Each boot must leave the build outputs as they were (disks boot as snapshots, ISOs
read-only) and no temp file behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mobykit.image.build import BuildResult, build
from mobykit.image.cache import Cache
from mobykit.run import media

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = ROOT / "specs" / "images" / "minimal.yml"
SEPARATE = {"dynamic-vhd": "minimal-dynamic"}  # format -> build name of its own build
BOOT_TIMEOUT = 300  # seconds: a loaded 2-core machine under TCG; reaching it is a failure, not a measure


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, BuildResult]]:
    """Build name -> result: ``minimal`` in every bootable format but those in SEPARATE, and one
    build per SEPARATE format, all into one directory from one cache."""
    old = os.environ.get("MOBYKIT_DEB_CACHE")
    os.environ.setdefault("MOBYKIT_DEB_CACHE", str(ROOT / ".cache" / "debs"))
    try:
        base = tmp_path_factory.mktemp("boot-formats")
        cache, out = Cache(base / "cache"), base / "out"
        results = {"minimal": build([MINIMAL], formats=[f for f in media.LAYOUTS if f not in SEPARATE], outdir=out,
                                    name="minimal", cache=cache)}
        for fmt, name in SEPARATE.items():
            results[name] = build([MINIMAL], formats=[fmt], outdir=out, name=name, cache=cache)
        yield results
    finally:
        if old is None:
            os.environ.pop("MOBYKIT_DEB_CACHE", None)


def _signature(paths: list[Path]) -> list[tuple[str, int, int, int]]:
    """What any write would change, without reading a 1 GiB disk."""
    return [(p.name, (st := p.stat()).st_size, st.st_mtime_ns, st.st_ino) for p in paths]


@pytest.mark.parametrize("fmt", list(media.LAYOUTS))
def test_format_boots_to_ready(built: dict[str, BuildResult], fmt: str, tmp_path: Path) -> None:
    result = built[SEPARATE.get(fmt, "minimal")]
    prefix = result.outdir / result.name
    files = media.find(prefix, fmt).files
    before = _signature(files)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, MOBYKIT_ACCEL="tcg", TMPDIR=str(scratch))
    r = subprocess.run([sys.executable, "-m", "mobykit.cli.main", "run", "qemu", str(prefix), "-f", fmt,
                        "--until-ready", "--timeout", str(BOOT_TIMEOUT)],
                       capture_output=True, text=True, env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                       timeout=BOOT_TIMEOUT + 60)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.strip().splitlines()[-1] == f"mobykit: {prefix}: ready {result.image_id}"
    assert _signature(files) == before  # the build output was not written
    assert list(scratch.iterdir()) == []  # OVMF variables, unpacked archives, cidata: all removed


def test_one_name_without_format_boots_the_quickest(built: dict[str, BuildResult]) -> None:
    result = built["minimal"]
    assert media.find(result.outdir / result.name).format == "kernel+initrd"
    assert media.find(result.outdir / SEPARATE["dynamic-vhd"]).format == "dynamic-vhd"
