"""Pulling images over the OCI distribution API into the cache.

Written over ``requests`` rather than shelling out to skopeo so a build has no runtime dependency
beyond Python, and so every byte is digest-checked on its way into the cache by our own code. The
wire protocol (GET /v2/<name>/manifests|blobs/<ref>, bearer-token challenge, Docker-Content-Digest)
is the one distribution/distribution and the OCI distribution spec describe.

Security rules a user relies on: plain http is used only for loopback hosts or hosts the user
named as insecure -- and that applies to every URL we are sent to (token realms, blob redirects),
checked before connecting; credentials are never sent to a host other than the one they are for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

from mobykit.errors import CacheMiss, ImageError, RegistryError
from mobykit.image import reference as refmod
from mobykit.image.cache import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Cache,
    ImageInfo,
    check_digest,
    media_type_of,
    select_platform,
)
from mobykit.image.progress import Progress, silent
from mobykit.image.reference import Reference
from mobykit.image.sbom_oci import attestations_in, spdx_layers

if TYPE_CHECKING:
    import requests

ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
MAX_MANIFEST = 4 << 20  # distribution refuses manifests over 4 MiB; so do we
_HUB_KEYS = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}


def _host_key(text: str) -> str:
    """Normalise a docker config ``auths`` key or a host to compare them: scheme, path and the
    Docker Hub's several names dropped."""
    t = text.strip()
    if "://" in t:
        t = urlsplit(t).netloc or t
    t = t.split("/", 1)[0].lower()
    return "docker.io" if t in _HUB_KEYS else t


def docker_config_path(auth_file: Path | None = None) -> Path:
    if auth_file is not None:
        return Path(auth_file)
    d = os.environ.get("DOCKER_CONFIG")
    return (Path(d) if d else Path.home() / ".docker") / "config.json"


