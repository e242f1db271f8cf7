"""mobykit run qemu: exit codes of --until-ready, --data through a cidata ISO, --publish on
127.0.0.1, --console-log, and qemu/temp files cleaned up. VMs boot a tiny busybox initrd
(tests/harness/tinyvm.py) under TCG. Which output format boots how (CD-ROM, snapshot disk, OVMF,
unpacked archives) is checked here without a VM; tests/test_boot_formats.py boots every one."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest

from harness.tinyvm import build_tinyvm, set_mode
from mobykit.errors import InvalidArgument, MissingTool, NotFound
from mobykit.image.cache import Cache
from mobykit.run import firmware, media, qemu, unpack

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


def test_without_data_the_guest_is_told_not_to_look_for_user_data(tmp_path: Path) -> None:
    """No --data: no cidata ISO and no metadata server on qemu's user network, so the kernel boot's
    command line says mobykit.metadata=none (the init skips the lookup and its wait for the IDE
    probe); with --data it does not, and an image's own mobykit.metadata= is never overridden."""
    boot = qemu.BootFiles(tmp_path / "k", tmp_path / "i", "quiet")

    def append(b: qemu.BootFiles, iso: Path | None) -> str:
        cmd = qemu.qemu_command(b, qemu.RunOptions(), accel="tcg", iso=iso, attached=False)
        return cmd[cmd.index("-append") + 1]

    assert append(boot, None).split() == ["quiet", "console=ttyS0", "panic=-1", "mobykit.metadata=none"]
    assert "mobykit.metadata" not in append(boot, tmp_path / "cidata.iso")
    own = qemu.BootFiles(tmp_path / "k", tmp_path / "i", "mobykit.metadata=gcp")
    assert append(own, None).split().count("mobykit.metadata=gcp") == 1
    assert "mobykit.metadata=none" not in append(own, None)


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


# --- formats (no VM) -------------------------------------------------------------------------

def _touch(prefix: Path, *suffixes: str) -> None:
    for suffix in suffixes:
        Path(f"{prefix}{suffix}").write_bytes(b"x")


def test_find_prefers_kernel_initrd_and_follows_name_json(tmp_path: Path) -> None:
    x = tmp_path / "x"
    _touch(x, "-kernel", "-initrd.img", ".iso", ".vhd")
    assert media.find(x).format == "kernel+initrd"  # no NAME.json: the files, quickest boot first
    (tmp_path / "x.json").write_text(json.dumps({"formats": ["tar", "dynamic-vhd"]}))
    assert media.find(x).format == "dynamic-vhd"  # NAME.json says which of vhd/dynamic-vhd NAME.vhd is
    assert media.find(x, "iso-bios").format == "iso-bios"  # a named format needs only its files
    (tmp_path / "x.json").write_text(json.dumps({"formats": ["tar"]}))
    with pytest.raises(NotFound, match="lists no bootable format: tar"):
        media.find(x)
    (tmp_path / "x.json").unlink()
    for f in tmp_path.iterdir():
        f.unlink()
    _touch(x, "-kernel", "-squashfs-initrd.img", "-squashfs.img")
    assert media.find(x).format == "kernel+squashfs"


def test_every_bootable_format_has_a_layout() -> None:
    from mobykit.image.outputs import FORMATS

    assert set(FORMATS) - set(media.NOT_BOOTABLE) == set(media.LAYOUTS)


@pytest.mark.parametrize("fmt, needle", [("docker", "not bootable"), ("tar", "not bootable"),
                                         ("nope", "unknown"), ("iso-efi", "x-efi.iso")])
def test_an_unbootable_unknown_or_missing_format_exits_2(tmp_path: Path, fmt: str, needle: str) -> None:
    _touch(tmp_path / "x", "-kernel", "-initrd.img", ".tar")
    r = _cli(str(tmp_path / "x"), "-f", fmt, "--until-ready")
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr


def test_isos_are_read_only_cdroms_and_disks_snapshots(tmp_path: Path) -> None:
    _touch(tmp_path / "x", ".iso", ".vmdk")
    iso = media.find(tmp_path / "x", "iso-bios").prepare(tmp_path)
    cmd = qemu.qemu_command(iso, qemu.RunOptions(), accel="tcg", iso=None, attached=False)
    assert "-kernel" not in cmd and "-append" not in cmd
    assert f"file={tmp_path}/x.iso,if=none,id=boot,format=raw,media=cdrom,readonly=on" in cmd
    assert "ide-cd,drive=boot,bootindex=0" in cmd
    disk = media.find(tmp_path / "x", "vmdk").prepare(tmp_path)
    args = qemu.boot_args(disk)
    assert args[args.index("-drive") + 1] == f"file={tmp_path}/x.vmdk,if=none,id=boot,format=vmdk,snapshot=on"
    odd = qemu.boot_args(media.BootMedia(format="raw-bios", disk=Path("/a,b/c.img")))
    assert odd[1].startswith("file=/a,,b/c.img,")  # qemu's escape for a comma in a file name


