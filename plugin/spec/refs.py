"""Image references in a spec: syntax check at load time and the normal form used for hashing.

The grammar itself lives in mobykit.image.reference (one implementation for the whole program);
this module only adds LinuxKit's ``@pkg:<dir>`` templates, which name a package to build rather
than an image to pull and are kept as written.
"""

from __future__ import annotations

from mobykit.errors import InvalidArgument

TEMPLATE_PREFIX = "@pkg:"


def is_template(text: str) -> bool:
    return text.startswith(TEMPLATE_PREFIX)


def check(text: str) -> str | None:
    """None when ``text`` is a usable reference, else why not (one short phrase)."""
    from mobykit.image.reference import parse

    if is_template(text):
        return None if text[len(TEMPLATE_PREFIX) :].strip() else "@pkg: template names no package directory"
    try:
        parse(text)
    except InvalidArgument as e:
        return str(e)
    return None


def normalise(text: str) -> str:
    """``alpine`` -> ``docker.io/library/alpine:latest``; templates and bad text unchanged."""
    from mobykit.image.reference import parse

    if is_template(text):
        return text
    try:
        return str(parse(text))
    except InvalidArgument:
        return text
