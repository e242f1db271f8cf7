"""Assemble a mobykit guest by hand and boot it under qemu TCG, to test the guest init for real.

The pieces are the ones a built image holds: Debian's cloud kernel and a subset of its modules
(with modules.dep from depmod), busybox-static with its applet links, crun and/or runc with the
libraries they need, the init package's files (specs/pkgs/init/rootfs) and OCI bundles written by the test in
LinuxKit's layout (containers/<kind>/<name>/{config.json,runtime.json,runtime.sh,rootfs|lower}).
The initrd is a gzip'd newc cpio made with GNU cpio (the image builder's own writer is tested
elsewhere; here only the guest matters).

Debian packages are fetched with ``apt-get download`` into /work/main/.cache/debs once and
extracted under .cache/guestkit; the host must have busybox-static, kmod (depmod), cpio, qemu and
xorriso installed. qemu runs as a child process, stopped by PID; every temp dir is removed.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
DEBS = CACHE / "debs"
INIT_ROOTFS = REPO / "specs" / "pkgs" / "init" / "rootfs"
SYSCTL_ROOTFS = REPO / "specs" / "pkgs" / "sysctl" / "rootfs"
BUSYBOX = Path("/bin/busybox")

# What a VM under qemu needs: the init loads these (when modules.dep has them) by default.
GUEST_MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "virtio_scsi", "virtio_console", "virtio_rng",
                 "sr_mod", "ata_piix", "isofs", "vfat", "overlay", "veth", "button", "evdev")

ALL_CAPS_DEFAULT: tuple[str, ...] = ()


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def kernel_package() -> str:
    """linux-image-<ver>-cloud-amd64, resolved from the metapackage so it follows Debian updates."""
    out = _run(["apt-cache", "depends", "linux-image-cloud-amd64"]).stdout
    m = re.search(r"Depends: (linux-image-\S+-cloud-amd64)", out)
    if not m:
        raise RuntimeError(f"cannot resolve the cloud kernel package from: {out}")
    return m.group(1)


def _deb(name: str) -> Path:
    DEBS.mkdir(parents=True, exist_ok=True)
    found = sorted(DEBS.glob(f"{name}_*.deb"))
    if not found:
        _run(["apt-get", "download", name], cwd=DEBS)
        found = sorted(DEBS.glob(f"{name}_*.deb"))
    return found[-1]


@dataclass(frozen=True)
class Parts:
    """The extracted Debian pieces: kernel image, module tree root, kernel version, runc, crun."""

    kernel: Path
    modules_root: Path  # a directory holding lib/modules/<version>/
    version: str
    runc: Path
    crun: Path


def parts() -> Parts:
    """Download (once) and extract (once) the kernel, runc and libseccomp packages."""
    kpkg = kernel_package()
    version = kpkg.removeprefix("linux-image-")
    base = CACHE / "guestkit" / version
    done = base / ".done"
    CACHE.mkdir(parents=True, exist_ok=True)
    if not done.exists():
        tmp = Path(tempfile.mkdtemp(prefix=".x-", dir=CACHE))
        try:
            for name in (kpkg, "runc", "libseccomp2"):
                _run(["dpkg-deb", "-x", str(_deb(name)), str(tmp)])
            _run(["depmod", "-b", str(tmp), version])
            (tmp / ".done").touch()
            if base.exists():
                shutil.rmtree(base)
            base.parent.mkdir(parents=True, exist_ok=True)
            tmp.rename(base)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    runc = base / "usr" / "sbin" / "runc"
    if not runc.exists():
        runc = base / "usr" / "bin" / "runc"
    crun = base / "crun" / "usr" / "bin" / "crun"
    if not crun.exists():  # a cache from before crun: add it beside
        tmp = Path(tempfile.mkdtemp(prefix=".x-", dir=CACHE))
        try:
            _run(["dpkg-deb", "-x", str(_deb("crun")), str(tmp)])
            if (base / "crun").exists():
                shutil.rmtree(base / "crun")
            tmp.rename(base / "crun")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return Parts(kernel=base / "boot" / f"vmlinuz-{version}", modules_root=base, version=version, runc=runc,
                 crun=crun)


def _host_libs(binary: Path) -> list[Path]:
    """The host's copies of the shared libraries ``binary`` links (its Debian dependencies, the
    same packages the crun recipe pulls), from ldd."""
    out = _run(["ldd", str(binary)]).stdout
    return [Path(m) for m in re.findall(r"=> (/\S+)", out)]


def _module_closure(moddir: Path, names: Iterable[str]) -> set[str]:
    """Relative .ko paths for ``names`` and everything they depend on (from modules.dep)."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        stem = Path(mod).name.split(".ko")[0]
        by_name[stem.replace("-", "_")] = mod
    want: set[str] = set()
    todo = [by_name[n] for n in names if n in by_name]
    while todo:
        m = todo.pop()
        if m not in want:
            want.add(m)
            todo.extend(deps.get(m, []))
    return want


