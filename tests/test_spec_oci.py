"""config.json / runtime.json for a spec entry, as LinuxKit's ConfigToOCI builds them: YAML >
image label > image config > LinuxKit's built-ins (docs/yaml.md and moby/config.go)."""

from __future__ import annotations

import json

import pytest

from mobykit.errors import ImageError, SpecError
from mobykit.spec import loads
from mobykit.spec.capabilities import ALL_CAPS
from mobykit.spec.oci import bundle_config


def entry_config(yaml_text: str, image_config: dict | None = None, **kw):
    """Load a one-file spec and return bundle_config for its first service (or onboot) entry."""
    spec = loads(yaml_text, "t.yml")
    entry = (spec.services or spec.onboot)[0]
    return bundle_config(entry, image_config or {}, spec=spec, **kw)


def image(cmd=None, entrypoint=None, env=None, workdir=None, label=None, user=None):
    cfg = {}
    if cmd is not None:
        cfg["Cmd"] = cmd
    if entrypoint is not None:
        cfg["Entrypoint"] = entrypoint
    if env is not None:
        cfg["Env"] = env
    if workdir is not None:
        cfg["WorkingDir"] = workdir
    if user is not None:
        cfg["User"] = user
    if label is not None:
        cfg["Labels"] = {"org.mobyproject.config": label if isinstance(label, str) else json.dumps(label)}
    return {"architecture": "amd64", "os": "linux", "config": cfg}


SVC = "services:\n  - name: web\n    image: nginx\n"


def mounts_by_dest(config):
    return {m["destination"]: m for m in config["mounts"]}


# ---- defaults ------------------------------------------------------------------------------------


def test_defaults_without_any_setting():
    config, runtime = entry_config(SVC, image(cmd=["nginx", "-g", "daemon off;"], env=["PATH=/usr/bin"]))
    p = config["process"]
    assert p["args"] == ["nginx", "-g", "daemon off;"]
    assert p["env"] == ["PATH=/usr/bin"]
    assert p["cwd"] == "/"
    assert p["user"] == {"uid": 0, "gid": 0}
    assert p["capabilities"] == {}  # LinuxKit grants nothing unless asked
    assert "noNewPrivileges" not in p and "oomScoreAdj" not in p and "rlimits" not in p
    assert config["root"] == {"path": "rootfs"}  # writable (through the overlay)
    # Host net/ipc/uts, new pid, always a new mount namespace; no user namespace.
    assert config["linux"]["namespaces"] == [{"type": "pid"}, {"type": "mount"}]
    assert "maskedPaths" not in config["linux"] and "readonlyPaths" not in config["linux"]
    assert [m["destination"] for m in config["mounts"]] == ["/dev", "/proc", "/sys", "/dev/pts", "/sys/fs/cgroup"]
    m = mounts_by_dest(config)
    assert m["/proc"] == {"destination": "/proc", "type": "proc", "source": "proc",
                          "options": ["nosuid", "nodev", "noexec", "relatime"]}
    assert m["/dev"]["type"] == "tmpfs" and "ro" not in m["/dev"]["options"]
    assert m["/sys/fs/cgroup"]["options"][-1] == "ro"
    assert m["/dev/pts"]["options"] == ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]
    assert config["ociVersion"].startswith("1.")
    json.dumps(config), json.dumps(runtime)


def test_entrypoint_then_cmd_and_workdir_from_image():
    config, _ = entry_config(SVC, image(entrypoint=["/init"], cmd=["--flag"], workdir="/srv"))
    assert config["process"]["args"] == ["/init", "--flag"]
    assert config["process"]["cwd"] == "/srv"


def test_image_user_is_ignored_as_in_linuxkit():
    config, _ = entry_config(SVC, image(cmd=["x"], user="nobody"))
    assert config["process"]["user"] == {"uid": 0, "gid": 0}


# ---- precedence: YAML > label > image > default -------------------------------------------------


