"""A local stand-in for ``debian:bookworm-slim`` and a private buildah, for building the Dockerfile.

Why this exists: no container registry is reachable from the test machines, but the Debian mirror
is. So the base image the Dockerfile names in ``FROM`` is made here: ``debootstrap --variant=minbase``
(the same package set the slim image starts from), trimmed as the slim image is, tarred, and
imported into a buildah storage under that exact name. ``buildah bud --pull=never`` then finds it
locally and never tries a registry.

Everything buildah writes goes to a private storage (``--root``/``--runroot``) in a temp dir that
is removed at the end, so the host's /var/lib/containers is never touched. Two things are kept
between runs under ``<repo>/.cache/buildah/`` because they are slow to make and do not change:
the debootstrap tarball (about two minutes to make) and buildah's ``RUN --mount=type=cache``
directories (apt's .debs and pip's wheels). Delete that directory to start cold.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "buildah"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
# Bump when _slim changes, so a cached tarball made the old way is not reused.
BASE_FORMAT = "slim2"
CACHE_LINKS = ("buildah-cache", f"buildah-cache-{os.getuid()}")
# Certificate authorities this machine adds to its trust store (e.g. an egress proxy that
# re-signs TLS). Copied into the base image where update-ca-certificates picks them up when the
# Dockerfile installs ca-certificates, so pip inside the build trusts what the host trusts.
LOCAL_CAS = Path("/usr/local/share/ca-certificates")
SYSTEM_CACHE_PARENT = Path("/var/lib/containers")

# What the official slim image's apt sources look like (deb822), so apt-get in the Dockerfile sees
# the same suites (point releases and security updates) as it would on the real image.
SOURCES = """Types: deb
URIs: {mirror}
Suites: {suite} {suite}-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: {security}
Suites: {suite}-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


class BuildahError(RuntimeError):
    """A buildah or debootstrap command failed; carries the command and the end of its output."""


