"""A private, unprivileged libvirt session daemon for tests, plus a tiny bootable kernel+initrd.

Why a session daemon run as ``nobody``: the system daemon needs systemd, iptables and a ``kvm``
group this machine does not have, and the session daemon refuses to run as root. Running it as
65534 with HOME and XDG_RUNTIME_DIR in a temp dir keeps every file it makes (sockets, logs, pool
volumes, qemu state) inside that dir, and root can still reach it through the socket. The daemon is
our child (PID 1 here reaps no orphans), stopped by PID; the temp dir is removed afterwards.

The boot files are a Debian cloud kernel (``apt-get download``, cached under ``.cache/debs``) and a
busybox initrd whose /init prints ``mobykit: ready sha256:<id>`` on the serial console and sleeps,
which is all the readiness protocol needs, without waiting for the real image pipeline.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DAEMON_UID = 65534
REPO = Path(__file__).resolve().parents[2]
DEBS = REPO / ".cache" / "debs"
POOL = "mobykit"


@dataclass
class SessionLibvirtd:
    """A running daemon. ``config`` is what LibvirtProvider takes (URI plus a pool path it may use)."""

    uri: str
    root: Path
    pid: int
    pool_path: Path

    @property
    def config(self) -> dict[str, str]:
        return {"URI": self.uri, "Pool": POOL, "PoolPath": str(self.pool_path)}


def _chown_tree(path: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(path):
        os.chown(dirpath, DAEMON_UID, DAEMON_UID)
        for name in filenames:
            os.chown(os.path.join(dirpath, name), DAEMON_UID, DAEMON_UID)


def start_libvirtd(timeout: float = 30.0) -> tuple[SessionLibvirtd, subprocess.Popen]:
    """Start ``libvirtd --timeout 0`` as an unprivileged child and wait until its socket answers."""
    import libvirt

    root = Path(tempfile.mkdtemp(prefix="mobykit-libvirtd-"))
    os.chmod(root, 0o755)  # the daemon user must traverse it
    home, run = root / "home", root / "run"
    for d in (home, run, home / ".config", home / ".cache", home / ".local" / "share"):
        d.mkdir(parents=True, exist_ok=True)
    pool_path = home / "pool"
    # qemu's own stdout/stderr log to a plain file, not through virtlogd: a virtlogd the daemon
    # spawned would outlive it as an orphan that nothing here reaps.
    (home / ".config" / "libvirt").mkdir(parents=True, exist_ok=True)
    (home / ".config" / "libvirt" / "qemu.conf").write_text('stdio_handler = "file"\n')
    _chown_tree(root)
    os.chmod(run, 0o700)
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(run),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "LIBVIRT_LOG_OUTPUTS": "3:stderr",
    }
    log = open(root / "libvirtd.log", "wb")
    proc = subprocess.Popen(
        ["setpriv", f"--reuid={DAEMON_UID}", f"--regid={DAEMON_UID}", "--clear-groups",
         "libvirtd", "--timeout", "0"],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root,
    )
    log.close()
    sock = run / "libvirt" / "libvirt-sock"
    uri = f"qemu:///session?socket={sock}"
    daemon = SessionLibvirtd(uri=uri, root=root, pid=proc.pid, pool_path=pool_path)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if sock.exists():
            try:
                libvirt.open(uri).close()
                return daemon, proc
            except libvirt.libvirtError as e:
                last = e
        time.sleep(0.1)
    output = (root / "libvirtd.log").read_text(errors="replace")[-2000:]
    stop_libvirtd(daemon, proc)
    raise RuntimeError(f"session libvirtd did not come up ({last}); log tail:\n{output}")


def _kill_leftover_domains(uri: str) -> None:
    """Destroy and undefine whatever a failed test left, so no qemu outlives the daemon."""
    import libvirt

    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return
    try:
        for dom in conn.listAllDomains(0):
            try:
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefineFlags(0)
            except libvirt.libvirtError:
                pass
    finally:
        conn.close()


def _helpers_of(root: Path) -> list[int]:
    """PIDs of processes started for this daemon (their environment names its directory)."""
    marker = f"XDG_RUNTIME_DIR={root / 'run'}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if marker in fh.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def stop_libvirtd(daemon: SessionLibvirtd, proc: subprocess.Popen) -> None:
    """Stop domains, then the daemon by PID, then any helper it left (by PID), then remove its dir."""
    if proc.poll() is None:
        _kill_leftover_domains(daemon.uri)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    for pid in _helpers_of(daemon.root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(daemon.root, ignore_errors=True)


@pytest.fixture(scope="session")
def libvirtd_session() -> Iterator[SessionLibvirtd]:
    """A session libvirtd for the whole test session; yields its URI and config."""
    if shutil.which("libvirtd") is None or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("libvirtd / qemu-system-x86_64 not installed")
    daemon, proc = start_libvirtd()
    try:
        yield daemon
    finally:
        stop_libvirtd(daemon, proc)


# --- boot files -----------------------------------------------------------------------------


def guest_kernel() -> Path:
    """The Debian cloud kernel, downloaded once into .cache/debs and unpacked beside it."""
    DEBS.mkdir(parents=True, exist_ok=True)
    debs = sorted(glob.glob(str(DEBS / "linux-image-*-cloud-amd64_*.deb")))
    if not debs:
        dep = subprocess.run(["apt-cache", "depends", "linux-image-cloud-amd64"], check=True,
                             capture_output=True, text=True).stdout
        pkg = next(line.split(":", 1)[1].strip() for line in dep.splitlines() if "Depends:" in line)
        subprocess.run(["apt-get", "download", pkg], cwd=DEBS, check=True, capture_output=True)
        debs = sorted(glob.glob(str(DEBS / "linux-image-*-cloud-amd64_*.deb")))
    deb = Path(debs[-1])
    out = DEBS / (deb.stem + ".unpacked")
    kernels = sorted(out.glob("boot/vmlinuz-*")) if out.exists() else []
    if not kernels:
        tmp = Path(tempfile.mkdtemp(dir=DEBS))
        try:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        kernels = sorted(out.glob("boot/vmlinuz-*"))
    return kernels[-1]


INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
echo "mobykit: ready {image_id}" > /dev/console
exec /bin/busybox sleep 100000
"""


