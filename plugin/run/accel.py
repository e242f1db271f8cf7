"""Decide whether qemu guests here can use KVM or must fall back to TCG.

Why a boot probe and not ``os.access("/dev/kvm")``: on some hosts (ours among them) /dev/kvm
opens, ``KVM_CREATE_VM`` works and even SeaBIOS or hand-made long-mode code runs, yet a stock
Linux kernel hangs silently in its setup code. The only trustworthy test is to boot a real Linux
kernel under KVM with a deadline: with no root filesystem it prints its banner, panics, and with
``panic=-1 -no-reboot`` qemu exits on its own. Seeing the banner and that exit in time means KVM
works; a hang past the deadline means TCG.

The probe costs up to ``deadline`` seconds, so the verdict is cached per (host kernel, qemu
version, probe kernel) in ``<mobykit cache>/accel.json``. ``MOBYKIT_ACCEL=kvm|tcg`` overrides it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from mobykit.errors import InvalidArgument

QEMU = "qemu-system-x86_64"
BANNER = b"Linux version"
PANIC = b"Kernel panic"


def cache_root() -> Path:
    """The mobykit cache directory (same rule as mobykit.image.cache.default_root)."""
    try:
        from mobykit.image.cache import default_root
    except ImportError:  # the image cache module may not be importable in a minimal install
        env = os.environ.get("MOBYKIT_CACHE")
        if env:
            return Path(env)
        xdg = os.environ.get("XDG_CACHE_HOME")
        return (Path(xdg) if xdg else Path.home() / ".cache") / "mobykit"
    return Path(default_root())


def deb_cache() -> Path:
    """Where downloaded .debs are kept (shared with ``mobykit pkg build``)."""
    env = os.environ.get("MOBYKIT_DEB_CACHE")
    return Path(env) if env else cache_root() / "debs"


def qemu_version(qemu: str = QEMU) -> str:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.splitlines()[0].strip() if out.stdout else ""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _kernel_from_deb(cache_dir: Path) -> Path | None:
    """Extract vmlinuz from the newest cached linux-image .deb (once) so the probe has a kernel
    even on hosts whose own kernel is not readable (containers, Firecracker hosts)."""
    debs = sorted(deb_cache().glob("linux-image-*-amd64_*.deb"))
    if not debs or not shutil.which("dpkg-deb"):
        return None
    deb = debs[-1]
    out = cache_dir / "accel" / (deb.stem + ".vmlinuz")
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        r = subprocess.run(["dpkg-deb", "-x", str(deb), tmp], capture_output=True, check=False)
        found = sorted(Path(tmp).glob("boot/vmlinuz-*"))
        if r.returncode != 0 or not found:
            return None
        os.replace(found[0], out)
    return out


def find_probe_kernel() -> Path | None:
    """A Linux kernel to probe with: $MOBYKIT_ACCEL_KERNEL, the host's, or a cached Debian one."""
    env = os.environ.get("MOBYKIT_ACCEL_KERNEL")
    if env:
        return Path(env)
    host = Path(f"/boot/vmlinuz-{platform.release()}")
    if host.is_file() and os.access(host, os.R_OK):
        return host
    return _kernel_from_deb(cache_root())


def probe_kvm(kernel: Path, deadline: float = 10.0, qemu: str = QEMU, accel: str = "kvm") -> bool:
    """Boot ``kernel`` under ``accel`` without a root fs; True iff it reaches its panic and qemu
    exits before ``deadline``. qemu is killed by PID when the deadline passes (the KVM failure mode
    here is a silent hang). ``accel="tcg"`` exists so tests can show a working boot is recognised."""
    if accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    cmd = [
        qemu, "-accel", accel, "-M", "pc", "-m", "96", "-nodefaults", "-display", "none",
        "-monitor", "none", "-serial", "stdio", "-no-reboot", "-kernel", str(kernel),
        "-append", "console=ttyS0 earlyprintk=serial panic=-1 root=/dev/null",
    ]  # fmt: skip
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.DEVNULL)
        except OSError:
            return False
        try:
            proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return False
        out.seek(0)
        text = out.read()
    return BANNER in text and PANIC in text


def _load(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store(path: Path, key: str, verdict: str) -> None:
    """Atomic read-modify-write so a concurrent probe never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _load(path)
    data[key] = verdict
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".accel-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, sort_keys=True, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_key(kernel: Path | None, qemu: str = QEMU) -> str:
    kid = _sha256_file(kernel)[:16] if kernel else "none"
    return f"{platform.release()}|{qemu_version(qemu)}|{kid}"


def detect(deadline: float = 10.0, *, kernel: Path | None = None, cache_file: Path | None = None,
           refresh: bool = False) -> str:
    """Return "kvm" or "tcg" for qemu guests on this host.

    ``MOBYKIT_ACCEL`` forces the answer. Without a usable /dev/kvm the answer is "tcg" at once.
    Otherwise a Linux kernel (``kernel``, or see find_probe_kernel) is booted under KVM with
    ``deadline``; with no kernel to probe with the answer is "tcg" (always works, only slower)
    and is not cached. The verdict is cached in ``cache_file`` (default <cache>/accel.json).
    """
    forced = os.environ.get("MOBYKIT_ACCEL", "").strip()
    if forced:
        if forced not in ("kvm", "tcg"):
            raise InvalidArgument(f"MOBYKIT_ACCEL: must be kvm or tcg, not {forced!r}")
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or not shutil.which(QEMU):
        return "tcg"
    kernel = kernel or find_probe_kernel()
    if kernel is None:
        return "tcg"
    path = cache_file or cache_root() / "accel.json"
    key = cache_key(kernel)
    if not refresh:
        hit = _load(path).get(key)
        if hit in ("kvm", "tcg"):
            return hit
    verdict = "kvm" if probe_kvm(kernel, deadline) else "tcg"
    _store(path, key, verdict)
    return verdict
