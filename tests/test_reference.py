"""Image references normalise the way docker does, so one image written two ways is one cache entry."""

import pytest

from mobykit.errors import InvalidArgument
from mobykit.image.reference import is_loopback_host, parse

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "text, expected",
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("linuxkit/init:v1.0", "docker.io/linuxkit/init:v1.0"),
        ("docker.io/linuxkit/init:v1.0", "docker.io/linuxkit/init:v1.0"),
        ("index.docker.io/library/busybox:1", "docker.io/library/busybox:1"),
        ("ghcr.io/org/team/img:tag", "ghcr.io/org/team/img:tag"),
        ("localhost/img", "localhost/img:latest"),
        ("127.0.0.1:5000/a/b:c", "127.0.0.1:5000/a/b:c"),
        ("[::1]:5000/a:b", "[::1]:5000/a:b"),
        (f"linuxkit/init@{D}", f"docker.io/linuxkit/init@{D}"),
        (f"host:5000/x:tag@{D}", f"host:5000/x:tag@{D}"),
        ("my-reg.example.com/a__b/c.d-e:1.2_3", "my-reg.example.com/a__b/c.d-e:1.2_3"),
    ],
)
def test_normalisation(text, expected):
    assert str(parse(text)) == expected


def test_fields_and_api_host():
    r = parse("linuxkit/init:v1")
    assert (r.registry, r.repository, r.tag, r.digest) == ("docker.io", "linuxkit/init", "v1", None)
    assert r.name == "docker.io/linuxkit/init"
    assert r.api_host == "registry-1.docker.io"
    d = parse(f"ghcr.io/a/b@{D}")
    assert (d.tag, d.digest, d.api_host) == (None, D, "ghcr.io")


def test_first_component_without_dot_is_a_repository_path():
    # "foo/bar" is docker.io/foo/bar, not a registry called foo
    assert parse("foo/bar").registry == "docker.io"


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "empty"),
        ("Alpine", "lowercase"),
        ("alpine:", "tag"),
        ("alpine@sha256:abc", "digest"),
        ("a//b", "component"),
        ("alpine:bad/tag", "registry host"),
        (" alpine", "whitespace"),
        ("reg.io:port/x", "registry host"),
    ],
)
def test_bad_references_are_named(text, why):
    with pytest.raises(InvalidArgument) as e:
        parse(text)
    assert repr(text) in str(e.value) and why in str(e.value)


@pytest.mark.parametrize(
    "host, ok",
    [("127.0.0.1:5000", True), ("127.3.4.5", True), ("localhost:80", True), ("[::1]:5000", True),
     ("10.0.0.1:5000", False), ("example.com", False), ("127.0.0.1.example.com", False), ("[::2]:5", False)],
)
def test_loopback(host, ok):
    assert is_loopback_host(host) is ok