def load_credentials(auth_file: Path | None = None) -> dict[str, tuple[str, str]]:
    """host -> (user, password) from a docker ``config.json`` (``auths.<host>.auth`` is base64 of
    ``user:pass``; ``username``/``password`` fields are accepted too). Credential helpers are not
    run: a build must not start arbitrary programs."""
    path = docker_config_path(auth_file)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if auth_file is not None:
            raise RegistryError(f"{path}: registry auth file not found") from None
        return {}
    except OSError as e:
        raise RegistryError(f"{path}: cannot read: {e.strerror}") from None
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise RegistryError(f"{path}: not valid JSON: {e}") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if auths is None:
        return {}
    if not isinstance(auths, dict):
        raise RegistryError(f"{path}: auths: must be an object")
    out = {}
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            raise RegistryError(f"{path}: auths.{key}: must be an object")
        if entry.get("auth"):
            try:
                user, sep, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError, TypeError):
                raise RegistryError(f"{path}: auths.{key}.auth: not base64 of user:password") from None
            if not sep:
                raise RegistryError(f"{path}: auths.{key}.auth: not base64 of user:password")
        elif entry.get("username"):
            user, password = str(entry["username"]), str(entry.get("password", ""))
        else:
            continue
        out[_host_key(key)] = (user, password)
    return out


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="...",scope="..."`` -> ("bearer", {...})."""
    from requests.utils import parse_dict_header

    scheme, _, params = header.strip().partition(" ")
    return scheme.lower(), {k.lower(): v for k, v in parse_dict_header(params).items() if v is not None}


class _Body:
    """File-like view of a streamed response, for Cache.write_blob."""

    def __init__(self, resp: requests.Response):
        self._it = resp.iter_content(1 << 20)
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            try:
                self._buf += next(self._it)
            except StopIteration:
                break
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out


class Registry:
    """A client for any number of registries, writing into one Cache.

    ``insecure``: hosts (``host`` or ``host:port``) that may be reached over plain http.
    ``auth_file``: a docker config.json; default ``$DOCKER_CONFIG/config.json`` or ~/.docker's.
    ``progress``: a mobykit.image.progress.Progress (silent when None).
    """

    def __init__(self, cache: Cache, *, insecure: Iterable[str] = (), auth_file: Path | None = None,
                 progress: Progress | None = None, timeout: tuple[float, float] = (10.0, 120.0), retries: int = 3):
        self.cache = cache
        self.insecure = {_host_key(h) for h in insecure}
        self.auth_file = auth_file
        self.progress = progress or silent()
        self.timeout = timeout
        self.retries = retries
        self._session: requests.Session | None = None
        self._creds: dict[str, tuple[str, str]] | None = None
        self._auth: dict[tuple[str, str], str] = {}  # (host, repo) -> Authorization header value
        self.requests_made = 0  # for callers (and tests) that want to know if we went online

    # --- transport ------------------------------------------------------------------------
    @property
    def session(self) -> requests.Session:
        if self._session is None:
            import requests
            from requests.adapters import HTTPAdapter
            from urllib3.util.retry import Retry

            retry = Retry(
                total=self.retries, connect=self.retries, read=self.retries, status=self.retries,
                backoff_factor=0.3, status_forcelist=(429, 500, 502, 503, 504),
                allowed_methods=frozenset({"GET", "HEAD"}), raise_on_status=False, respect_retry_after_header=True,
            )
            s = requests.Session()
            adapter = HTTPAdapter(max_retries=retry)
            s.mount("https://", adapter)
            s.mount("http://", adapter)
            s.headers["User-Agent"] = "mobykit"
            s.trust_env = True
            self._session = s
        return self._session

    def _credentials(self, host: str) -> tuple[str, str] | None:
        if self._creds is None:
            self._creds = load_credentials(self.auth_file)
        return self._creds.get(_host_key(host))

    def allows_http(self, host: str) -> bool:
        return refmod.is_loopback_host(host) or _host_key(host) in self.insecure

    def base_url(self, host: str) -> str:
        """``http://`` for loopback and insecure hosts, ``https://`` for everything else."""
        return f"{'http' if self.allows_http(host) else 'https'}://{host}"

    def check_url(self, url: str, what: str) -> None:
        """Refuse, before connecting, any plain-http URL to a host not allowed to use it."""
        parts = urlsplit(url)
        if parts.scheme == "https":
            return
        if parts.scheme == "http" and self.allows_http(parts.netloc):
            return
        if parts.scheme == "http":
            raise RegistryError(
                f"{what}: refusing plain http to {parts.netloc} ({url}); only loopback hosts and hosts "
                f"given with --insecure-registry may be used without TLS"
            )
        raise RegistryError(f"{what}: unsupported URL {url!r}")

    def _send(self, url: str, what: str, headers: dict, stream: bool, auth_host: str, auth: str | None):
        """GET following redirects by hand, so each hop is checked and credentials stay on their host."""
        import requests

        for _ in range(6):
            self.check_url(url, what)
            h = dict(headers)
            if auth and urlsplit(url).netloc == auth_host:
                h["Authorization"] = auth
            self.requests_made += 1
            try:
                resp = self.session.get(url, headers=h, stream=stream, timeout=self.timeout, allow_redirects=False)
            except requests.RequestException as e:
                raise RegistryError(f"{what}: cannot reach {urlsplit(url).netloc}: {e}") from None
            if resp.status_code in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                url = urljoin(url, resp.headers["Location"])
                resp.close()
                continue
            return resp
        raise RegistryError(f"{what}: too many redirects")

    def _token(self, host: str, repo: str, challenge: dict[str, str], what: str) -> str:
        realm = challenge.get("realm")
        if not realm:
            raise RegistryError(f"{what}: {host} sent a Bearer challenge without a realm")
        self.check_url(realm, f"{what}: token realm")
        params: dict[str, str] = {}
        if challenge.get("service"):
            params["service"] = challenge["service"]
        params["scope"] = challenge.get("scope") or f"repository:{repo}:pull"
        creds = self._credentials(host)
        import requests

        self.requests_made += 1
        try:
            resp = self.session.get(realm, params=params, auth=creds, timeout=self.timeout, allow_redirects=False)
        except requests.RequestException as e:
            raise RegistryError(f"{what}: cannot reach token service {realm}: {e}") from None
        if resp.status_code in (401, 403):
            who = f"as {creds[0]!r} (from {docker_config_path(self.auth_file)})" if creds else "anonymously"
            raise RegistryError(f"{what}: token service {realm} refused access {who} (HTTP {resp.status_code})")
        if resp.status_code != 200:
            raise RegistryError(f"{what}: token service {realm} answered HTTP {resp.status_code}")
        try:
            doc = resp.json()
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token or not isinstance(token, str):
            raise RegistryError(f"{what}: token service {realm} returned no token")
        return token

    def _get(self, r: Reference, path: str, what: str, *, accept: str | None = None, stream: bool = False):
        """An authenticated GET on ``/v2/<repo>/<path>``, answering one auth challenge."""
        host = r.api_host
        url = f"{self.base_url(host)}/v2/{r.repository}/{path}"
        headers = {"Accept": accept} if accept else {"Accept-Encoding": "identity"}
        key = (host, r.repository)
        auth = self._auth.get(key)
        resp = self._send(url, what, headers, stream, host, auth)
        if resp.status_code == 401:
            challenge_header = resp.headers.get("WWW-Authenticate", "")
            resp.close()
            scheme, challenge = _parse_challenge(challenge_header)
            if scheme == "bearer":
                auth = f"Bearer {self._token(host, r.repository, challenge, what)}"
            elif scheme == "basic" and self._credentials(host):
                user, password = self._credentials(host)
                auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            else:
                raise RegistryError(f"{what}: {host} requires authentication; add credentials to "
                                    f"{docker_config_path(self.auth_file)}")
            self._auth[key] = auth
            resp = self._send(url, what, headers, stream, host, auth)
            if resp.status_code == 401:
                resp.close()
                raise RegistryError(f"{what}: unauthorized at {host} (credentials missing or lacking pull access "
                                    f"to {r.repository})")
        if resp.status_code == 404:
            resp.close()
            raise RegistryError(f"{what}: not found on {host}")
        if resp.status_code == 403:
            resp.close()
            raise RegistryError(f"{what}: access denied by {host}")
        if resp.status_code != 200:
            resp.close()
            raise RegistryError(f"{what}: {host} answered HTTP {resp.status_code}")
        return resp

    # --- manifests and blobs ---------------------------------------------------------------
    def _manifest(self, r: Reference, reference: str) -> tuple[bytes, str, str]:
        """(body, media type, digest) of a manifest, the digest checked against the body."""
        what = f"{r.name}@{reference}" if reference.startswith("sha256:") else f"{r.name}:{reference}"
        resp = self._get(r, f"manifests/{reference}", what, accept=ACCEPT, stream=True)
        with resp:
            body = resp.raw.read(MAX_MANIFEST + 1, decode_content=True)
        if len(body) > MAX_MANIFEST:
            raise RegistryError(f"{what}: manifest larger than {MAX_MANIFEST} bytes")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(f"{what}: digest mismatch: registry sent a manifest whose digest is {digest}")
        header = resp.headers.get("Docker-Content-Digest")
        if header and header.startswith("sha256:") and header != digest:
            raise RegistryError(f"{what}: digest mismatch: Docker-Content-Digest {header} but content is {digest}")
        try:
            doc = json.loads(body)
        except ValueError:
            raise RegistryError(f"{what}: manifest is not valid JSON") from None
        if not isinstance(doc, dict):
            raise RegistryError(f"{what}: manifest is not a JSON object")
        ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
        mt = ctype if ctype in INDEX_TYPES + MANIFEST_TYPES else media_type_of(doc)
        if doc.get("schemaVersion") == 1 or mt not in INDEX_TYPES + MANIFEST_TYPES:
            raise RegistryError(f"{what}: unsupported manifest type {mt or doc.get('schemaVersion')!r} "
                                "(docker schema2 and OCI are supported)")
        return body, mt, digest

    def _blob(self, r: Reference, digest: str, size: int | None, label: str) -> None:
        import requests

        if self.cache.has_blob(digest):
            return
        what = f"{r.name}: blob {digest}"
        for attempt in range(self.retries + 1):
            task = self.progress.task(f"{label} {digest[7:19]}", size)
            try:
                resp = self._get(r, f"blobs/{digest}", what, stream=True)
                with resp:
                    self.cache.write_blob(_Body(resp), expected=digest, size=size, progress=task)
                return
            except ImageError as e:
                raise RegistryError(f"{what}: {e.message}") from None
            except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError) as e:
                if attempt == self.retries:
                    raise RegistryError(f"{what}: download failed: {e}") from None
            finally:
                task.done()

    def pull(self, ref: Reference | str, arch: str) -> ImageInfo:
        """Fetch ``ref`` for linux/<arch> into the cache (manifests, config, layers, each checked
        against its digest, and the SPDX attestations an index has for that manifest), then tag it.
        The tag is written last: it never names a partial image."""
        r = refmod.parse(ref) if isinstance(ref, str) else ref
        top_body, top_type, top = self._manifest(r, r.digest or r.tag or "latest")
        self.cache.write_blob(top_body, expected=top)
        manifest = top
        if top_type in INDEX_TYPES:
            desc = select_platform(json.loads(top_body), arch, str(r))
            manifest = check_digest(desc.get("digest"), str(r))
            if not self.cache.has_blob(manifest):
                body, mt, _ = self._manifest(r, manifest)
                if mt not in MANIFEST_TYPES:
                    raise RegistryError(f"{r}: linux/{arch} entry {manifest} is a {mt}, not an image manifest")
                self.cache.write_blob(body, expected=manifest)
        doc = self.cache.read_json(manifest)
        try:
            descs = [doc["config"]] + list(doc.get("layers") or [])
            todo = [(check_digest(d["digest"], str(r)), int(d["size"]) if "size" in d else None) for d in descs]
        except (KeyError, TypeError, ValueError) as e:
            raise RegistryError(f"{r}: manifest {manifest} is malformed: {e!r}") from None
        for i, (digest, size) in enumerate(todo):
            self._blob(r, digest, size, "config" if i == 0 else f"{r.repository} layer")
        if top_type in INDEX_TYPES:
            for attestation in attestations_in(json.loads(top_body), manifest, str(r)):
                self.fetch_attestation(r, attestation)
        self.cache.tag(r, top)
        return self.cache.image_from_manifest(str(r), top, arch)

    def fetch_attestation(self, ref: Reference | str, digest: str) -> None:
        """An attestation manifest of ``ref`` (by digest) and its SPDX layers, into the cache: what
        the build's SBOM merges (``mobykit.image.sbom_oci``). Other attestation layers, such as
        SLSA provenance, are not fetched."""
        r = refmod.parse(ref) if isinstance(ref, str) else ref
        if not self.cache.has_blob(digest):
            body, mt, _ = self._manifest(r, digest)
            if mt not in MANIFEST_TYPES:
                raise RegistryError(f"{r}: attestation {digest} is a {mt}, not a manifest")
            self.cache.write_blob(body, expected=digest)
        for layer in spdx_layers(self.cache.read_json(digest)):
            size = layer.get("size")
            self._blob(r, check_digest(layer.get("digest"), str(r)), size if isinstance(size, int) else None, "sbom")


def ensure(cache: Cache, ref: Reference | str, arch: str, *, pull: bool = False,
           registry: Registry | None = None) -> ImageInfo:
    """The image for ``ref``: from the cache when it is there (no network at all), else pulled.

    ``pull=True`` re-resolves tags against the registry (a digest reference is immutable, so one
    already cached is never fetched again). ``registry=None`` makes a default client only if the
    network is actually needed.
    """
    r = refmod.parse(ref) if isinstance(ref, str) else ref
    if not pull or r.digest:
        try:
            return cache.resolve(r, arch)
        except CacheMiss:
            pass
    return (registry or Registry(cache)).pull(r, arch)
