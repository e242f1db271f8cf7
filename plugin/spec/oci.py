"""One spec entry + its image config -> the bundle's ``config.json`` (OCI runtime spec) and
``runtime.json`` (LinuxKit's start-time extras), computed the way LinuxKit's ConfigToOCI does so
LinuxKit's own init runs our bundles unchanged. A pure function: no I/O.

Where each value comes from, first match wins:

1. the spec entry (YAML);
2. the image's ``org.mobyproject.config`` label (YAML/JSON, same fields as an entry, minus
   ``name`` and ``image``);
3. the image config, for the four things a Dockerfile sets: ``Entrypoint``+``Cmd`` (args),
   ``Env``, ``WorkingDir`` (``User`` is ignored, as LinuxKit ignores it: uid/gid default to 0);
4. LinuxKit's built-ins:
   - mounts /proc, /dev (tmpfs), /dev/pts, /sys, /sys/fs/cgroup (read-only) with Docker's options;
     /dev and /sys become read-only too when the entry is ``readonly``. LinuxKit deliberately
     mounts no /dev/shm or /dev/mqueue; add them with ``tmpfs``/``mounts`` if wanted;
   - host net, ipc and uts namespaces; a new pid namespace; no user namespace; always a new
     mount namespace;
   - no capabilities at all unless asked for (``capabilities: [all]`` for all of them);
   - no masked or read-only paths; root filesystem writable (through an overlay, see below).

"Present wins" for lists, maps, booleans and numbers (an empty list in the YAML clears the
label's list); "non-empty wins" for strings (``cwd``, ``net``, ``hostname`` ...), as in LinuxKit.
``capabilities.add`` and ``binds.add`` (label's, then the entry's) are appended to whichever
``capabilities`` / ``binds`` list won.

``uid``/``gid``/``additionalGids`` take numbers or names. A name is, as in LinuxKit, the id
allocated to the container of that name (see ``Spec.idmap``; ``root`` is 0); failing that we
also look the name up in the image's ``/etc/passwd`` / ``/etc/group`` (a Docker-like extension
LinuxKit does not have).

Bundle layout (LinuxKit's ImageBundle), under ``entry.prefix`` (``containers/onboot/000-name``):

- ``config.json``, ``runtime.json``;
- readonly entries: the image root filesystem in ``rootfs/``; runtime.json's mounts start with a
  bind of ``/<prefix>/rootfs`` onto itself (runc wants the root to be a mount point);
- other entries: the image root filesystem in ``lower/`` plus two empty directories ``tmp/`` and
  ``rootfs/`` (mode 0755); runtime.json's mounts start with a tmpfs on ``/<prefix>/tmp``, a
  private remount of it, and an overlay ``lowerdir=/<prefix>/lower, upperdir=/<prefix>/tmp/upper,
  workdir=/<prefix>/tmp/work`` on ``/<prefix>/rootfs``. The init creates upper/ and work/ inside
  the tmpfs before mounting the overlay (LinuxKit's init does the same).
"""

from __future__ import annotations

import copy
from typing import Any

from mobykit.errors import ImageError, SpecError
from mobykit.spec import capabilities
from mobykit.spec.validate import mount_defaults, parse_rlimit, schema_error
from mobykit.spec.yamlfile import field_name

LABEL = "org.mobyproject.config"
OCI_VERSION = "1.0.2"
_PROC_OPTS = ["nosuid", "nodev", "noexec", "relatime"]
_DEV_OPTS = ["nosuid", "strictatime", "mode=755", "size=65536k"]
_PTS_OPTS = ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]
_SYS_OPTS = ["nosuid", "noexec", "nodev"]
_CGROUP_OPTS = ["nosuid", "noexec", "nodev", "relatime", "ro"]
_BIND_NS = ("cgroup", "ipc", "mnt", "net", "pid", "user", "uts")


