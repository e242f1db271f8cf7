"""One image entry -> one LinuxKit-compatible OCI bundle in the tree.

    <prefix>/config.json    OCI runtime config (mobykit.spec.oci: YAML > label > image > defaults)
    <prefix>/runtime.json   LinuxKit's runtime extras (mkdir, mounts, interfaces, bindNS, namespace)
    <prefix>/runtime.sh     the same extras as POSIX sh for our busybox init (LinuxKit's ignores it)
    <prefix>/rootfs/        the image's root filesystem, when the entry is read-only
    <prefix>/lower/ + tmp/ + rootfs/   otherwise: runtime.json mounts an overlay of lower onto rootfs

Keeping LinuxKit's layout means images we build boot with LinuxKit's own init too.
"""

from __future__ import annotations

import json

from mobykit.image.cache import ImageInfo
from mobykit.image.tree import Tree


def _text(tree: Tree, path: str) -> str | None:
    """A small text file from an image (``etc/passwd``), for resolving user and group names."""
    entry = tree.get(path)
    if entry is None or entry.type != "file" or entry.size > (1 << 20):
        return None
    return entry.source.read().decode("utf-8", "replace")


def _dump(doc: dict) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"


def add_bundle(tree: Tree, prefix: str, entry, info: ImageInfo, rootfs: Tree, spec) -> None:
    from mobykit.image.runtime_sh import runtime_script
    from mobykit.spec.oci import bundle_config

    config, runtime = bundle_config(
        entry, info.config, passwd=_text(rootfs, "etc/passwd"), group=_text(rootfs, "etc/group"), spec=spec
    )
    readonly = bool(config.get("root", {}).get("readonly"))
    tree.add_dir(prefix, mode=0o755)
    tree.add_bytes(f"{prefix}/config.json", _dump(config), mode=0o644)
    tree.add_bytes(f"{prefix}/runtime.json", _dump(runtime), mode=0o644)
    tree.add_bytes(f"{prefix}/runtime.sh", runtime_script(runtime, "/" + prefix).encode(), mode=0o755)
    if readonly:
        tree.graft(f"{prefix}/rootfs", rootfs)
        _mountpoints(tree, f"{prefix}/rootfs", config)
    else:
        tree.graft(f"{prefix}/lower", rootfs)
        tree.add_dir(f"{prefix}/tmp", mode=0o755)
        tree.add_dir(f"{prefix}/rootfs", mode=0o755)


def _mountpoints(tree: Tree, root: str, config: dict) -> None:
    """A read-only rootfs cannot grow the directories runc mounts onto (/dev, /proc, /sys, binds),
    so make the missing ones at build time (for binds, only their parents). Existing paths are left alone, whatever they are: a
    symlink is never followed here, and runc resolves it inside the container root itself."""
    for mount in config.get("mounts", []):
        dest = mount.get("destination", "").strip("/")
        if not dest:
            continue
        parts = dest.split("/")
        # A bind may be of a file, which needs a file to mount on: make only its parents.
        is_bind = mount.get("type") == "bind" or {"bind", "rbind"} & set(mount.get("options", []))
        for i in range(1, len(parts) + (0 if is_bind else 1)):
            path = f"{root}/{'/'.join(parts[:i])}"
            entry = tree.get(path)
            if entry is None:
                tree.add_dir(path, mode=0o755)
            elif entry.type != "dir":
                break