def oci_config(args: list[str], *, caps: Iterable[str] = (), namespaces: Iterable[str] = ("pid", "mount", "ipc", "uts", "network"),
               readonly: bool = True, hostname: str | None = None, env: list[str] | None = None,
               rw_proc_sys: bool = False) -> dict:
    """A small OCI runtime config for runc 1.1: the given capabilities only, no new privileges,
    the usual API filesystems, and the given namespaces (a kind left out is shared with the host)."""
    capl = sorted(set(caps))
    ns = list(namespaces)
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
    ]
    config = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": env or ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {"bounding": capl, "effective": capl, "permitted": capl},
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": readonly},
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": t} for t in ns],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": [] if rw_proc_sys else ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"],
        },
    }
    if hostname and "uts" in ns:
        config["hostname"] = hostname
    return config


class GuestImage:
    """A staging directory that becomes an initrd: the guest's root filesystem."""

    def __init__(self, workdir: Path, parts: Parts):
        self.parts = parts
        self.root = workdir / "root"
        self.root.mkdir()
        self._busybox_master: Path | None = None

    # -- the system ---------------------------------------------------------------------------
    def add_busybox(self, root: Path) -> None:
        """busybox at root/bin/busybox (one hard link shared by every root, so the cpio stores it
        once) and a symlink per applet, where busybox itself would install them."""
        if self._busybox_master is None:
            self._busybox_master = self.root.parent / "busybox"
            shutil.copy2(BUSYBOX, self._busybox_master)
        (root / "bin").mkdir(parents=True, exist_ok=True)
        os.link(self._busybox_master, root / "bin" / "busybox")
        for path in _run([str(BUSYBOX), "--list-full"]).stdout.split():
            link = root / path
            if link.name == "busybox" or link.exists() or link.is_symlink():
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")

    def add_system(self, *, image_id: str | None = None, modules: Iterable[str] = GUEST_MODULES,
                   runtimes: Iterable[str] = ("crun",)) -> None:
        """The init's root: busybox, the OCI ``runtimes`` ("crun", "runc": the init uses crun
        when it is there unless mobykit.runtime= says otherwise), modules, the init package."""
        root = self.root
        for d in ("dev", "proc", "sys", "run", "tmp", "var", "etc", "containers", "lib64"):
            (root / d).mkdir(exist_ok=True)
        self.add_busybox(root)
        # the runtimes and the libraries they link (the ELF interpreter is /lib64/ld-linux-x86-64.so.2).
        (root / "usr" / "bin").mkdir(parents=True, exist_ok=True)
        libdir = root / "lib" / "x86_64-linux-gnu"
        libdir.mkdir(parents=True, exist_ok=True)
        shutil.copy2("/lib/x86_64-linux-gnu/libc.so.6", libdir / "libc.so.6")
        runtimes = set(runtimes)
        if "runc" in runtimes:
            shutil.copy2(self.parts.runc, root / "usr" / "bin" / "runc")
            shutil.copy2(self.parts.modules_root / "usr/lib/x86_64-linux-gnu/libseccomp.so.2",
                         libdir / "libseccomp.so.2")
        if "crun" in runtimes:
            shutil.copy2(self.parts.crun, root / "usr" / "bin" / "crun")
            for lib in _host_libs(self.parts.crun):
                if not (libdir / lib.name).exists():
                    shutil.copy2(lib, libdir / lib.name)
        shutil.copy2("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", root / "lib64" / "ld-linux-x86-64.so.2")
        # kernel modules: the closure of ``modules``, with a fresh modules.dep
        ver = self.parts.version
        src = self.parts.modules_root / "lib" / "modules" / ver
        for rel in sorted(_module_closure(src, modules)):
            dst = root / "lib" / "modules" / ver / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst)
        for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            if (src / f).exists():
                shutil.copy2(src / f, root / "lib" / "modules" / ver / f)
        _run(["depmod", "-b", str(root), ver])
        # the init package, as the build would lay it out
        shutil.copytree(INIT_ROOTFS, root, dirs_exist_ok=True, symlinks=True)
        if image_id is not None:
            (root / "etc" / "mobykit").mkdir(parents=True, exist_ok=True)
            (root / "etc" / "mobykit" / "image-id").write_text(image_id + "\n")

    # -- bundles ------------------------------------------------------------------------------
    def add_bundle(self, kind: str, name: str, config: dict, *, files: dict[str, bytes | str] | None = None,
                   runtime: dict | None = None, extra_roots: Iterable[Path] = ()) -> Path:
        """containers/<kind>/<name>/ with config.json, runtime.json, runtime.sh (from
        mobykit.image.runtime_sh) and a busybox root (rootfs/ when config says read-only, else
        lower/ + empty tmp/ and rootfs/). ``files`` are extra files in the container root;
        ``extra_roots`` are directory trees copied over it (e.g. a package's rootfs)."""
        from mobykit.image.runtime_sh import runtime_script

        bundle = self.root / "containers" / kind / name
        bundle.mkdir(parents=True)
        readonly = bool(config.get("root", {}).get("readonly"))
        croot = bundle / ("rootfs" if readonly else "lower")
        croot.mkdir()
        self.add_busybox(croot)
        # runc cannot create mount points on a read-only root: they must be in the image.
        for d in ("proc", "dev", "sys", "tmp", "etc", "run", "var", "root"):
            (croot / d).mkdir(exist_ok=True)
        for extra in extra_roots:
            shutil.copytree(extra, croot, dirs_exist_ok=True, symlinks=True)
        for rel, data in (files or {}).items():
            p = croot / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data.encode() if isinstance(data, str) else data)
            p.chmod(0o755 if p.read_bytes()[:2] == b"#!" else 0o644)
        if not readonly:
            (bundle / "tmp").mkdir()
            (bundle / "rootfs").mkdir()
        runtime = runtime or {}
        (bundle / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (bundle / "runtime.json").write_text(json.dumps(runtime, indent=2, sort_keys=True))
        (bundle / "runtime.sh").write_text(runtime_script(runtime, f"/containers/{kind}/{name}"))
        return bundle

    def write_initrd(self, out: Path) -> Path:
        """The staging tree as a gzip'd newc cpio (GNU cpio; owners as in the staging tree; device
        nodes are not needed: the init mounts devtmpfs first)."""
        names = _run(["find", ".", "-mindepth", "1"], cwd=self.root).stdout
        raw = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], cwd=self.root,
                             input=names.encode(), capture_output=True, check=True).stdout
        with gzip.open(out, "wb", compresslevel=1) as f:
            f.write(raw)
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Guest:
    """A running qemu: its console (a file) and its monitor (a unix socket)."""

    proc: subprocess.Popen
    console: Path
    monitor: Path
    http_port: int | None
    _offset: int = field(default=0)

    def text(self) -> str:
        if not self.console.exists():
            return ""
        return self.console.read_bytes().decode("utf-8", "replace").replace("\r\n", "\n")

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """Wait until the console matches ``pattern`` (a regex); fail with the console on timeout
        or if qemu exits first."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.text())
            if m:
                return m
            if self.proc.poll() is not None:
                err = (self.console.parent / "qemu.err").read_text(errors="replace")
                raise AssertionError(f"qemu exited ({self.proc.returncode}) {err} before {pattern!r}:\n{self.text()[-6000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} on the console within {timeout}s:\n{self.text()[-6000:]}")
            time.sleep(0.2)

    def powerdown(self) -> None:
        """Press the ACPI power button (what libvirt's shutdown does)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.monitor))
            s.sendall(b"system_powerdown\n")
            time.sleep(0.2)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"qemu still running after {timeout}s:\n{self.text()[-6000:]}") from e


