"""Boot a build in qemu on this machine: the fastest way to see an image run.

Any bootable output format boots (``mobykit.run.media``: kernel+initrd directly, ISOs as a
CD-ROM, disks on virtio-blk with ``snapshot=on`` so the build output is never written, each with
its format's firmware: ``mobykit.run.firmware``). Why these qemu settings: ``-M pc`` (microvm
hangs now and then under TCG), ``-no-reboot`` with ``panic=-1`` so a guest panic ends qemu
instead of looping (a kernel boot's command line gets both unless it has its own), the serial
console on our stdio so the init's readiness line (``mobykit: ready sha256:...``) can be
watched, user-mode networking with host forwards bound to 127.0.0.1 only (nothing is exposed
beyond this host), and the NoCloud ISO on a virtio-scsi CD-ROM (its drivers are in the kernel
image's module list).

qemu is always stopped by its PID and every temp file (the cidata ISO, OVMF's variable store,
unpacked archives) is removed, whatever happens.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from mobykit.errors import BuildError, InvalidArgument, NotFound
from mobykit.run import firmware, media
from mobykit.run.media import BootMedia, Output

QEMU = "qemu-system-x86_64"
READY = re.compile(r"mobykit: ready (sha256:\S+)")
NOT_READY = re.compile(r"mobykit: not ready\b.*")
EXIT_NOT_READY = 1
EXIT_TIMEOUT = 124
_MEM = re.compile(r"^\d+[MG]?$")

BootFiles = BootMedia  # the kernel+initrd media, by the name older callers use


@dataclass
class RunOptions:
    cpus: int = 1
    mem: str = "512M"
    accel: str = "auto"  # auto | kvm | tcg
    data: bytes | None = None  # user data served as a cidata ISO
    console_log: Path | None = None
    publish: list[str] = field(default_factory=list)  # "HOST:GUEST" tcp, on 127.0.0.1
    timeout: float | None = None
    until_ready: bool = False
    qemu: str = QEMU


@dataclass
class Outcome:
    exit_code: int
    ready: bool
    image_id: str | None  # from the readiness line
    reason: str  # "ready", "not ready", "timeout", "exited"
    tail: str  # last console lines


def find_boot_files(name: str | Path) -> BootFiles:
    """NAME-kernel, NAME-initrd.img, NAME-cmdline (NAME may be a path prefix like out/minimal)."""
    prefix = str(name)
    kernel, initrd, cmdfile = (Path(prefix + s) for s in ("-kernel", "-initrd.img", "-cmdline"))
    missing = [str(p) for p in (kernel, initrd) if not p.is_file()]
    if missing:
        raise NotFound(f"{prefix}: no kernel+initrd build here (missing {', '.join(missing)}); "
                       "build one with: mobykit build -f kernel+initrd")
    cmdline = cmdfile.read_text().strip() if cmdfile.is_file() else ""
    return BootMedia(kernel, initrd, cmdline)


def guest_cmdline(cmdline: str, *, user_data: bool = True) -> str:
    """Our console and panic settings, unless the image set its own. Without user data
    (``user_data=False``: no ``--data``, so no cidata ISO) also ``mobykit.metadata=none`` unless the
    image names its own providers: this machine has nowhere else to serve user data from (no
    metadata server on qemu's user network, and the init asks the clouds' only on their hardware),
    so the init need not wait for the IDE/CD-ROM probe to find that out (~0.5 s under TCG)."""
    words = cmdline.split()
    if not any(w.startswith("console=") for w in words):
        words.append("console=ttyS0")
    if not any(w.startswith("panic=") for w in words):
        words.append("panic=-1")
    if not user_data and not any(w.startswith("mobykit.metadata=") for w in words):
        words.append("mobykit.metadata=none")
    return " ".join(words)


def parse_publish(spec: str) -> tuple[int, int]:
    m = re.fullmatch(r"(?:127\.0\.0\.1:)?(\d{1,5}):(\d{1,5})(?:/tcp)?", spec.strip())
    if not m or not all(1 <= int(x) <= 65535 for x in m.groups()):
        raise InvalidArgument(f"--publish {spec!r}: expected HOST_PORT:GUEST_PORT (tcp, bound to 127.0.0.1)")
    return int(m.group(1)), int(m.group(2))


def _resolve_accel(opts: RunOptions, kernel: Path | None) -> str:
    if opts.accel not in ("auto", "kvm", "tcg"):
        raise InvalidArgument(f"--accel {opts.accel!r}: must be auto, kvm or tcg")
    if opts.accel != "auto":
        return opts.accel
    from mobykit.run import accel

    return accel.detect(kernel=kernel)


def _drive_path(path: Path) -> str:
    """A file name inside a ``-drive`` option (qemu reads ``,,`` as a literal comma)."""
    return str(path).replace(",", ",,")


def boot_args(boot: BootMedia, *, user_data: bool = True) -> list[str]:
    """What qemu boots: a kernel (maybe with a root disk), else an ISO or a disk through the firmware.
    ``user_data``: whether a cidata ISO goes with it (see ``guest_cmdline``)."""
    args: list[str] = []
    if boot.kernel is not None:
        if boot.initrd is None:
            raise InvalidArgument(f"{boot.format}: a kernel boot needs an initrd")
        args += ["-kernel", str(boot.kernel), "-initrd", str(boot.initrd),
                 "-append", guest_cmdline(boot.cmdline, user_data=user_data)]
    first = "" if boot.kernel is not None else ",bootindex=0"
    if boot.cdrom is not None:
        args += ["-drive", f"file={_drive_path(boot.cdrom)},if=none,id=boot,format=raw,media=cdrom,readonly=on",
                 "-device", f"ide-cd,drive=boot{first}"]
    if boot.disk is not None:
        args += ["-drive", f"file={_drive_path(boot.disk)},if=none,id=boot,format={boot.disk_format},snapshot=on",
                 "-device", f"virtio-blk-pci,drive=boot{first}"]
    if boot.kernel is None and boot.cdrom is None and boot.disk is None:
        raise InvalidArgument(f"{boot.format}: nothing to boot (no kernel, CD-ROM or disk)")
    return args


def qemu_command(boot: BootMedia, opts: RunOptions, *, accel: str, iso: Path | None, attached: bool,
                 firmware_args: list[str] | None = None) -> list[str]:
    """The qemu command line; ``firmware_args`` from ``firmware.qemu_args`` (none: SeaBIOS)."""
    if opts.cpus < 1:
        raise InvalidArgument("--cpus must be at least 1")
    if not _MEM.match(str(opts.mem)):
        raise InvalidArgument(f"--mem {opts.mem!r}: expected a size such as 512M or 2G")
    nic = "user,model=virtio-net-pci"
    for spec in opts.publish:
        host, guest = parse_publish(spec)
        nic += f",hostfwd=tcp:127.0.0.1:{host}-:{guest}"
    chardev = "stdio,id=con,mux=on,signal=off" if attached else "stdio,id=con"
    if attached and opts.console_log:
        chardev += f",logfile={opts.console_log},logappend=off"
    cmd = [
        opts.qemu, "-M", "pc", "-accel", accel, "-smp", str(opts.cpus), "-m", str(opts.mem),
        "-nographic", "-no-reboot", "-nodefaults",
        "-chardev", chardev, "-serial", "chardev:con",
        *(firmware_args or []), *boot_args(boot, user_data=iso is not None),
        "-nic", nic,
    ]  # fmt: skip
    cmd += ["-mon", "chardev=con,mode=readline"] if attached else ["-monitor", "none"]
    if accel == "kvm":
        cmd += ["-cpu", "host"]
    if iso is not None:
        cmd += [
            "-device", "virtio-scsi-pci,id=scsi0",
            "-drive", f"file={_drive_path(iso)},if=none,id=cidata,format=raw,media=cdrom,readonly=on",
            "-device", "scsi-cd,drive=cidata,bus=scsi0.0",
        ]  # fmt: skip
    return cmd


def _prepare(source: BootMedia | Output, opts: RunOptions, tmp: Path, *, attached: bool) -> list[str]:
    """The whole qemu command for ``source``, with every file it needs made in ``tmp``."""
    boot = source.prepare(tmp) if isinstance(source, Output) else source
    accel = _resolve_accel(opts, boot.kernel)
    fw = firmware.qemu_args(boot.firmware, tmp)
    iso = None
    if opts.data is not None:
        from mobykit.run.cidata import make_iso

        iso = make_iso(tmp / "cidata.iso", opts.data, "instance-id: mobykit-run\n")
    return qemu_command(boot, opts, accel=accel, iso=iso, attached=attached, firmware_args=fw)


class QemuVM:
    """One qemu process whose console we watch (used by ``--until-ready`` and by tests).
    ``source``: media to boot as they are, or a build output prepared in the VM's temp dir."""

    def __init__(self, source: BootMedia | Output, opts: RunOptions, echo=None):
        self.source, self.opts, self.echo = source, opts, echo
        self.proc: subprocess.Popen | None = None
        self.tmp: Path | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=40)
        self.event = threading.Event()
        self.ready_id: str | None = None
        self.not_ready: str | None = None
        self._reader: threading.Thread | None = None
        self._log = None

    def start(self) -> None:
        if not shutil.which(self.opts.qemu):
            raise BuildError(f"{self.opts.qemu} is not installed (apt-get install qemu-system-x86)")
        self.tmp = Path(tempfile.mkdtemp(prefix="mobykit-run-"))
        try:
            cmd = _prepare(self.source, self.opts, self.tmp, attached=False)
            if self.opts.console_log:
                self._log = open(self.opts.console_log, "wb")  # noqa: SIM115 - closed in stop()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        except BaseException:
            self.stop()
            raise
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            for out in (self._log, self.echo):
                if out is not None:
                    out.write(raw)
                    out.flush()
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.lines.append(line)
            if self.ready_id is None and (m := READY.search(line)):
                self.ready_id = m.group(1)
                self.event.set()
            elif self.not_ready is None and (m := NOT_READY.search(line)):
                self.not_ready = m.group(0)
                self.event.set()
        self.event.set()  # qemu exited

    def wait(self, timeout: float | None, *, until_ready: bool) -> Outcome:
        """Until the readiness verdict (``until_ready``) or qemu's exit, at most ``timeout`` s."""
        assert self.proc is not None
        if until_ready:
            self.event.wait(timeout)
            if self.ready_id is not None:
                return self._outcome(0, "ready")
            if self.not_ready is not None:
                return self._outcome(EXIT_NOT_READY, "not ready")
            if self.proc.poll() is None:
                return self._outcome(EXIT_TIMEOUT, "timeout")
            self._drain()
            return self._outcome(self.proc.returncode or EXIT_NOT_READY, "exited")
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return self._outcome(EXIT_TIMEOUT, "timeout")
        self._drain()
        return self._outcome(code, "exited")

    def _drain(self) -> None:
        if self._reader is not None:
            self._reader.join(5)

    def _outcome(self, code: int, reason: str) -> Outcome:
        return Outcome(code, self.ready_id is not None, self.ready_id, reason, "\n".join(self.lines))

    def stop(self) -> None:
        """Kill qemu by PID (it holds no state worth a clean shutdown) and remove temp files."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._drain()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> QemuVM:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def run_attached(source: BootMedia | Output, opts: RunOptions) -> int:
    """qemu on this terminal until the guest powers off (or ``opts.timeout``); its exit code."""
    if not shutil.which(opts.qemu):
        raise BuildError(f"{opts.qemu} is not installed (apt-get install qemu-system-x86)")
    tmp = Path(tempfile.mkdtemp(prefix="mobykit-run-"))
    proc = None
    try:
        proc = subprocess.Popen(_prepare(source, opts, tmp, attached=True))
        try:
            return proc.wait(opts.timeout)
        except subprocess.TimeoutExpired:
            return EXIT_TIMEOUT
        except KeyboardInterrupt:
            return 130
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def run(name: str | Path, opts: RunOptions, echo=None, fmt: str | None = None) -> Outcome:
    """``mobykit run qemu NAME``: with ``until_ready``, boot and return at the readiness verdict
    (qemu killed then); else watch until the guest powers off. ``fmt``: the output format to boot
    (default: the first bootable one NAME has, ``media.find``). ``echo``: a binary stream that
    gets the console as it comes."""
    with QemuVM(media.find(name, fmt), opts, echo=echo) as vm:
        return vm.wait(opts.timeout, until_ready=opts.until_ready)
