"""A private libvirt session daemon: started as our child, stopped by PID, its files in one temp dir.

Used by ``make demo`` (``mobykit.demo``) and by the tests (``tests/harness/libvirtd.py``) so both
run VMs on a real libvirtd without touching the machine's own libvirt.

Why a session daemon, and why as ``nobody`` when we are root: the system daemon needs systemd,
iptables and a ``kvm`` group, and the session daemon refuses to run as root. Run as 65534 with
HOME and XDG_RUNTIME_DIR inside a temp dir, every file it makes (sockets, logs, pool volumes,
qemu state) stays inside that dir, and root still reaches it through the socket. A non-root user
runs it as themselves. The daemon is our child because PID 1 here reaps no orphans; qemu's output
goes to a plain file (``stdio_handler = "file"``) rather than through a virtlogd that would outlive
the daemon. On stop: domains are destroyed, the daemon gets SIGTERM (SIGKILL after a grace), any
helper still carrying the daemon's environment is killed by PID, and the dir is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mobykit.errors import Unavailable

DAEMON_UID = 65534  # nobody: only when we are root (the session daemon refuses to run as root)
POOL = "mobykit"


@dataclass
class SessionLibvirtd:
    """A running daemon. ``config`` is what ``LibvirtProvider`` takes (URI plus a pool inside ``root``)."""

    uri: str
    root: Path
    pid: int
    pool_path: Path

    @property
    def config(self) -> dict[str, str]:
        return {"URI": self.uri, "Pool": POOL, "PoolPath": str(self.pool_path)}


def _chown_tree(path: Path, uid: int) -> None:
    for dirpath, _dirnames, filenames in os.walk(path):
        os.chown(dirpath, uid, uid)
        for name in filenames:
            os.chown(os.path.join(dirpath, name), uid, uid)


def missing_tools() -> list[str]:
    """The programs a session daemon needs that are not on PATH (empty when it can start)."""
    tools = ["libvirtd", "qemu-system-x86_64"] + (["setpriv"] if os.geteuid() == 0 else [])
    return [t for t in tools if shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]


def start_libvirtd(timeout: float = 30.0, parent: str | Path | None = None) -> tuple[SessionLibvirtd, subprocess.Popen]:
    """Start ``libvirtd --timeout 0`` as an unprivileged child and wait until its socket answers.

    ``parent`` is where the temp dir goes (default: the system temp dir). Unavailable, with the
    daemon's log tail, when it does not come up; nothing is left running or on disk then."""
    import libvirt

    missing = missing_tools()
    if missing:
        raise Unavailable(f"a session libvirtd needs {', '.join(missing)} (apt-get install libvirt-daemon "
                          "libvirt-daemon-driver-qemu qemu-system-x86)")
    root = Path(tempfile.mkdtemp(prefix="mobykit-lv-", dir=parent))
    os.chmod(root, 0o755)  # the daemon user must traverse it
    home, run = root / "home", root / "run"
    for d in (home, run, home / ".config" / "libvirt", home / ".cache", home / ".local" / "share"):
        d.mkdir(parents=True, exist_ok=True)
    pool_path = home / "pool"
    (home / ".config" / "libvirt" / "qemu.conf").write_text('stdio_handler = "file"\n')
    as_root = os.geteuid() == 0
    if as_root:
        _chown_tree(root, DAEMON_UID)
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
    argv = ["libvirtd", "--timeout", "0"]
    if as_root:
        argv = ["setpriv", f"--reuid={DAEMON_UID}", f"--regid={DAEMON_UID}", "--clear-groups", *argv]
    with open(root / "libvirtd.log", "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=root, start_new_session=True)  # Ctrl-C goes to us, not straight to it
    sock = run / "libvirt" / "libvirt-sock"
    daemon = SessionLibvirtd(uri=f"qemu:///session?socket={sock}", root=root, pid=proc.pid, pool_path=pool_path)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if sock.exists():
                try:
                    libvirt.open(daemon.uri).close()
                    return daemon, proc
                except libvirt.libvirtError as e:
                    last = e
            time.sleep(0.1)
    except BaseException:
        stop_libvirtd(daemon, proc)
        raise
    output = (root / "libvirtd.log").read_text(errors="replace")[-2000:]
    stop_libvirtd(daemon, proc)
    raise Unavailable(f"session libvirtd did not come up ({last or f'exit status {proc.returncode}'}); log tail:\n{output}")


def kill_domains(uri: str) -> list[str]:
    """Destroy and undefine every domain on ``uri`` so no qemu outlives the daemon; returns their names."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return []
    names = []
    try:
        for dom in conn.listAllDomains(0):
            try:
                names.append(dom.name())
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefineFlags(0)
            except libvirt.libvirtError:
                pass
    finally:
        conn.close()
    return names


def helpers_of(root: Path) -> list[int]:
    """PIDs of processes started for this daemon (their environment names its runtime dir)."""
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
        kill_domains(daemon.uri)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    for pid in helpers_of(daemon.root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(daemon.root, ignore_errors=True)


@contextlib.contextmanager
def session_libvirtd(parent: str | Path | None = None) -> Iterator[SessionLibvirtd]:
    """A session daemon for the ``with`` block; stopped and removed however the block ends."""
    daemon, proc = start_libvirtd(parent=parent)
    try:
        yield daemon
    finally:
        stop_libvirtd(daemon, proc)
