"""mobykit run qemu: exit codes of --until-ready, --data through a cidata ISO, --publish on
127.0.0.1, --console-log, and qemu/temp files cleaned up. VMs boot a tiny busybox initrd
(tests/harness/tinyvm.py) under TCG."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from harness.tinyvm import build_tinyvm, set_mode
from mobykit.errors import InvalidArgument, NotFound
from mobykit.image.cache import Cache
from mobykit.run import qemu

ROOT = Path(__file__).resolve().parent.parent
DEBS = ROOT / ".cache" / "debs"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    old = os.environ.get("MOBYKIT_DEB_CACHE")
    os.environ["MOBYKIT_DEB_CACHE"] = str(DEBS)
    try:
        base = tmp_path_factory.mktemp("tinyvm")
        return build_tinyvm(base, Cache(base / "cache"))
    finally:
        if old is None:
            del os.environ["MOBYKIT_DEB_CACHE"]
        else:
            os.environ["MOBYKIT_DEB_CACHE"] = old


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, MOBYKIT_ACCEL="tcg")
    return subprocess.run([sys.executable, "-m", "mobykit.cli.main", "run", "qemu", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, timeout=timeout)


def _run_dirs() -> set[str]:
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("mobykit-run-*")}


# --- no VM ---------------------------------------------------------------------------------

def test_cmdline_gets_console_and_panic_unless_set() -> None:
    assert qemu.guest_cmdline("quiet") == "quiet console=ttyS0 panic=-1"
    assert qemu.guest_cmdline("console=hvc0 panic=5") == "console=hvc0 panic=5"


def test_publish_is_loopback_only_and_checked(tmp_path: Path) -> None:
    boot = qemu.BootFiles(tmp_path / "k", tmp_path / "i", "")
    opts = qemu.RunOptions(publish=["8080:80", "127.0.0.1:2222:22/tcp"])
    cmd = qemu.qemu_command(boot, opts, accel="tcg", iso=None, attached=False)
    nic = cmd[cmd.index("-nic") + 1]
    assert nic == "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=tcp:127.0.0.1:2222-:22"
    for bad in ("80", "0.0.0.0:80:80", "70000:80", "a:b"):
        with pytest.raises(InvalidArgument, match="--publish"):
            qemu.parse_publish(bad)
    with pytest.raises(InvalidArgument, match="--mem"):
        qemu.qemu_command(boot, qemu.RunOptions(mem="lots"), accel="tcg", iso=None, attached=False)


def test_missing_build_is_named(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=f"{tmp_path}/nothing-kernel"):
        qemu.find_boot_files(tmp_path / "nothing")
    r = _cli(str(tmp_path / "nothing"), "--until-ready")
    assert r.returncode == 1 and "nothing-kernel" in r.stderr


# --- VMs -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_until_ready_exits_zero_and_logs_console(tiny: Path, tmp_path: Path) -> None:
    set_mode(tiny, "ready")
    before = _run_dirs()
    log = tmp_path / "console.log"
    r = _cli(str(tiny), "--until-ready", "--timeout", "120", "--console-log", str(log))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"mobykit: {tiny}: ready sha256:feedface"
    text = log.read_text(errors="replace")
    assert "tinyvm: mode ready" in text and "mobykit: ready sha256:feedface" in text
    assert _run_dirs() <= before


@pytest.mark.slow
def test_not_ready_is_nonzero_with_console_tail(tiny: Path) -> None:
    set_mode(tiny, "notready")
    r = _cli(str(tiny), "--until-ready", "--timeout", "120")
    assert r.returncode == qemu.EXIT_NOT_READY
    assert "the guest reported not ready" in r.stderr
    assert "mobykit: onboot 000-check failed: exit 3" in r.stderr  # the tail shows why


@pytest.mark.slow
def test_timeout_kills_qemu_and_says_so(tiny: Path) -> None:
    set_mode(tiny, "silent")
    r = _cli(str(tiny), "--until-ready", "--timeout", "15")
    assert r.returncode == qemu.EXIT_TIMEOUT
    assert "no readiness line within 15.0 s" in r.stderr


@pytest.mark.slow
def test_data_reaches_the_guest_on_cidata(tiny: Path, tmp_path: Path) -> None:
    set_mode(tiny, "data")
    log = tmp_path / "console.log"
    r = _cli(str(tiny), "--until-ready", "--timeout", "120", "--data", "hello from --data", "--console-log", str(log))
    assert r.returncode == 0, r.stderr
    assert "userdata: hello from --data" in log.read_text(errors="replace")
    f = tmp_path / "ud.txt"
    f.write_text("from a file")
    r = _cli(str(tiny), "--until-ready", "--timeout", "120", "--data-file", str(f), "--console-log", str(log))
    assert r.returncode == 0, r.stderr
    assert "userdata: from a file" in log.read_text(errors="replace")


@pytest.mark.slow
def test_attached_run_ends_when_guest_powers_off(tiny: Path) -> None:
    set_mode(tiny, "poweroff")
    r = _cli(str(tiny), "--timeout", "120")
    assert r.returncode == 0, r.stderr
    assert "tinyvm: goodbye" in r.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_publish_forwards_loopback_port_and_stop_cleans_up(tiny: Path) -> None:
    set_mode(tiny, "http")
    port = _free_port()
    vm = qemu.QemuVM(qemu.find_boot_files(tiny), qemu.RunOptions(accel="tcg", publish=[f"{port}:80"]))
    vm.start()
    try:
        out = vm.wait(120, until_ready=True)
        assert out.reason == "ready", out.tail
        body = ""
        for _ in range(50):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
                break
            except OSError:
                time.sleep(0.2)
        assert body == "tinyvm page\n"
        tmp, pid = vm.tmp, vm.proc.pid
    finally:
        vm.stop()
    assert vm.proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert tmp is not None and not tmp.exists()


def _qemu_child(parent: int) -> tuple[int, str] | None:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent:
                cmd = (stat.parent / "cmdline").read_bytes().decode().split("\0")
                if cmd and cmd[0].endswith("qemu-system-x86_64"):
                    return int(stat.parent.name), " ".join(cmd)
        except (OSError, IndexError, ValueError):
            continue
    return None


@pytest.mark.slow
def test_sigterm_kills_qemu_and_removes_the_iso(tiny: Path) -> None:
    set_mode(tiny, "silent")
    env = dict(os.environ, MOBYKIT_ACCEL="tcg")
    cli = subprocess.Popen([sys.executable, "-m", "mobykit.cli.main", "run", "qemu", str(tiny), "--until-ready",
                            "--data", "x"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        child = None
        for _ in range(300):
            child = _qemu_child(cli.pid)
            if child:
                break
            time.sleep(0.1)
        assert child is not None, "qemu never started"
        pid, cmdline = child
        m = re.search(r"file=([^,]+/cidata\.iso),", cmdline)
        assert m, cmdline
        iso = Path(m.group(1))
        assert iso.exists()
        cli.terminate()
        assert cli.wait(60) == 143
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    for _ in range(50):  # qemu is killed and reaped by the CLI before it exits
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()
    assert not iso.exists() and not iso.parent.exists()


@pytest.mark.slow
def test_a_second_sigterm_does_not_cut_cleanup_short(tiny: Path, tmp_path: Path) -> None:
    """GNU timeout sends SIGTERM to the command and again to its process group: the second signal,
    landing while the first one's cleanup runs, must not stop qemu being killed and the cidata ISO
    and temp dir being removed."""
    set_mode(tiny, "silent")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, MOBYKIT_ACCEL="tcg", TMPDIR=str(scratch))
    cli = subprocess.Popen([sys.executable, "-m", "mobykit.cli.main", "run", "qemu", str(tiny), "--data", "x"],
                           cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            if _qemu_child(cli.pid):
                break
            time.sleep(0.1)
        assert _qemu_child(cli.pid), "qemu never started"
        time.sleep(2)
        for gap in (0.0, 0.02, 0.05, 0.1):
            time.sleep(gap)
            if cli.poll() is None:
                cli.send_signal(signal.SIGTERM)
        assert cli.wait(60) == 143
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    time.sleep(0.5)
    assert list(scratch.iterdir()) == []
    assert subprocess.run(["pgrep", "-f", str(scratch)], capture_output=True, text=True).stdout.split() == []