def test_label_beats_image_and_yaml_beats_label():
    img = image(cmd=["from-image"], env=["A=image"], workdir="/image",
                label={"command": ["from-label"], "env": ["A=label"], "cwd": "/label", "readonly": True})
    config, _ = entry_config(SVC, img)
    p = config["process"]
    assert (p["args"], p["env"], p["cwd"]) == (["from-label"], ["A=label"], "/label")
    assert config["root"]["readonly"] is True
    config, _ = entry_config(
        SVC + "    command: [from-yaml]\n    env: [A=yaml]\n    cwd: /yaml\n    readonly: false\n", img)
    p = config["process"]
    assert (p["args"], p["env"], p["cwd"]) == (["from-yaml"], ["A=yaml"], "/yaml")
    assert "readonly" not in config["root"]


def test_empty_list_in_yaml_clears_the_label_but_empty_string_does_not():
    img = image(label={"binds": ["/etc:/etc"], "cwd": "/label", "capabilities": ["CAP_SYS_ADMIN"]})
    config, _ = entry_config(SVC + "    binds: []\n    capabilities: []\n    cwd: ''\n", img)
    assert "/etc" not in mounts_by_dest(config)
    assert config["process"]["capabilities"] == {}
    assert config["process"]["cwd"] == "/label"  # strings: only a non-empty value overrides


def test_label_may_be_yaml_not_just_json():
    config, _ = entry_config(SVC, image(label="net: new\ncapabilities:\n  - CAP_NET_ADMIN\n"))
    assert {"type": "network"} in config["linux"]["namespaces"]
    assert config["process"]["capabilities"]["effective"] == ["CAP_NET_ADMIN"]


def test_bad_label_is_an_image_error_naming_the_image():
    with pytest.raises(ImageError) as info:
        entry_config(SVC, image(label={"capabilities": ["CAP_BOGUS"]}))
    assert str(info.value) == "nginx: org.mobyproject.config label: capabilities: unknown capability CAP_BOGUS"
    with pytest.raises(ImageError, match="name cannot be set in the label"):
        entry_config(SVC, image(label={"name": "x"}))
    with pytest.raises(ImageError, match=r"label: readonly: expected true or false, got a string"):
        entry_config(SVC, image(label={"readonly": "yes"}))
    with pytest.raises(ImageError, match=r"label: bogus: unknown field 'bogus'"):
        entry_config(SVC, image(label={"bogus": 1}))


# ---- capabilities ---------------------------------------------------------------------------------


def test_capabilities_all_and_none():
    config, _ = entry_config(SVC + "    capabilities: [all]\n")
    caps = config["process"]["capabilities"]
    assert caps["effective"] == list(ALL_CAPS) and caps["bounding"] == sorted(ALL_CAPS)
    assert "CAP_SYS_ADMIN" in caps["permitted"] and caps["inheritable"] == caps["bounding"]
    config, _ = entry_config(SVC + "    capabilities: [NONE]\n", image(label={"capabilities": ["CAP_CHOWN"]}))
    assert config["process"]["capabilities"] == {}


def test_capabilities_effective_keeps_order_others_sorted_and_ambient_joins_bounding():
    config, _ = entry_config(SVC + "    capabilities: [CAP_SETUID, CAP_CHOWN]\n    ambient: [CAP_NET_RAW]\n")
    caps = config["process"]["capabilities"]
    assert caps["effective"] == ["CAP_SETUID", "CAP_CHOWN"]
    assert caps["bounding"] == ["CAP_CHOWN", "CAP_NET_RAW", "CAP_SETUID"]
    assert caps["ambient"] == ["CAP_NET_RAW"]