def test_kernel_squashfs_boots_the_kernel_with_its_root_disk(tmp_path: Path) -> None:
    x = tmp_path / "x"
    _touch(x, "-kernel", "-squashfs-initrd.img", "-squashfs.img")
    (tmp_path / "x-cmdline").write_text("console=ttyS0 quiet\n")
    args = qemu.boot_args(media.find(x).prepare(tmp_path))
    assert args[:6] == ["-kernel", f"{x}-kernel", "-initrd", f"{x}-squashfs-initrd.img", "-append",
                        "console=ttyS0 quiet panic=-1"]
    assert "virtio-blk-pci,drive=boot" in args  # no bootindex: qemu boots the kernel itself


def test_efi_gets_read_only_ovmf_code_and_a_private_copy_of_the_variables(tmp_path: Path) -> None:
    fake = tmp_path / "ovmf"
    fake.mkdir()
    (fake / "OVMF_CODE.fd").write_bytes(b"code")
    (fake / "OVMF_VARS.fd").write_bytes(b"vars")
    scratch = tmp_path / "run"
    scratch.mkdir()
    args = firmware.qemu_args("efi", scratch, ovmf_dir=fake)
    assert args == ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={fake}/OVMF_CODE.fd",
                    "-drive", f"if=pflash,format=raw,unit=1,file={scratch}/OVMF_VARS.fd"]
    assert (scratch / "OVMF_VARS.fd").read_bytes() == b"vars"
    assert firmware.qemu_args("bios", scratch) == []
    with pytest.raises(InvalidArgument, match="firmware 'uefi'"):
        firmware.qemu_args("uefi", scratch)
    with pytest.raises(MissingTool, match="apt-get install ovmf") as e:
        firmware.find_ovmf(tmp_path / "none")
    assert e.value.exit_code == 2


def _tar(path: Path, members: dict[str, bytes], mode: str = "w") -> None:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_tar_kernel_initrd_is_unpacked_with_the_microcode_first(tmp_path: Path) -> None:
    _tar(tmp_path / "x-initrd.tar", {"kernel": b"K", "initrd.img": b"INITRD", "cmdline": b"console=ttyS0\n",
                                     "ucode.cpio": b"UCODE"})
    boot = media.find(tmp_path / "x").prepare(tmp_path)
    assert boot.format == "tar-kernel-initrd"
    assert boot.kernel.read_bytes() == b"K" and boot.initrd.read_bytes() == b"UCODEINITRD"
    assert boot.cmdline == "console=ttyS0" and boot.kernel.parent == tmp_path
    _tar(tmp_path / "y-initrd.tar", {"kernel": b"K"})
    with pytest.raises(InvalidArgument, match="no initrd.img member"):
        media.find(tmp_path / "y").prepare(tmp_path)


def test_gcp_disk_is_unpacked_with_its_zeros_as_holes(tmp_path: Path) -> None:
    disk = b"MBR" + bytes(8 << 20) + b"END"  # stored as plain bytes: the holes are ours
    _tar(tmp_path / "x.img.tar.gz", {"./disk.raw": disk}, "w:gz")
    boot = media.find(tmp_path / "x").prepare(tmp_path)
    assert boot.disk == tmp_path / "disk.raw" and boot.disk_format == "raw" and boot.firmware == "bios"
    assert boot.disk.read_bytes() == disk
    assert boot.disk.stat().st_blocks * 512 <= 2 * unpack.CHUNK + 4096
    _tar(tmp_path / "y.img.tar.gz", {"other.raw": b"x"}, "w:gz")
    with pytest.raises(InvalidArgument, match="no disk.raw member"):
        media.find(tmp_path / "y").prepare(tmp_path)


def test_efi_formats_boot_with_ovmf() -> None:
    assert [f for f, lay in media.LAYOUTS.items() if lay.firmware == "efi"] == ["iso-efi", "iso-efi-initrd",
                                                                                 "raw-efi", "qcow2-efi"]


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
