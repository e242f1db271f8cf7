"""runtime.json -> runtime.sh: LinuxKit's per-container runtime extras as a POSIX sh script.

LinuxKit's init reads runtime.json with a Go JSON parser. Our guest init is busybox ash, which has
no JSON parser, so the build translates runtime.json once, here, into a script that sits beside it
in the bundle. LinuxKit's own init ignores runtime.sh, so bundles stay compatible with both.

The script has two entry points (``sh runtime.sh prepare`` and ``sh runtime.sh after_create PID``):

* ``prepare`` runs before ``runc create``: ``mounts`` (in order; a relative destination is inside
  the bundle's rootfs, as LinuxKit does; overlay upperdir/workdir are created first; propagation
  options become ``mount --make-X``), then
  ``mkdir``, then ``cgroups`` (cgroup2 directories under /sys/fs/cgroup).
* ``after_create PID`` runs once the container's namespaces exist but before its process starts:
  ``interfaces`` (move an existing link, or create one - veth pairs and ``createInRoot`` links in
  the root namespace, then moved - into the netns of PID), then ``bindNS`` (bind-mount
  /proc/PID/ns/X onto the given path so other containers can join the namespace).

Every value comes from user YAML and is untrusted, so each one reaches the shell only as a single
quoted word, and values the shell or the tools could misread (NUL bytes, interface names the kernel
would refuse, option strings holding a comma) are refused at build time with the field named.
A script that needs ``after_create`` carries the marker line ``# mobykit:after-create``; for those
bundles the init adds a runc createRuntime hook (/usr/bin/mobykit-hook) that calls it.
"""

from __future__ import annotations

import posixpath
import re

from mobykit.errors import SpecError

NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "user", "uts")
AFTER_CREATE_MARKER = "# mobykit:after-create"

# Kernel rule (dev_valid_name): 1..15 bytes, not "." or "..", no "/", ":" or whitespace. A leading
# "-" is refused as well, so busybox ip never reads a name as an option.
_IFNAME = re.compile(r"^[^\s/:\-][^\s/:]{0,14}$")
_LINK_KIND = re.compile(r"^[a-z0-9_]{1,32}$")
_PROPAGATION = ("shared", "rshared", "slave", "rslave", "private", "rprivate", "unbindable", "runbindable")


def quote(value: str) -> str:
    """One shell word holding exactly ``value``: single quotes, with ' written as '\\''.

    shlex.quote does the same job; it is not used because it leaves "safe" strings bare, and we
    want every untrusted value visibly quoted in the generated file (easier to audit)."""
    return "'" + value.replace("'", "'\\''") + "'"