def image_label(entry, image_config: dict) -> dict[str, Any]:
    """The entry image's ``org.mobyproject.config`` label, parsed and checked (``{}`` if none).

    A bad label is the image's fault, so it is an ImageError naming the image."""
    from mobykit.spec.validate import Problems, check_image_config
    from mobykit.spec.yamlfile import Document, parse

    labels = (_inner(image_config).get("Labels") or {})
    text = labels.get(LABEL)
    if not text:
        return {}
    where = f"{LABEL} label"
    try:
        doc = parse(text, where)
    except SpecError as e:
        raise ImageError(f"{where}: {e.message}", image=entry.image) from None
    data = doc.data
    if not isinstance(data, dict):
        raise ImageError(f"{where} is not a mapping", image=entry.image)
    for key in ("name", "image"):
        if key in data:
            raise ImageError(f"{where}: {key} cannot be set in the label", image=entry.image)
    found = schema_error({**data, "name": "label", "image": "label"}, doc.lines, ref="image")
    if found:
        raise ImageError(f"{where}: {field_name(found[0]) or 'top level'}: {found[1]}", image=entry.image)
    try:
        p = Problems(Document(where, data, doc.lines))
        check_image_config(p, (), data)
        p.raise_first()
    except SpecError as e:
        raise ImageError(f"{where}: {e.field + ': ' if e.field else ''}{e.message}", image=entry.image) from None
    return data


def _inner(image_config: dict) -> dict:
    """Accept the whole OCI image config ({"config": {...}, "rootfs": ...}) or just its inner part."""
    inner = image_config.get("config") if isinstance(image_config.get("config"), dict) else image_config
    return inner or {}


class _Pick:
    """YAML > label lookups, with LinuxKit's two notions of "set"."""

    def __init__(self, yaml_cfg: dict, label: dict):
        self.y, self.l = yaml_cfg, label

    def present(self, key: str, default=None):
        if key in self.y:
            return copy.deepcopy(self.y[key])
        if key in self.l:
            return copy.deepcopy(self.l[key])
        return default

    def nonempty(self, key: str, default: str = "") -> str:
        return self.y.get(key) or self.l.get(key) or default

    def added(self, key: str) -> list:
        return [*self.l.get(key, []), *self.y.get(key, [])]