@contextlib.contextmanager
def boot(kernel: Path, initrd: Path, workdir: Path, *, append: str = "", cdrom: Path | None = None,
         http: bool = True, memory: int = 512, metadata: int | None = None,
         smbios: str | None = None) -> Iterator[Guest]:
    """Boot under qemu TCG with the console on a file and user-mode networking (a guest port 80
    forwarded from 127.0.0.1 when ``http``). With ``metadata`` (a port on 127.0.0.1), the user
    network is 169.254.0.0/16 and the guest's connections to 169.254.169.254:80 reach that port,
    one ``busybox nc`` per connection, as a cloud's metadata server would be reached.
    ``smbios``: a qemu ``-smbios`` value, to give the guest a cloud's DMI strings.
    qemu is killed by PID on the way out."""
    console = workdir / "console.log"
    monitor = workdir / "monitor.sock"
    port = free_port() if http else None
    nic = "user,model=virtio-net-pci" + (f",hostfwd=tcp:127.0.0.1:{port}-:80" if port else "")
    if metadata:
        nic += f",net=169.254.0.0/16,guestfwd=tcp:169.254.169.254:80-cmd:{BUSYBOX} nc 127.0.0.1 {metadata}"
    cmd = ["qemu-system-x86_64", "-M", "pc", "-accel", "tcg", "-m", str(memory), "-nographic", "-no-reboot",
           "-kernel", str(kernel), "-initrd", str(initrd),
           "-append", f"console=ttyS0 panic=-1 quiet {append}".strip(),
           "-nic", nic, "-serial", f"file:{console}", "-monitor", f"unix:{monitor},server=on,wait=off",
           "-display", "none"]
    cmd = [c for c in cmd if c != "-nographic"]
    if smbios:
        cmd += ["-smbios", smbios]
    if cdrom:
        cmd += ["-drive", f"file={cdrom},media=cdrom,if=ide,index=2,readonly=on,format=raw"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=(workdir / "qemu.err").open("wb"))
    try:
        deadline = time.monotonic() + 10
        while not monitor.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        yield Guest(proc, console, monitor, port)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="mobykit-guest-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class FakeMetadata:
    """A cloud metadata server on 127.0.0.1 for the guest's 169.254.169.254 (see ``boot(...,
    metadata=...)``): ``kind`` "aws" (IMDSv2 enforced: a token from PUT /latest/api/token is
    required) or "gcp" (the Metadata-Flavor: Google header is required). ``requests`` records
    (method, path, headers) of every request, so a test can check how the guest asked."""

    def __init__(self, kind: str, *, user_data: str, hostname: str, ssh_key: str):
        import http.server
        import threading

        self.kind, self.requests = kind, []
        token = "tok-" + os.urandom(8).hex()
        aws = {"/latest/meta-data/instance-id": "i-0123456789", "/latest/meta-data/hostname": hostname,
               "/latest/user-data": user_data, "/latest/meta-data/public-keys/0/openssh-key": ssh_key}
        gcp = {"/computeMetadata/v1/instance/hostname": hostname,
               "/computeMetadata/v1/instance/attributes/user-data": user_data,
               "/computeMetadata/v1/instance/attributes/ssh-keys": f"core:{ssh_key}"}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):  # noqa: N802 (http.server's naming)
                outer.requests.append(("PUT", self.path, dict(self.headers)))
                if outer.kind == "aws" and self.path == "/latest/api/token" \
                        and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._send(200, token)
                return self._send(404)

            def do_GET(self):  # noqa: N802
                outer.requests.append(("GET", self.path, dict(self.headers)))
                if outer.kind == "aws":
                    if self.headers.get("X-aws-ec2-metadata-token") != token:
                        return self._send(401)
                    table = aws
                else:
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self._send(403)
                    table = gcp
                if self.path in table:
                    return self._send(200, table[self.path])
                return self._send(404)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