def _text(value, field: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise SpecError(f"must be a string, not {type(value).__name__}", field=field)
    if "\0" in value:
        raise SpecError("must not contain a NUL byte", field=field)
    if not value and not allow_empty:
        raise SpecError("must not be empty", field=field)
    return value


def _list(runtime: dict, key: str) -> list:
    value = runtime.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise SpecError(f"must be a list, not {type(value).__name__}", field=f"runtime.{key}")
    return value


def _path_in(bundle: str, path: str, field: str) -> str:
    """A shell word for ``path``: absolute paths stay as they are, relative ones are inside the
    bundle's rootfs (LinuxKit's rule). A relative path may not climb out of the rootfs."""
    if path.startswith("/"):
        return quote(posixpath.normpath(path) if path != "/" else "/")
    norm = posixpath.normpath(path)
    if norm == ".." or norm.startswith("../"):
        raise SpecError(f"relative path {path!r} leaves the container's rootfs", field=field)
    return quote(posixpath.join(bundle, "rootfs", norm) if norm != "." else posixpath.join(bundle, "rootfs"))


def _mount_lines(bundle: str, index: int, mount) -> list[str]:
    field = f"runtime.mounts[{index}]"
    if not isinstance(mount, dict):
        raise SpecError("must be a mapping", field=field)
    dest = _text(mount.get("destination"), f"{field}.destination")
    source = _text(mount.get("source", "none") or "none", f"{field}.source")
    mtype = _text(mount.get("type", "") or "", f"{field}.type", allow_empty=True)
    options = mount.get("options") or []
    if not isinstance(options, list):
        raise SpecError("must be a list", field=f"{field}.options")
    opts: list[str] = []
    lines = [f"\tmkdir -p -- {_path_in(bundle, dest, field + '.destination')}"]
    for j, opt in enumerate(options):
        opt = _text(opt, f"{field}.options[{j}]")
        if "," in opt:
            # mount -o joins options with commas; a comma inside one would split it silently.
            raise SpecError(f"option {opt!r} contains a comma", field=f"{field}.options[{j}]")
        key, eq, val = opt.partition("=")
        if eq and key in ("upperdir", "workdir"):
            if not val.startswith("/"):
                raise SpecError(f"{key} must be an absolute path", field=f"{field}.options[{j}]")
            lines.append(f"\tmkdir -p -- {quote(val)}")
        opts.append(opt)
    # Propagation flags cannot ride along in busybox's -o (on a remount it hands them to the
    # filesystem as data: "tmpfs: Unknown parameter 'private'"), so each becomes its own
    # "mount --make-X" after the mount. A bare remount carrying only propagation flags (LinuxKit's
    # {"options": ["remount", "private"]}) is then just the --make-X.
    prop = [o for o in opts if o in _PROPAGATION]
    opts = [o for o in opts if o not in _PROPAGATION]
    dest_q = _path_in(bundle, dest, field + ".destination")
    makes = [f"\tmount --make-{o} -- {dest_q}" for o in prop]
    if prop and opts == ["remount"] and not mtype:
        return lines + makes
    cmd = "\tmount"
    if mtype and mtype not in ("bind", "none"):
        cmd += f" -t {quote(mtype)}"
    if opts:
        cmd += f" -o {quote(','.join(opts))}"
    if source.startswith("-"):
        raise SpecError(f"source {source!r} must not start with '-'", field=f"{field}.source")
    cmd += f" -- {quote(source)} {dest_q}"
    lines.append(cmd)
    return lines + makes


def _interface_lines(index: int, iface) -> list[str]:
    field = f"runtime.interfaces[{index}]"
    if not isinstance(iface, dict):
        raise SpecError("must be a mapping", field=field)
    name = _text(iface.get("name"), f"{field}.name")
    if not _IFNAME.match(name) or name in (".", ".."):
        raise SpecError(f"{name!r} is not a valid interface name", field=f"{field}.name")
    add = _text(iface.get("add", "") or "", f"{field}.add", allow_empty=True)
    peer = _text(iface.get("peer", "") or "", f"{field}.peer", allow_empty=True)
    in_root = iface.get("createInRoot", False)
    if not isinstance(in_root, bool):
        raise SpecError("must be true or false", field=f"{field}.createInRoot")
    if peer and not add:
        add = "veth"  # LinuxKit: a peer implies a veth pair
    if add and not _LINK_KIND.match(add):
        raise SpecError(f"{add!r} is not a link type", field=f"{field}.add")
    if peer and (not _IFNAME.match(peer) or peer in (".", "..")):
        raise SpecError(f"{peer!r} is not a valid interface name", field=f"{field}.peer")
    q = quote(name)
    if add == "veth":
        if not peer:
            raise SpecError(f"a veth pair {name!r} needs a peer", field=f"{field}.peer")
        # busybox ip cannot name a veth peer: the kernel names it, we find it by ifindex and rename.
        return [f"\t_veth {q} {quote(peer)}", f'\tip link set {q} netns "$pid"']
    if add and in_root:
        return [f"\tip link add {q} type {quote(add)}", f'\tip link set {q} netns "$pid"']
    if add:
        return [f'\tnsenter -t "$pid" -n ip link add {q} type {quote(add)}']
    return [f'\tip link set {q} netns "$pid"']


def runtime_script(runtime: dict, bundle: str) -> str:
    """The runtime.sh text for ``runtime`` (parsed runtime.json) of the bundle at ``bundle``
    (its absolute path in the guest, e.g. ``/containers/onboot/000-dhcpcd``).

    Same input -> same bytes (the output goes into a reproducible image). Bad input raises
    SpecError naming the runtime.json field."""
    if runtime is None:
        runtime = {}
    if not isinstance(runtime, dict):
        raise SpecError("runtime must be a mapping", field="runtime")
    bundle = _text(bundle, "bundle")
    if not bundle.startswith("/"):
        raise SpecError(f"bundle path {bundle!r} must be absolute", field="bundle")
    bundle = posixpath.normpath(bundle)

    prepare: list[str] = []
    for i, mount in enumerate(_list(runtime, "mounts")):
        prepare += _mount_lines(bundle, i, mount)
    for i, d in enumerate(_list(runtime, "mkdir")):
        d = _text(d, f"runtime.mkdir[{i}]")
        prepare.append(f"\tmkdir -p -- {_path_in(bundle, d, f'runtime.mkdir[{i}]')}")
    for i, cg in enumerate(_list(runtime, "cgroups")):
        cg = _text(cg, f"runtime.cgroups[{i}]").strip("/")
        norm = posixpath.normpath(cg) if cg else ""
        if not norm or norm == "." or norm == ".." or norm.startswith("../"):
            raise SpecError(f"{cg!r} is not a cgroup name", field=f"runtime.cgroups[{i}]")
        prepare.append(f"\tmkdir -p -- {quote('/sys/fs/cgroup/' + norm)}")

    after: list[str] = []
    for i, iface in enumerate(_list(runtime, "interfaces")):
        after += _interface_lines(i, iface)
    binds = runtime.get("bindNS") or {}
    if not isinstance(binds, dict):
        raise SpecError("must be a mapping", field="runtime.bindNS")
    for ns in sorted(binds):
        if ns not in NAMESPACES:
            raise SpecError(f"unknown namespace {ns!r} (one of {', '.join(NAMESPACES)})", field="runtime.bindNS")
        path = _text(binds[ns], f"runtime.bindNS.{ns}", allow_empty=True)
        if not path:
            continue
        if not path.startswith("/"):
            raise SpecError(f"{path!r} must be an absolute path", field=f"runtime.bindNS.{ns}")
        after.append(f"\t_bindns {quote(ns)} {quote(posixpath.normpath(path))}")
    # "namespace" names a containerd namespace in LinuxKit; runc has none, so it is ignored here.

    out = [
        "#!/bin/sh",
        "# Generated by mobykit from runtime.json (mobykit.image.runtime_sh); do not edit.",
        "# usage: sh runtime.sh prepare | sh runtime.sh after_create PID",
    ]
    if after:
        out.append(AFTER_CREATE_MARKER)
    out += [
        "set -e",
        f"bundle={quote(bundle)}",
        "",
        "prepare() {",
        *(prepare or ["\t:"]),
        "}",
        "",
        "_veth() {",
        "\tip link add \"$1\" type veth",
        "\t_idx=$(cat \"/sys/class/net/$1/iflink\")",
        "\tfor _d in /sys/class/net/*; do",
        "\t\tif [ \"$(cat \"$_d/ifindex\")\" = \"$_idx\" ]; then ip link set \"${_d##*/}\" name \"$2\"; return 0; fi",
        "\tdone",
        "\techo \"runtime.sh: peer of $1 not found\" >&2; return 1",
        "}",
        "",
        "_bindns() {",
        "\tmkdir -p -- \"$(dirname -- \"$2\")\"",
        "\t[ -e \"$2\" ] || : > \"$2\"",
        "\tmount -o bind -- \"/proc/$pid/ns/$1\" \"$2\"",
        "}",
        "",
        "after_create() {",
        "\tpid=$1",
        "\tcase \"$pid\" in ''|*[!0-9]*) echo \"runtime.sh: after_create needs a PID\" >&2; return 2;; esac",
        *(after or ["\t:"]),
        "}",
        "",
        'case "${1:-}" in',
        "prepare) prepare ;;",
        'after_create) after_create "${2:-}" ;;',
        "esac",
        "",
    ]
    return "\n".join(out)
