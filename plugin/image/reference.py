"""Image references, normalised the way the docker CLI does it.

Specs written for LinuxKit say ``linuxkit/init:v1.0`` and mean ``docker.io/linuxkit/init:v1.0``;
the cache records the *normalised* form so the same image written two ways is one cache entry.
The grammar follows distribution's reference package (the de-facto standard); it is small enough
that a regex here is clearer than a dependency (no maintained Python package implements it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mobykit.errors import InvalidArgument

DEFAULT_REGISTRY = "docker.io"
# Hosts the Docker Hub is known by; the API itself lives at registry-1.docker.io.
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
HUB_API_HOST = "registry-1.docker.io"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_DOMAIN = re.compile(
    r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?\Z"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}\Z")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class Reference:
    """A fully-qualified image reference; at least one of ``tag`` / ``digest`` is set."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """Host the distribution API answers on (docker.io is served by registry-1.docker.io)."""
        return HUB_API_HOST if self.registry == DEFAULT_REGISTRY else self.registry

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, None, digest)

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def _bad(text: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"invalid image reference {text!r}: {why}")


def parse(text: str) -> Reference:
    """Parse and normalise ``text``: ``alpine`` -> ``docker.io/library/alpine:latest``.

    Raises InvalidArgument naming the reference and what is wrong with it; callers that know the
    spec file and line wrap it into a SpecError.
    """
    if not isinstance(text, str) or not text:
        raise _bad(str(text), "empty")
    if text != text.strip():
        raise _bad(text, "surrounding whitespace")
    rest = text
    digest = None
    if "@" in rest:
        rest, digest = rest.rsplit("@", 1)
        if not _DIGEST.match(digest):
            raise _bad(text, f"digest {digest!r} is not sha256:<64 lowercase hex>")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.match(tag):
            raise _bad(text, f"tag {tag!r} is not valid")
    if not rest:
        raise _bad(text, "no repository name")
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, repository = first, remainder
        if not _DOMAIN.match(registry):
            raise _bad(text, f"registry host {registry!r} is not valid")
    else:
        registry, repository = DEFAULT_REGISTRY, rest
    if registry.lower() in _HUB_ALIASES:
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = f"library/{repository}"
    for component in repository.split("/"):
        if not _COMPONENT.match(component):
            if component.lower() != component:
                raise _bad(text, "repository names must be lowercase")
            raise _bad(text, f"repository path component {component!r} is not valid")
    if len(registry) + 1 + len(repository) > 255:
        raise _bad(text, "name longer than 255 characters")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, repository, tag, digest)


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, localhost and [::1] (with or without a port): the only hosts that
    may be reached over plain http without being named as insecure."""
    h = host.lower()
    if h.startswith("["):
        return h.split("]", 1)[0] == "[::1"
    h = h.split(":", 1)[0]
    if h == "localhost":
        return True
    parts = h.split(".")
    return len(parts) == 4 and parts[0] == "127" and all(p.isdigit() and int(p) < 256 for p in parts)