def _parse_passwd(text: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split(":")
        if len(parts) >= 3 and parts[0] and parts[2].isdigit() and parts[0] not in out:
            out[parts[0]] = int(parts[2])
    return out


def _default_mounts(readonly: bool) -> dict[str, dict]:
    ro = ["ro"] if readonly else []
    return {
        "/proc": {"destination": "/proc", "type": "proc", "source": "proc", "options": list(_PROC_OPTS)},
        "/dev": {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": [*_DEV_OPTS, *ro]},
        "/dev/pts": {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": list(_PTS_OPTS)},
        "/sys": {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": [*_SYS_OPTS, *ro]},
        "/sys/fs/cgroup": {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                           "options": list(_CGROUP_OPTS)},
    }


def _mount(dest: str, tp: str, src: str, options: list[str], extra: dict | None = None) -> dict:
    m = {"destination": dest, "type": tp, "source": src}
    if options:
        m["options"] = options
    for key in ("uidMappings", "gidMappings"):
        if extra and extra.get(key):
            m[key] = copy.deepcopy(extra[key])
    return m


def _depth(dest: str) -> int:
    import posixpath

    return posixpath.normpath(dest).count("/")


def _namespaces(pick: _Pick) -> list[dict]:
    """Namespaces in LinuxKit's order: network, ipc, uts, pid, user, then always a new mount one."""
    out = []

    def ns(kind: str, value: str, new_words: tuple[str, ...]) -> None:
        if value in ("host", "root"):
            return
        d = {"type": kind}
        if value not in new_words:
            d["path"] = value
        out.append(d)

    ns("network", pick.nonempty("net", "root"), ("none", "new", ""))
    ns("ipc", pick.nonempty("ipc", "root"), ("new", ""))
    ns("uts", pick.nonempty("uts", "root"), ("new", ""))
    ns("pid", pick.nonempty("pid", ""), ("new", ""))
    ns("user", pick.nonempty("userns", "root"), ("new", ""))
    out.append({"type": "mount"})
    return out


def _dedupe(items: list[str]) -> list[str]:
    seen: set[str] = set()
    return [c for c in items if not (c in seen or seen.add(c))]


def bundle_config(
    entry,
    image_config: dict,
    passwd: str | None = None,
    group: str | None = None,
    idmap: dict[str, int] | None = None,
    *,
    spec=None,
    prefix: str | None = None,
) -> tuple[dict, dict]:
    """(config.json, runtime.json) as dicts for ``entry``; see the module docstring.

    ``idmap`` (container name -> id) defaults to ``spec.idmap()`` when ``spec`` is given;
    ``prefix`` (the bundle directory in the image) defaults to ``entry.prefix`` and decides the
    rootfs mounts at the head of runtime.json. Raises SpecError for a bad field in the spec entry
    (file:line: field) and ImageError for a bad label in the image.
    """
    if idmap is None:
        idmap = spec.idmap() if spec is not None else {}
    if prefix is None:
        prefix = getattr(entry, "prefix", None)
    from mobykit.spec.volumes import rewrite

    yaml_cfg = rewrite(dict(entry.config), spec)  # volume names -> /containers/volumes/NAME/merged
    label = image_label(entry, image_config)
    pick = _Pick(yaml_cfg, label)
    inner = _inner(image_config)

    def fail(key: str, message: str) -> Exception:
        """Blame the entry line when the YAML set the key, the image label otherwise."""
        if key in yaml_cfg:
            file, line, fld = entry.where(key)
            return SpecError(message, file=file, line=line, field=fld)
        return ImageError(f"{LABEL} label: {key}: {message}", image=entry.image)

    image_cmd = [*(inner.get("Entrypoint") or []), *(inner.get("Cmd") or [])]
    args = pick.present("command", image_cmd)
    env = pick.present("env", inner.get("Env") or [])
    cwd = pick.nonempty("cwd", inner.get("WorkingDir") or "/")
    readonly = bool(pick.present("readonly", False))

    mounts = _default_mounts(readonly)
    for t in pick.present("tmpfs", []):
        dest, _, opts = t.partition(":")
        mounts[dest] = _mount(dest, "tmpfs", "tmpfs", opts.split(",") if opts else [])
    binds = [*pick.present("binds", []), *pick.added("binds.add")]
    for b in binds:
        parts = b.split(":")
        if not 2 <= len(parts) <= 3:
            raise fail("binds", f"cannot parse bind {b!r} (expected /source:/destination[:options])")
        opts = [*parts[2].split(","), "rbind"] if len(parts) == 3 else ["rw", "rbind", "rshared"]
        mounts[parts[1]] = _mount(parts[1], "bind", parts[0], opts)
    for m in pick.present("mounts", []):
        try:
            tp, src, dest = mount_defaults(m)
        except ValueError as e:
            raise fail("mounts", str(e)) from None
        mounts[dest] = _mount(dest, tp, src, list(m.get("options") or []), m)
    # LinuxKit sorts by path depth so /dev comes before /dev/pts; the name breaks ties so the
    # order (and the bytes of config.json) never depend on hashing.
    mount_list = [mounts[d] for d in sorted(mounts, key=lambda d: (_depth(d), d))]

    caps = capabilities.expand(pick.present("capabilities", []))
    caps = _dedupe([*caps, *capabilities.expand(pick.added("capabilities.add"))])
    ambient = capabilities.expand(pick.present("ambient", []))
    for bad, keys in ((capabilities.unknown(caps), ("capabilities", "capabilities.add")),
                      (capabilities.unknown(ambient), ("ambient",))):
        if bad:
            key = next((k for k in keys if bad[0] in yaml_cfg.get(k, [])), keys[0])
            raise fail(key, f"unknown capability {bad[0]}")
    bounding = sorted(set(caps) | set(ambient))
    cap_doc = {k: v for k, v in (("bounding", bounding), ("effective", caps), ("inheritable", bounding),
                                 ("permitted", bounding), ("ambient", ambient)) if v}

    rlimits = []
    for r in pick.present("rlimits", []):
        try:
            name, soft, hard = parse_rlimit(r)
        except ValueError as e:
            raise fail("rlimits", str(e)) from None
        rlimits.append({"type": name, "hard": hard, "soft": soft})

    users, groups = _parse_passwd(passwd), _parse_passwd(group)

    def numeric(key: str, value, table: dict[str, int], table_name: str) -> int:
        if value is None or value == "" or value == "root":
            return 0
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
        if value in idmap:
            return idmap[value]
        if value in table:
            return table[value]
        raise fail(key, f"cannot find id {value!r}: not a container name in this spec nor in the image's {table_name}")

    uid = numeric("uid", pick.present("uid"), users, "/etc/passwd")
    gid = numeric("gid", pick.present("gid"), groups, "/etc/group")
    extra_gids = [numeric("additionalGids", g, groups, "/etc/group") for g in pick.present("additionalGids", [])]

    user: dict[str, Any] = {"uid": uid, "gid": gid}
    if extra_gids:
        user["additionalGids"] = extra_gids
    process: dict[str, Any] = {"user": user}
    if args:
        process["args"] = args
    if env:
        process["env"] = env
    process["cwd"] = cwd
    process["capabilities"] = cap_doc
    if rlimits:
        process["rlimits"] = rlimits
    if pick.present("noNewPrivileges", False):
        process["noNewPrivileges"] = True
    oom = pick.present("oomScoreAdj")
    if oom is not None:
        process["oomScoreAdj"] = oom

    resources = pick.present("resources", {}) or {}
    devices = []
    for d in pick.present("devices", []):
        if d["path"] == "all":
            resources.setdefault("devices", []).append({"allow": True, "type": d["type"], "access": "rwm"})
            continue
        dev: dict[str, Any] = {"path": d["path"], "type": d["type"], "major": d.get("major", 0),
                               "minor": d.get("minor", 0)}
        if d.get("mode"):
            dev["fileMode"] = int(d["mode"], 8)
        devices.append(dev)
        resources.setdefault("devices", []).append(
            {"allow": True, "type": d["type"], "major": dev["major"], "minor": dev["minor"], "access": "rwm"})

    linux: dict[str, Any] = {}
    for key in ("uidMappings", "gidMappings"):
        if pick.present(key):
            linux[key] = pick.present(key)
    if pick.present("sysctl"):
        linux["sysctl"] = pick.present("sysctl")
    linux["resources"] = resources
    if pick.present("cgroupsPath"):
        linux["cgroupsPath"] = pick.present("cgroupsPath")
    linux["namespaces"] = _namespaces(pick)
    if devices:
        linux["devices"] = devices
    if pick.present("rootfsPropagation"):
        linux["rootfsPropagation"] = pick.present("rootfsPropagation")
    for key in ("maskedPaths", "readonlyPaths"):
        if pick.present(key):
            linux[key] = pick.present(key)

    config: dict[str, Any] = {"ociVersion": OCI_VERSION, "process": process, "root": {"path": "rootfs"}}
    if readonly:
        config["root"]["readonly"] = True
    hostname = pick.nonempty("hostname")
    if hostname:
        config["hostname"] = hostname
    config["mounts"] = mount_list
    if pick.present("annotations"):
        config["annotations"] = pick.present("annotations")
    config["linux"] = linux

    return config, _runtime(yaml_cfg.get("runtime") or {}, label.get("runtime") or {}, prefix, readonly)


def _runtime(y: dict, lab: dict, prefix: str | None, readonly: bool) -> dict:
    """runtime.json: each field YAML > label (LinuxKit's assignRuntime), rootfs mounts first."""

    def present(key: str, default):
        if key in y:
            return copy.deepcopy(y[key])
        if key in lab:
            return copy.deepcopy(lab[key])
        return default

    mounts = [_raw_mount(m) for m in present("mounts", [])]
    if prefix:
        prefix = prefix.strip("/")
        if readonly:
            rootfs = [{"destination": f"/{prefix}/rootfs", "source": f"/{prefix}/rootfs", "options": ["bind"]}]
        else:
            tmp = f"/{prefix}/tmp"
            rootfs = [
                {"destination": tmp, "type": "tmpfs", "source": "tmpfs"},
                {"destination": tmp, "options": ["remount", "private"]},
                {"destination": f"/{prefix}/rootfs", "type": "overlay", "source": "overlay",
                 "options": [f"lowerdir=/{prefix}/lower", f"upperdir={tmp}/upper", f"workdir={tmp}/work"]},
            ]
        mounts = rootfs + mounts
    ybind, lbind = y.get("bindNS") or {}, lab.get("bindNS") or {}
    interfaces = []
    for i in present("interfaces", []):
        d = {k: i[k] for k in ("name", "add", "peer") if i.get(k)}
        d["createInRoot"] = bool(i.get("createInRoot", False))
        interfaces.append(d)
    return {
        "cgroups": present("cgroups", []),
        "mounts": mounts,
        "mkdir": present("mkdir", []),
        "interfaces": interfaces,
        "bindNS": {k: ybind.get(k, lbind.get(k, "")) for k in _BIND_NS},
        "namespace": y.get("namespace") or lab.get("namespace") or "",
    }


def _raw_mount(m: dict) -> dict:
    """A runtime mount as Go's specs.Mount marshals it (empty fields omitted)."""
    out = {"destination": m.get("destination", "")}
    for key in ("type", "source"):
        if m.get(key):
            out[key] = m[key]
    if m.get("options"):
        out["options"] = list(m["options"])
    return out