def _run(cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 1800,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise BuildahError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return proc


def require_tools() -> None:
    """Skip (with the reason) where the base image cannot be made: debootstrap needs root to
    chroot and create device nodes, and buildah's chroot isolation needs root without subuids."""
    if os.geteuid() != 0:
        pytest.skip("debootstrap and buildah --isolation chroot need root")
    for tool in ("debootstrap", "buildah", "tar"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {tool})")


# The official image's build (debuerreotype) configures apt and dpkg for containers; the Dockerfile
# must work with these in place, docker-clean above all (it empties /var/cache/apt after every
# install, which is why the Dockerfile moves it aside under its cache mount). Same settings,
# written here in our own words.
CONTAINER_CONFIG: dict[str, tuple[str, int]] = {
    "usr/sbin/policy-rc.d": ("#!/bin/sh\n# no service starts during image builds\nexit 101\n", 0o755),
    "etc/dpkg/dpkg.cfg.d/docker-apt-speedup": ("force-unsafe-io\n", 0o644),
    "etc/apt/apt.conf.d/docker-clean": (
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb '
        '/var/cache/apt/*.bin || true"; };\n'
        'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb '
        '/var/cache/apt/*.bin || true"; };\n'
        'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n', 0o644),
    "etc/apt/apt.conf.d/docker-autoremove-suggests": ('Apt::AutoRemove::SuggestsImportant "false";\n', 0o644),
    "etc/apt/apt.conf.d/docker-gzip-indexes": ('Acquire::GzipIndexes "true";\n', 0o644),
    "etc/apt/apt.conf.d/docker-no-languages": ('Acquire::Languages "none";\n', 0o644),
}
# The "slim" variant: documentation, manuals and translations are dropped now and never installed
# later (dpkg path-exclude), except licences and the locale alias table.
SLIM_EXCLUDE = ("/usr/share/doc/*", "/usr/share/groff/*", "/usr/share/info/*", "/usr/share/linda/*",
                "/usr/share/lintian/overrides/*", "/usr/share/locale/*", "/usr/share/man/*")
SLIM_INCLUDE = ("/usr/share/doc/*/copyright", "/usr/share/locale/locale.alias")


def _slim(root: Path, suite: str) -> None:
    """Make a debootstrap tree look like the official slim image: container apt/dpkg settings, no
    docs or manuals, no package lists or downloaded .debs, no host identity, deb822 sources."""
    for rel, (text, mode) in CONTAINER_CONFIG.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
        (root / rel).chmod(mode)
    (root / "etc/dpkg/dpkg.cfg.d/docker").write_text(
        "".join(f"path-exclude={p}\n" for p in SLIM_EXCLUDE) + "".join(f"path-include={p}\n" for p in SLIM_INCLUDE))
    for pattern in SLIM_EXCLUDE:
        top = root / pattern.strip("/").removesuffix("/*")
        if not top.is_dir():
            continue
        for p in sorted(top.rglob("*"), key=lambda q: len(q.parts), reverse=True):
            abs_path = "/" + str(p.relative_to(root))
            if any(fnmatch.fnmatchcase(abs_path, inc) for inc in SLIM_INCLUDE):
                continue
            if p.is_dir() and not p.is_symlink():
                with contextlib.suppress(OSError):
                    p.rmdir()  # kept only if something included is inside
            else:
                p.unlink()
    for d in ("var/lib/apt/lists", "var/cache/apt/archives"):
        for p in (root / d).glob("*"):
            if p.is_file():
                p.unlink()
    for f in ("etc/hostname", "etc/resolv.conf", "etc/machine-id", "var/log/bootstrap.log"):
        (root / f).unlink(missing_ok=True)
    (root / "etc/machine-id").write_text("")  # systemd convention for "not yet assigned"
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    (root / "etc/apt/sources.list.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/apt/sources.list.d/debian.sources").write_text(
        SOURCES.format(mirror=MIRROR, security=SECURITY_MIRROR, suite=suite))


def debootstrap_tarball(suite: str = "bookworm", arch: str = "amd64") -> Path:
    """The minbase root filesystem of ``suite`` as a tar, made once and cached.

    Made in a temp dir beside the cache and renamed into place, so an interrupted run leaves no
    half-written tarball; a lock keeps two test runs from debootstrapping at once."""
    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / f"{suite}-minbase-{arch}-{BASE_FORMAT}.tar"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return out
        work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=CACHE))
        try:
            root = work / "root"
            _run(["debootstrap", "--variant=minbase", f"--arch={arch}", suite, str(root), MIRROR], timeout=1800)
            _slim(root, suite)
            tmp = work / "rootfs.tar"
            _run(["tar", "--numeric-owner", "--xattrs", "--sort=name", "-C", str(root), "-cf", str(tmp), "."])
            os.replace(tmp, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


@dataclass
class Buildah:
    """buildah bound to a private storage; every call runs with that storage's flags."""

    workdir: Path
    cache_dir: Path = field(default_factory=lambda: CACHE / "mount-cache")

    def __post_init__(self) -> None:
        self.root = self.workdir / "storage"
        self.runroot = self.workdir / "run"
        self.tmp = self.workdir / "tmp"
        for d in (self.root, self.runroot, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        # buildah keeps RUN --mount=type=cache directories in $TMPDIR/buildah-cache (1.28; later
        # versions add -<uid>): point those names at a directory that outlives this storage, so apt
        # and pip downloads are reused by the next run.
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for name in CACHE_LINKS:
            (self.tmp / name).symlink_to(self.cache_dir, target_is_directory=True)
        # containers/image records blob locations in /var/lib/containers/cache whatever --root says
        # (it is keyed on the uid, not the store); each call runs in a private mount namespace with
        # that directory shadowed by one of ours, so the host's copy is never written.
        self.shadow = self.workdir / "shadow"
        self.shadow.mkdir(exist_ok=True)
        self.env = dict(os.environ, TMPDIR=str(self.tmp), BUILDAH_ISOLATION="chroot")
        # The host's storage.conf may name another driver or options; ours is a plain overlay.
        self.env.pop("CONTAINERS_STORAGE_CONF", None)

    @property
    def flags(self) -> list[str]:
        return ["--root", str(self.root), "--runroot", str(self.runroot), "--storage-driver", "overlay"]

    def command(self, *args: str) -> list[str]:
        """The argv for ``buildah ARGS`` on this storage, host paths shadowed (see above)."""
        # /var/lib/containers is shadowed when present; on a host without it, /var/lib is (buildah
        # would otherwise create /var/lib/containers/cache there).
        target = SYSTEM_CACHE_PARENT if SYSTEM_CACHE_PARENT.is_dir() else SYSTEM_CACHE_PARENT.parent
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", str(self.shadow), str(target),
                "buildah", *self.flags, *args]

    def __call__(self, *args: str, timeout: float = 1800, cwd: Path | None = None) -> str:
        return _run(self.command(*args), env=self.env, timeout=timeout, cwd=cwd).stdout

    def import_rootfs(self, tarball: Path, name: str) -> str:
        """Commit a root filesystem tarball as image ``name`` (as ``docker import`` would); returns
        the image id. ``buildah add`` unpacks a local tar archive, keeping owners and modes."""
        ctr = self("from", "--pull=never", "scratch").strip()
        try:
            self("add", ctr, str(tarball), "/")
            if any(LOCAL_CAS.glob("*.crt")):
                self("copy", ctr, f"{LOCAL_CAS}/", f"{LOCAL_CAS}/")
            self("config", "--os", "linux", "--arch", "amd64", "--cmd", "bash",
                 "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", ctr)
            return self("commit", "--quiet", ctr, name).strip()
        finally:
            with contextlib.suppress(BuildahError):
                self("rm", ctr)

    def close(self) -> None:
        """Remove every container and image, unmount what the overlay driver left mounted, and
        delete the storage. The persistent mount cache is only unlinked, never deleted."""
        with contextlib.suppress(BuildahError, subprocess.TimeoutExpired):
            self("rm", "--all", timeout=300)
        with contextlib.suppress(BuildahError, subprocess.TimeoutExpired):
            self("rmi", "--all", "--force", timeout=300)
        for mnt in _mounts_under(self.workdir):
            subprocess.run(["umount", "--lazy", mnt], capture_output=True)
        for name in CACHE_LINKS:
            (self.tmp / name).unlink(missing_ok=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _mounts_under(path: Path) -> list[str]:
    """Mount points below ``path``, deepest first (so nested mounts come off before their parent)."""
    prefix = str(path.resolve()) + "/"
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            target = line.split()[1].replace("\\040", " ")
            if target.startswith(prefix):
                found.append(target)
    return sorted(found, key=len, reverse=True)


@contextlib.contextmanager
def private_buildah() -> Iterator[Buildah]:
    """A Buildah whose storage lives in a temp dir, removed (with everything in it) afterwards."""
    work = Path(tempfile.mkdtemp(prefix="mobykit-buildah-"))
    b = Buildah(work)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def buildah_with_base() -> Iterator[Buildah]:
    """A private buildah whose storage already holds ``docker.io/library/debian:bookworm-slim``,
    made from the cached debootstrap tarball."""
    require_tools()
    tarball = debootstrap_tarball("bookworm")
    with private_buildah() as b:
        b.import_rootfs(tarball, "docker.io/library/debian:bookworm-slim")
        yield b