def make_initrd(out: Path, image_id: str) -> Path:
    """A gzip'd newc initrd: static busybox and an /init that announces ``image_id`` on the console."""
    stage = Path(tempfile.mkdtemp(prefix="mobykit-initrd-"))
    try:
        (stage / "bin").mkdir()
        (stage / "dev").mkdir()
        shutil.copy2("/bin/busybox", stage / "bin" / "busybox")
        (stage / "init").write_text(INIT.format(image_id=image_id))
        os.chmod(stage / "init", 0o755)
        os.mknod(stage / "dev" / "console", 0o600 | 0o020000, os.makedev(5, 1))
        names = subprocess.run(["find", ".", "-mindepth", "1"], cwd=stage, check=True,
                               capture_output=True).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "--owner=0:0"], cwd=stage,
                              input=b"\n".join(sorted(names.split(b"\n"))).strip() + b"\n",
                              check=True, capture_output=True).stdout
        subprocess.run(["gzip", "-n", "-1"], input=cpio, stdout=open(out, "wb"), check=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


@dataclass
class BootFiles:
    kernel: Path
    initrd: Path
    image_id: str
    cmdline: str = "console=ttyS0 panic=-1 quiet"


@pytest.fixture(scope="session")
def boot_files() -> Iterator[BootFiles]:
    """Kernel + a busybox initrd announcing a fixed fake image id; the initrd's dir is removed after."""
    image_id = "sha256:" + "ab" * 32
    d = Path(tempfile.mkdtemp(prefix="mobykit-boot-"))
    try:
        yield BootFiles(kernel=guest_kernel(), initrd=make_initrd(d / "initrd.img", image_id), image_id=image_id)
    finally:
        shutil.rmtree(d, ignore_errors=True)
