"""Loading and validating spec files: what a user writes, what the build gets, and the exact
error a mistake produces (file:line: field: message)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mobykit.errors import SpecError
from mobykit.spec import load, loads

DATA = Path(__file__).parent / "data" / "specs"
BAD = DATA / "bad"


@pytest.fixture
def in_data_dir():
    """Run with the specs directory as working directory so errors name files as the user typed."""
    old = os.getcwd()
    os.chdir(BAD)
    try:
        yield
    finally:
        os.chdir(old)


# (file, exact message) - the file is given relative to tests/data/specs/bad.
MALFORMED = [
    ("unknown-cap.yml", "unknown-cap.yml:10: services[1].capabilities: unknown capability CAP_FOO"),
    ("syntax.yml", "syntax.yml:3: YAML syntax error while scanning a quoted scalar: found unexpected end of stream at line 6"),
    ("duplicate-key.yml", "duplicate-key.yml:7: onboot[0].command: duplicate key 'command' (first set on line 6)"),
    ("wrong-type.yml", "wrong-type.yml:6: onboot[0].readonly: expected true or false, got a string"),
    ("unknown-field.yml",
     "unknown-field.yml:4: services[0].capabilites: unknown field 'capabilites' (did you mean 'capabilities'?)"),
    ("unknown-top.yml", "unknown-top.yml:3: service: unknown field 'service' (did you mean 'services'?)"),
    ("bad-mode.yml", "bad-mode.yml:6: files[1].mode: bad mode '0x644': expected an octal string like \"0644\""),
    ("contents-and-directory.yml",
     "contents-and-directory.yml:4: files[0].contents: give only one of directory, symlink, contents, source, "
     "metadata (got directory, contents)"),
    ("two-sources.yml",
     "two-sources.yml:4: files[0].metadata: give only one of directory, symlink, contents, source, metadata "
     "(got source, metadata)"),
    ("dup-names.yml", "dup-names.yml:6: services[2].name: duplicate service name 'web' (first used at line 2)"),
    ("bad-ref.yml",
     "bad-ref.yml:3: onboot[0].image: invalid image reference 'Linuxkit/Init:v1': repository names must be lowercase"),
    ("empty.yml", "empty.yml: empty spec (no YAML document)"),
    ("alias-bomb.yml", "alias-bomb.yml:2: YAML aliases (*a) are not allowed in a spec"),
    ("top-list.yml", "top-list.yml:1: top level must be a mapping of sections (kernel, init, ...), got a list"),
    ("missing-image.yml", "missing-image.yml:4: onboot[1]: missing required field 'image'"),
    ("path-escape.yml",
     "path-escape.yml:2: files[0].path: path '../../etc/passwd' must name a file inside the image (no '..', not empty)"),
    ("bad-bind.yml",
     "bad-bind.yml:5: services[0].binds[0]: bind '/var/www' has no ':' (expected /source:/destination[:options])"),
    ("non-string-key.yml", "non-string-key.yml:6: services[0]: key '1' must be a string"),
    ("file-uid.yml",
     "file-uid.yml:5: files[0].uid: no container named 'wbe': a uid name means the id given to the container of that name"),
    ("two-docs.yml", "two-docs.yml:3: a spec file holds one YAML document; found a second '---'"),
    ("both-names.yml", "both-names.yml:4: system: both 'onboot' and 'system' given; 'system' is the 2017 name of 'onboot'"),
    ("bad-rlimit.yml", "bad-rlimit.yml:6: services[0].rlimits[1]: unknown rlimit 'nofiles'"),
    ("bad-netns.yml",
     "bad-netns.yml:4: services[0].net: 'bridge' is not valid: use host, new, none, root or the path of a namespace to join"),
    ("kernel-no-image.yml", "kernel-no-image.yml:1: kernel.image: kernel section has no image"),
    ("tag-python.yml",
     "tag-python.yml:3: services[0].image: YAML tag 'tag:yaml.org,2002:python/object:os.system' is not allowed"),
    ("bad-name.yml",
     "bad-name.yml:2: onboot[0].name: name '../../escape' must be letters, digits, '.', '_' or '-' "
     "(it names a directory in the image)"),
]


@pytest.mark.parametrize("name,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_spec_is_refused_with_file_line_and_field(in_data_dir, name, message):
    with pytest.raises(SpecError) as info:
        load([name])
    assert str(info.value) == message
    assert info.value.exit_code == 2


def test_huge_file_is_refused_without_parsing(tmp_path):
    big = tmp_path / "huge.yml"
    big.write_bytes(b"#" * (1 << 20) + b"\nkernel: {image: x}\n")
    with pytest.raises(SpecError, match=r"huge\.yml: file is larger than 1048576 bytes"):
        load([big])


def test_quadratic_alias_expansion_is_refused_even_when_nested(tmp_path):
    # Aliases are refused before anything expands, wherever they appear.
    p = tmp_path / "nested.yml"
    p.write_text("services:\n  - name: a\n    image: alpine\n    env: &e [A=1]\n  - name: b\n    image: alpine\n    env: *e\n")
    with pytest.raises(SpecError, match=r"nested\.yml:7: YAML aliases \(\*e\) are not allowed"):
        load([p])


def test_deep_nesting_is_refused(tmp_path):
    p = tmp_path / "deep.yml"
    p.write_text("kernel: " + "[" * 200 + "]" * 200 + "\n")
    with pytest.raises(SpecError, match="nesting"):
        load([p])


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(SpecError, match=r"nope\.yml: cannot read: No such file or directory"):
        load([tmp_path / "nope.yml"])


def test_unknown_capability_in_label_style_add_field_is_refused():
    with pytest.raises(SpecError) as info:
        loads("services:\n  - name: a\n    image: alpine\n    capabilities.add:\n      - CAP_NET_ADMIN\n      - NET_RAW\n", "x.yml")
    assert str(info.value) == "x.yml:6: services[0].capabilities.add: unknown capability NET_RAW (did you mean CAP_NET_RAW?)"


def test_all_must_be_alone():
    with pytest.raises(SpecError, match=r"x\.yml:4: services\[0\]\.capabilities: 'all' must be the only item"):
        loads("services:\n  - name: a\n    image: alpine\n    capabilities: [all, CAP_CHOWN]\n", "x.yml")


def test_linuxkit_spec_loads_with_everything_the_build_needs():
    spec = load([DATA / "linuxkit.yml"])
    assert spec.kernel.image == "linuxkit/kernel:6.6.71"
    assert spec.kernel.cmdline == "console=ttyS0 console=tty0"
    assert spec.kernel.binary_name == "kernel" and spec.kernel.tar_name == "kernel.tar" and spec.kernel.ucode is None
    assert [e.name for e in spec.onboot] == ["sysctl", "dhcpcd"]
    assert [e.name for e in spec.onshutdown] == ["shutdown"]
    assert [e.name for e in spec.services] == ["getty", "nginx"]
    nginx = spec.services[1]
    assert nginx.config["capabilities"][0] == "CAP_NET_BIND_SERVICE"
    assert nginx.config["binds"] == ["/etc/resolv.conf:/etc/resolv.conf"]
    # Every entry keeps where it was written, for later errors.
    assert (nginx.file, nginx.line, nginx.field) == (str(DATA / "linuxkit.yml"), 24, "services[1]")
    assert nginx.lines["capabilities"] == 26
    # Bundle directories as LinuxKit names them.
    assert [e.prefix for e in spec.entries()] == [
        "containers/onboot/000-sysctl", "containers/onboot/001-dhcpcd", "containers/onshutdown/000-shutdown",
        "containers/services/getty", "containers/services/nginx"]
    assert spec.refs() == [
        "linuxkit/kernel:6.6.71",
        "linuxkit/init:8eea386739975a43af558eec757a7dcb3a3d2e7b",
        "linuxkit/runc:667e7ea2c426a2460ca21e3da065a57dbb3369c9",
        "linuxkit/containerd:a988a1a8bcbacc2c0390ca0c08f949e2b4b5915d",
        "linuxkit/sysctl:5f56434b81004b50b47ed629b222619168c2bcdf",
        "linuxkit/dhcpcd:157df9ef45a035f1542ec2270e374f18efef98a5",
        "linuxkit/getty:v1.0",
        "nginx:1.19.5-alpine",
        "busybox:latest",
    ]
    assert spec.trust == {"org": ["linuxkit"]}
    assert any(n.startswith("trust:") for n in spec.notes)


def test_files_section_semantics():
    spec = load([DATA / "linuxkit.yml"])
    meta, conf_dir, site, motd, vi = spec.files
    assert meta.metadata == "yaml" and meta.effective_mode == 0o600
    assert conf_dir.path == "etc/nginx/conf.d" and conf_dir.directory and conf_dir.mode == 0o755  # leading / dropped
    # A relative source is read from the spec file's directory, whatever the working directory.
    assert Path(site.source) == DATA / "site.conf" and site.source_as_written == "site.conf"
    assert site.mode == 0o644
    # A uid name is the id LinuxKit gives the container of that name (100 + position).
    assert site.uid == 104 and site.gid == 101
    assert motd.contents == "hello\n" and motd.effective_mode == 0o600 and motd.uid == 0
    assert vi.symlink == "busybox" and vi.effective_mode == 0o777
    assert spec.idmap() == {"sysctl": 100, "dhcpcd": 101, "shutdown": 102, "getty": 103, "nginx": 104}


def test_home_relative_source_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = loads("files:\n  - path: etc/key\n    source: ~/key.pub\n    optional: true\n", "x.yml")
    assert spec.files[0].source == str(tmp_path / "key.pub") and spec.files[0].optional


def test_2017_moby_form_means_the_same_as_linuxkit_form():
    old = load([DATA / "moby2017.yml"])
    assert [e.name for e in old.onboot] == ["sysctl"] and [e.name for e in old.services] == ["rngd"]
    assert old.init == ["mobylinux/init:8375addb923b8b88b2209740309c92aa5f2a4f9d"]
    assert old.outputs == ["kernel+initrd", "iso-bios"]
    assert old.services[0].prefix == "containers/services/rngd" and old.onboot[0].prefix == "containers/onboot/000-sysctl"
    new = load([DATA / "same-meaning.yml"])
    # Same meaning, different names, quoting, key order, flow style and reference spelling.
    assert old.canonical() == new.canonical()
    assert json.dumps(old.canonical(), sort_keys=True) == json.dumps(new.canonical(), sort_keys=True)


def test_canonical_changes_when_meaning_changes():
    a = loads("services:\n  - name: a\n    image: alpine\n    readonly: true\n", "a.yml")
    b = loads("services:\n  - name: a\n    image: alpine\n    readonly: false\n", "b.yml")
    c = loads("services:\n  - {image: alpine, name: a, readonly: true}\n", "c.yml")
    assert a.canonical() != b.canonical()
    assert a.canonical() == c.canonical()
    json.dumps(a.canonical())  # JSON-able


def test_empty_sections_are_allowed():
    spec = loads("kernel:\n  image: linuxkit/kernel:6.6.71\ninit:\nonboot:\nservices:\nfiles:\n", "x.yml")
    assert spec.init == [] and spec.services == [] and spec.files == []


def test_pkg_templates_are_kept_as_references():
    spec = loads('init:\n  - "@pkg:./pkg/init"\n', "x.yml")
    assert spec.refs() == ["@pkg:./pkg/init"]


def test_load_does_not_touch_the_spec_directory(tmp_path):
    shutil.copy(DATA / "linuxkit.yml", tmp_path / "s.yml")
    (tmp_path / "site.conf").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    load([tmp_path / "s.yml"])
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_unquoted_octal_mode_gets_a_hint():
    with pytest.raises(SpecError) as info:
        loads("files:\n  - path: etc/a\n    contents: a\n    mode: 0644\n", "x.yml")
    assert str(info.value) == "x.yml:4: files[0].mode: expected a string, got a number (put it in quotes)"


def test_leading_directories_get_linuxkit_modes():
    spec = loads("files:\n  - path: a/b/c\n    contents: x\n    mode: '0640'\n  - path: d/e\n    contents: y\n", "x.yml")
    assert spec.files[0].parent_dir_mode == 0o750
    assert spec.files[1].parent_dir_mode == 0o700


@pytest.mark.parametrize("text,message", [
    ("init:\n  - a\n  - 1\n", "x.yml:3: init[1]: expected an image reference (a string), got a number"),
    ("services:\n  - name: a\n    image: b\n    uid: -1\n", "x.yml:4: services[0].uid: ids are not negative, got -1"),
    ("a: 1\nb: \x07\n", "x.yml:2: control character U+0007 is not allowed in YAML"),
    ("services:\n  - alpine\n", "x.yml:2: services[0]: expected a mapping, got a string"),
    ("trust: {org: linuxkit}\n", "x.yml:1: trust.org: expected a list, got a string"),
    ("services:\n  - name: a\n    image: b\n    mounts:\n      - {destination: /x}\n",
     "x.yml:5: services[0].mounts[0]: mount for destination /x has no type"),
])
def test_more_mistakes(text, message):
    with pytest.raises(SpecError) as info:
        loads(text, "x.yml")
    assert str(info.value) == message