def test_capabilities_add_extends_the_label_list():
    img = image(label={"capabilities": ["CAP_CHOWN"]})
    config, _ = entry_config(SVC + "    capabilities.add: [CAP_NET_ADMIN]\n", img)
    assert config["process"]["capabilities"]["effective"] == ["CAP_CHOWN", "CAP_NET_ADMIN"]
    # ... whereas plain capabilities replace it.
    config, _ = entry_config(SVC + "    capabilities: [CAP_NET_ADMIN]\n", img)
    assert config["process"]["capabilities"]["effective"] == ["CAP_NET_ADMIN"]


# ---- mounts -----------------------------------------------------------------------------------------


def test_binds_tmpfs_and_mounts():
    config, _ = entry_config(SVC + (
        "    binds:\n      - /var/log:/var/log\n      - /etc/ssl:/etc/ssl:ro\n"
        "    tmpfs:\n      - /run:size=1m,mode=0755\n      - /scratch\n"
        "    mounts:\n      - type: cgroup\n        options: [rw, nosuid]\n"
        "      - source: proc\n        destination: /host/proc\n"))
    m = mounts_by_dest(config)
    assert m["/var/log"] == {"destination": "/var/log", "type": "bind", "source": "/var/log",
                             "options": ["rw", "rbind", "rshared"]}
    assert m["/etc/ssl"]["options"] == ["ro", "rbind"]
    assert m["/run"] == {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m", "mode=0755"]}
    assert m["/scratch"] == {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs"}
    # A mount at a default mount point replaces the default (cgroup -> /sys/fs/cgroup, now rw).
    assert m["/sys/fs/cgroup"]["options"] == ["rw", "nosuid"]
    assert m["/host/proc"]["type"] == "proc"
    depths = [d.count("/") for d in (x["destination"] for x in config["mounts"])]
    assert depths == sorted(depths)  # parents before children


def test_binds_add_appends_to_label_binds():
    img = image(label={"binds": ["/etc:/etc"]})
    config, _ = entry_config(SVC + "    binds.add: [/var:/var]\n", img)
    assert {"/etc", "/var"} <= set(mounts_by_dest(config))
    config, _ = entry_config(SVC + "    binds: [/var:/var]\n", img)
    assert "/etc" not in mounts_by_dest(config)


def test_readonly_makes_dev_and_sys_readonly_too():
    config, _ = entry_config(SVC + "    readonly: true\n")
    m = mounts_by_dest(config)
    assert config["root"] == {"path": "rootfs", "readonly": True}
    assert m["/dev"]["options"][-1] == "ro" and m["/sys"]["options"][-1] == "ro"
    assert "ro" not in m["/proc"]["options"]


# ---- namespaces -------------------------------------------------------------------------------------


@pytest.mark.parametrize("yaml_text,expected", [
    ("    net: new\n", [{"type": "network"}, {"type": "pid"}, {"type": "mount"}]),
    ("    net: none\n", [{"type": "network"}, {"type": "pid"}, {"type": "mount"}]),
    ("    net: /run/netns/wg\n", [{"type": "network", "path": "/run/netns/wg"}, {"type": "pid"}, {"type": "mount"}]),
    ("    pid: host\n", [{"type": "mount"}]),
    ("    ipc: new\n    uts: new\n", [{"type": "ipc"}, {"type": "uts"}, {"type": "pid"}, {"type": "mount"}]),
    ("    userns: new\n", [{"type": "pid"}, {"type": "user"}, {"type": "mount"}]),
])
def test_namespaces(yaml_text, expected):
    config, _ = entry_config(SVC + yaml_text)
    assert config["linux"]["namespaces"] == expected


# ---- users --------------------------------------------------------------------------------------------

PASSWD = "root:x:0:0:root:/root:/bin/sh\nnginx:x:101:101:nginx:/var/cache/nginx:/sbin/nologin\n"
GROUP = "root:x:0:\nnginx:x:101:\nwww-data:x:82:\n"


def test_uid_gid_numbers_names_of_containers_and_image_users():
    spec_text = ("onboot:\n  - name: first\n    image: alpine\n"
                 "services:\n  - name: web\n    image: nginx\n    uid: nginx\n    gid: first\n"
                 "    additionalGids: [www-data, 7, web]\n")
    spec = loads(spec_text, "t.yml")
    config, _ = bundle_config(spec.services[0], {}, passwd=PASSWD, group=GROUP, spec=spec)
    # 'first' is a container (id 100), 'web' too (101); 'nginx' and 'www-data' come from the image.
    assert config["process"]["user"] == {"uid": 101, "gid": 100, "additionalGids": [82, 7, 101]}


def test_container_names_win_over_image_users_as_in_linuxkit():
    spec = loads("services:\n  - name: nginx\n    image: nginx\n    uid: nginx\n", "t.yml")
    config, _ = bundle_config(spec.services[0], {}, passwd=PASSWD, spec=spec)
    assert config["process"]["user"]["uid"] == 100


def test_unknown_user_names_the_spec_line():
    with pytest.raises(SpecError) as info:
        entry_config(SVC + "    uid: daemon\n", passwd=PASSWD)
    assert str(info.value) == ("t.yml:4: services[0].uid: cannot find id 'daemon': not a container name in this spec "
                               "nor in the image's /etc/passwd")


def test_root_and_empty_are_zero():
    config, _ = entry_config(SVC + "    uid: root\n    gid: ''\n")
    assert config["process"]["user"] == {"uid": 0, "gid": 0}


# ---- the other fields --------------------------------------------------------------------------------


def test_remaining_fields_reach_config_json():
    config, _ = entry_config(SVC + (
        "    hostname: web1\n    noNewPrivileges: true\n    oomScoreAdj: -500\n"
        "    rootfsPropagation: shared\n    cgroupsPath: /web\n"
        "    sysctl:\n      net.ipv4.ip_forward: '1'\n"
        "    rlimits: ['nofile,1024,unlimited', 'RLIMIT_CORE, 0, 0']\n"
        "    maskedPaths: [/proc/kcore]\n    readonlyPaths: [/proc/sys]\n"
        "    annotations:\n      org.example/role: web\n"
        "    resources:\n      memory:\n        limit: 1048576\n      pids:\n        limit: 64\n"
        "    uidMappings:\n      - {containerID: 0, hostID: 1000, size: 1}\n"))
    p, linux = config["process"], config["linux"]
    assert config["hostname"] == "web1"
    assert p["noNewPrivileges"] is True and p["oomScoreAdj"] == -500
    assert p["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 2**64 - 1, "soft": 1024},
                            {"type": "RLIMIT_CORE", "hard": 0, "soft": 0}]
    assert linux["rootfsPropagation"] == "shared" and linux["cgroupsPath"] == "/web"
    assert linux["sysctl"] == {"net.ipv4.ip_forward": "1"}
    assert linux["maskedPaths"] == ["/proc/kcore"] and linux["readonlyPaths"] == ["/proc/sys"]
    assert config["annotations"] == {"org.example/role": "web"}
    assert linux["resources"] == {"memory": {"limit": 1048576}, "pids": {"limit": 64}}
    assert linux["uidMappings"] == [{"containerID": 0, "hostID": 1000, "size": 1}]


def test_devices_create_nodes_and_allow_them_in_the_cgroup():
    config, _ = entry_config(SVC + (
        "    devices:\n      - {path: /dev/console, type: c, major: 5, minor: 1, mode: '0666'}\n"
        "      - {path: all, type: b}\n"))
    linux = config["linux"]
    assert linux["devices"] == [{"path": "/dev/console", "type": "c", "major": 5, "minor": 1, "fileMode": 0o666}]
    assert linux["resources"]["devices"] == [
        {"allow": True, "type": "c", "major": 5, "minor": 1, "access": "rwm"},
        {"allow": True, "type": "b", "access": "rwm"},
    ]


# ---- runtime.json and the bundle layout ----------------------------------------------------------------


def test_runtime_json_defaults_and_overlay_layout_for_writable_entries():
    _, runtime = entry_config(SVC)
    assert runtime == {
        "cgroups": [], "mkdir": [], "interfaces": [], "namespace": "",
        "bindNS": {k: "" for k in ("cgroup", "ipc", "mnt", "net", "pid", "user", "uts")},
        "mounts": [
            {"destination": "/containers/services/web/tmp", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/containers/services/web/tmp", "options": ["remount", "private"]},
            {"destination": "/containers/services/web/rootfs", "type": "overlay", "source": "overlay",
             "options": ["lowerdir=/containers/services/web/lower", "upperdir=/containers/services/web/tmp/upper",
                         "workdir=/containers/services/web/tmp/work"]},
        ],
    }


def test_readonly_onboot_entry_binds_its_rootfs_onto_itself():
    _, runtime = entry_config("onboot:\n  - name: a\n    image: alpine\n  - name: b\n    image: alpine\n    readonly: true\n")
    # entry_config takes the first onboot entry (writable); check the second one directly.
    spec = loads("onboot:\n  - name: a\n    image: alpine\n  - name: b\n    image: alpine\n    readonly: true\n", "t.yml")
    _, runtime = bundle_config(spec.onboot[1], {}, spec=spec)
    assert runtime["mounts"] == [{"destination": "/containers/onboot/001-b/rootfs",
                                  "source": "/containers/onboot/001-b/rootfs", "options": ["bind"]}]


def test_runtime_fields_yaml_over_label():
    img = image(label={"runtime": {"mkdir": ["/var/lib/label"], "cgroups": ["label"],
                                   "bindNS": {"net": "/run/netns/label", "ipc": "/run/ipc"}}})
    _, runtime = entry_config(SVC + (
        "    runtime:\n      mkdir: [/var/lib/web]\n      bindNS:\n        net: /run/netns/web\n"
        "      interfaces:\n        - {name: eth1}\n        - {add: veth, peer: veth-web, name: eth2}\n"
        "      mounts:\n        - {type: bind, source: /a, destination: /b, options: [bind]}\n"
        "      namespace: web\n"), img, prefix=None)
    assert runtime["mkdir"] == ["/var/lib/web"] and runtime["cgroups"] == ["label"]
    assert runtime["bindNS"]["net"] == "/run/netns/web" and runtime["bindNS"]["ipc"] == "/run/ipc"
    assert runtime["interfaces"] == [{"name": "eth1", "createInRoot": False},
                                     {"name": "eth2", "add": "veth", "peer": "veth-web", "createInRoot": False}]
    assert runtime["namespace"] == "web"
    # prefix=None still means "the entry's own prefix"; the user's mounts follow the rootfs ones.
    assert runtime["mounts"][-1] == {"destination": "/b", "type": "bind", "source": "/a", "options": ["bind"]}
    assert runtime["mounts"][0]["destination"] == "/containers/services/web/tmp"


def test_explicit_prefix_is_used():
    _, runtime = entry_config(SVC, prefix="/elsewhere/web")
    assert runtime["mounts"][2]["destination"] == "/elsewhere/web/rootfs"


def test_pure_and_deterministic():
    text = SVC + "    binds: [/b:/b, /a:/a]\n    tmpfs: [/t]\n"
    img = image(cmd=["x"], label={"binds.add": ["/c:/c"]})
    before = json.dumps(img, sort_keys=True)
    one = json.dumps(entry_config(text, img), sort_keys=True)
    two = json.dumps(entry_config(text, img), sort_keys=True)
    assert one == two
    assert json.dumps(img, sort_keys=True) == before  # the image config is not modified


def test_inner_image_config_is_accepted_too():
    config, _ = entry_config(SVC, {"Cmd": ["inner"]})
    assert config["process"]["args"] == ["inner"]
