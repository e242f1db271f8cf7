"""Debian packages by exact version and sha256, through the host's own apt.

Why apt's tools rather than fetching from a mirror ourselves: apt already knows the configured
mirrors, verifies the signed Release files, and its package index gives each .deb's sha256, so the
recipe's content hash can be computed from ``apt-cache`` alone (no download) and every downloaded
file is checked against it. Downloads land in a shared directory (``MOBYKIT_DEB_CACHE``) so a
rebuild or a CI re-run fetches nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from mobykit.errors import BuildError
from mobykit.image import sbom_spdx


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    arch: str
    sha256: str
    filename: str  # pool path in the archive
    depends: str = ""

    @property
    def deb_name(self) -> str:
        """apt-get download's file name (an epoch colon is written %3a)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"

    @property
    def purl(self) -> str:
        """The package URL scanners match Debian advisories on (``pkg:deb/debian/NAME@VERSION?arch=``)."""
        return sbom_spdx.purl("deb", "debian", self.name, self.version, {"arch": self.arch})

    def spdx(self) -> sbom_spdx.Package:
        """This exact package as an SBOM states it: name, version, purl and the .deb's sha256. The
        id is the name and the .deb's digest, so one package is one id in every document."""
        return sbom_spdx.Package(
            spdx_id=f"SPDXRef-Package-deb-{sbom_spdx.id_part(self.name)}-{self.sha256[:16]}", name=self.name,
            version=self.version, purl=self.purl, sha256=self.sha256,
            source_info=f"unpacked by mobykit pkg build from {self.filename or self.deb_name}")


def _stanzas(text: str) -> list[dict[str, str]]:
    out, cur, last = [], {}, None
    for line in text.splitlines():
        if not line.strip():
            if cur:
                out.append(cur)
            cur, last = {}, None
        elif line[0] in " \t" and last:
            cur[last] += "\n" + line.strip()
        elif ":" in line:
            k, _, v = line.partition(":")
            cur[k], last = v.strip(), k
    if cur:
        out.append(cur)
    return out


def _candidates(names: list[str]) -> dict[str, str]:
    r = subprocess.run(["apt-cache", "policy", *names], capture_output=True, text=True, check=False)
    out, current = {}, None
    for line in r.stdout.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1]
        elif current and line.strip().startswith("Candidate:"):
            out[current] = line.split(":", 1)[1].strip()
    return out


def resolve_many(specs: list[str]) -> list[Package]:
    """``name`` (the candidate version) or ``name=version`` -> exact package records, in order.
    One apt-cache policy and one apt-cache show for all of them (each call costs ~0.5 s)."""
    if not specs:
        return []
    pairs = [s.partition("=")[::2] for s in specs]
    cand = _candidates([n for n, v in pairs if not v])
    exact = []
    for name, version in pairs:
        version = version or cand.get(name, "")
        if not version or version == "(none)":
            raise BuildError(f"Debian package {name!r} is not known to apt (apt-get update? typo?)")
        exact.append((name, version))
    r = subprocess.run(["apt-cache", "show", *(f"{n}={v}" for n, v in exact)], capture_output=True, text=True,
                       check=False)
    records = {}
    for st in _stanzas(r.stdout):
        if st.get("SHA256"):
            records.setdefault((st.get("Package"), st.get("Version")), st)
    out = []
    for name, version in exact:
        st = records.get((name, version))
        if st is None:
            raise BuildError(f"Debian package {name}={version} has no downloadable record in apt's index")
        out.append(Package(name, version, st.get("Architecture", "amd64"), st["SHA256"], st.get("Filename", ""),
                           st.get("Depends", "")))
    return out


def resolve(spec: str) -> Package:
    return resolve_many([spec])[0]


def index_stamp() -> str:
    """Identifies the state of apt's indexes and policy: when none of these files changed, a
    package spec resolves to the same record, so the answer can be remembered."""
    h = hashlib.sha256()
    paths: list[Path] = []
    for d in (Path("/var/lib/apt/lists"), Path("/etc/apt/preferences.d"), Path("/etc/apt/sources.list.d")):
        if d.is_dir():
            paths += sorted(p for p in d.iterdir() if p.is_file() and p.name != "lock")
    paths += [Path("/etc/apt/preferences"), Path("/etc/apt/sources.list"), Path("/var/lib/dpkg/status")]
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        h.update(f"{p}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
    return h.hexdigest()


def resolve_cached(specs: list[str], memo: Path) -> list[Package]:
    """resolve_many, remembered in ``memo`` (JSON) until apt's indexes change, so a cache hit in
    ``mobykit pkg build`` costs milliseconds instead of two apt-cache runs."""
    stamp = index_stamp()
    try:
        data = json.loads(memo.read_text())
        known = data["records"] if data.get("stamp") == stamp else {}
    except (OSError, ValueError, KeyError, TypeError):
        known = {}
    missing = [s for s in specs if s not in known]
    if missing:
        for spec, pkg in zip(missing, resolve_many(missing), strict=True):
            known[spec] = asdict(pkg)
        memo.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=memo.parent, prefix=".resolved-")
        with os.fdopen(fd, "w") as f:
            json.dump({"stamp": stamp, "records": known}, f, sort_keys=True)
        os.replace(tmp, memo)
    return [Package(**known[s]) for s in specs]


def depends_matching(pkg: Package, prefix: str) -> list[str]:
    """Names in ``pkg``'s Depends that start with ``prefix`` (a metapackage's real package)."""
    names = []
    for alt in pkg.depends.split(","):
        first = alt.split("|")[0].strip().split(" ")[0]
        if first.startswith(prefix):
            names.append(first)
    return names


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(pkg: Package, dest: Path) -> Path:
    """The .deb for ``pkg`` in ``dest``, downloaded once and always sha256-checked."""
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / pkg.deb_name
    if final.exists() and sha256_file(final) == pkg.sha256:
        return final
    if not shutil.which("apt-get"):
        raise BuildError("apt-get is not available to download Debian packages")
    with tempfile.TemporaryDirectory(dir=dest, prefix=".dl-") as tmp:
        r = subprocess.run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{pkg.name}={pkg.version}"],
            cwd=tmp, capture_output=True, text=True, check=False,
        )
        got = Path(tmp) / pkg.deb_name
        if r.returncode != 0 or not got.exists():
            raise BuildError(f"apt-get download {pkg.name}={pkg.version} failed: {r.stderr.strip()[-400:]}")
        digest = sha256_file(got)
        if digest != pkg.sha256:
            raise BuildError(f"{pkg.deb_name}: sha256 {digest} does not match apt's index {pkg.sha256}")
        os.replace(got, final)
    return final
