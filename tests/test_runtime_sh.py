"""runtime.json -> runtime.sh: the generated script passes every untrusted value to the tools as
exactly one argument, in LinuxKit's order, and refuses input it cannot express safely.

The script runs under the host's sh and busybox sh with mount/mkdir/ip/nsenter replaced by
recording shell functions (running the real mount here would change the host; the real tools are
exercised by tests/test_init_boot.py inside a VM).

The other shell helpers the build puts in the guest - the LinuxKit JSON user-data writer and the
sysctl applier - are tested here too, under busybox sh, on temp directories."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from mobykit.errors import SpecError
from mobykit.image.runtime_sh import AFTER_CREATE_MARKER, runtime_script

HOSTILE = "it's $(touch PWNED) `touch PWNED` ; rm -rf * \"x\" \\ \n$HOME"
# Shell functions stand in for the tools: they win over PATH and over busybox's built-in applets
# (Debian's busybox sh prefers its applets to PATH), so nothing real is ever mounted. Each call is
# recorded NUL-separated, one record per call; mkdir really creates only inside the temp dir
# (bindNS needs the target's directory to exist).
WRAPPER = """
_rec() { { printf '%s\\0' "$@"; printf '\\036'; } >> "$RECORD"; }
mount() { _rec mount "$@"; }
ip() { _rec ip "$@"; }
nsenter() { _rec nsenter "$@"; }
mkdir() { _rec mkdir "$@"; case "$3" in "$TMPROOT"/*) command mkdir "$@" ;; esac; }
. "$SCRIPT"
"""

SHELLS = [s for s in (["/bin/sh"], ["/bin/busybox", "sh"]) if Path(s[0]).exists()]


def _run(tmp: Path, shell: list[str], script: str, *args: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    sh = tmp / "runtime.sh"
    sh.write_text(script)
    wrapper = tmp / "wrapper.sh"
    wrapper.write_text(WRAPPER)
    record = tmp / "record"
    record.write_bytes(b"")
    env = {"PATH": "/usr/bin:/bin", "RECORD": str(record), "TMPROOT": str(tmp), "SCRIPT": str(sh),
           "HOME": "/nonexistent"}
    r = subprocess.run([*shell, str(wrapper), *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=30)
    calls = [rec.split("\0")[:-1] for rec in record.read_text().split("\036") if rec]
    return r, calls


@pytest.mark.parametrize("shell", SHELLS, ids=[s[-1] for s in SHELLS])
def test_prepare_passes_hostile_values_as_single_arguments(tmp_path, shell):
    runtime = {
        "mounts": [
            {"destination": "/var/" + HOSTILE, "type": "tmpfs", "source": "tmp" + HOSTILE.replace("\n", ""),
             "options": ["nodev", "size=" + HOSTILE.replace("\n", "")]},
            {"destination": "rel/" + HOSTILE, "type": "bind", "source": "/src", "options": ["rbind", "ro"]},
        ],
        "mkdir": ["/var/lib/" + HOSTILE],
        "cgroups": ["grp " + HOSTILE.replace("\n", "")],
    }
    script = runtime_script(runtime, "/containers/services/web")
    r, calls = _run(tmp_path, shell, script, "prepare")
    assert r.returncode == 0, r.stderr
    assert not list(tmp_path.rglob("PWNED")), "a value was executed by the shell"
    opt = "nodev,size=" + HOSTILE.replace("\n", "")
    assert calls == [
        ["mkdir", "-p", "--", "/var/" + HOSTILE],
        ["mount", "-t", "tmpfs", "-o", opt, "--", "tmp" + HOSTILE.replace("\n", ""), "/var/" + HOSTILE],
        # a relative destination is inside the bundle's rootfs; type "bind" is expressed by options
        ["mkdir", "-p", "--", "/containers/services/web/rootfs/rel/" + HOSTILE],
        ["mount", "-o", "rbind,ro", "--", "/src", "/containers/services/web/rootfs/rel/" + HOSTILE],
        ["mkdir", "-p", "--", "/var/lib/" + HOSTILE],
        ["mkdir", "-p", "--", "/sys/fs/cgroup/grp " + HOSTILE.replace("\n", "")],
    ]


def test_overlay_upper_and_work_dirs_are_made_before_the_mount(tmp_path):
    b = "/containers/onboot/001-rw"
    runtime = {"mounts": [
        {"destination": f"{b}/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=0755"]},
        {"destination": f"{b}/tmp", "options": ["remount", "private"]},
        {"destination": f"{b}/rootfs", "type": "overlay", "source": "overlay",
         "options": [f"lowerdir={b}/lower", f"upperdir={b}/tmp/upper", f"workdir={b}/tmp/work"]},
    ]}
    r, calls = _run(tmp_path, ["/bin/sh"], runtime_script(runtime, b), "prepare")
    assert r.returncode == 0, r.stderr
    assert [c[:2] + c[-1:] for c in calls] == [
        ["mkdir", "-p", f"{b}/tmp"],
        ["mount", "-t", f"{b}/tmp"],
        ["mkdir", "-p", f"{b}/tmp"],
        ["mount", "--make-private", f"{b}/tmp"],   # LinuxKit's {"options": ["remount", "private"]}
        ["mkdir", "-p", f"{b}/rootfs"],
        ["mkdir", "-p", f"{b}/tmp/upper"],
        ["mkdir", "-p", f"{b}/tmp/work"],
        ["mount", "-t", f"{b}/rootfs"],
    ]
    assert calls[-1][3:5] == ["-o", f"lowerdir={b}/lower,upperdir={b}/tmp/upper,workdir={b}/tmp/work"]


@pytest.mark.parametrize("shell", SHELLS, ids=[s[-1] for s in SHELLS])
def test_after_create_moves_links_and_binds_namespaces(tmp_path, shell):
    target = tmp_path / ("ns dir " + HOSTILE.replace("\n", "").replace("/", "_")) / "net"
    runtime = {
        "interfaces": [
            {"name": "eth1"},                                    # existing link: moved
            {"name": "wg0", "add": "wireguard"},                 # created inside the container's netns
            {"name": "dummy0", "add": "dummy", "createInRoot": True},  # created in root, then moved
        ],
        "bindNS": {"net": str(target), "uts": ""},
    }
    script = runtime_script(runtime, "/containers/services/net")
    assert AFTER_CREATE_MARKER in script.splitlines()
    r, calls = _run(tmp_path, shell, script, "after_create", "4242")
    assert r.returncode == 0, r.stderr
    assert not list(tmp_path.rglob("PWNED"))
    assert calls == [
        ["ip", "link", "set", "eth1", "netns", "4242"],
        ["nsenter", "-t", "4242", "-n", "ip", "link", "add", "wg0", "type", "wireguard"],
        ["ip", "link", "add", "dummy0", "type", "dummy"],
        ["ip", "link", "set", "dummy0", "netns", "4242"],
        ["mkdir", "-p", "--", str(target.parent)],
        ["mount", "-o", "bind", "--", "/proc/4242/ns/net", str(target)],
    ]
    assert target.is_file(), "the bind target must exist as a file before the bind mount"


def test_propagation_options_become_make_commands(tmp_path):
    runtime = {"mounts": [{"destination": "/mnt/x", "type": "bind", "source": "/src", "options": ["rbind", "rshared", "ro"]}]}
    r, calls = _run(tmp_path, ["/bin/sh"], runtime_script(runtime, "/containers/onboot/000-x"), "prepare")
    assert r.returncode == 0, r.stderr
    assert calls[1:] == [["mount", "-o", "rbind,ro", "--", "/src", "/mnt/x"], ["mount", "--make-rshared", "--", "/mnt/x"]]


def test_after_create_refuses_a_pid_that_is_not_a_number(tmp_path):
    script = runtime_script({"bindNS": {"net": "/run/netns/x"}}, "/containers/services/x")
    r, calls = _run(tmp_path, ["/bin/sh"], script, "after_create", "1; touch PWNED")
    assert r.returncode != 0
    assert calls == [] and not list(tmp_path.rglob("PWNED"))


def test_veth_pair_is_created_named_and_moved():
    script = runtime_script({"interfaces": [{"name": "veth-c", "peer": "veth-h"}]}, "/containers/services/x")
    lines = [ln.strip() for ln in script.split("after_create() {", 1)[1].splitlines()]
    assert "_veth 'veth-c' 'veth-h'" in lines
    assert "ip link set 'veth-c' netns \"$pid\"" in lines


def test_no_after_create_marker_without_interfaces_or_bindns():
    script = runtime_script({"mkdir": ["/var/lib/x"]}, "/containers/onboot/000-x")
    assert AFTER_CREATE_MARKER not in script
    assert runtime_script({}, "/containers/onboot/000-x").count("\t:") == 2  # both parts empty


def test_output_is_reproducible_and_valid_sh(tmp_path):
    runtime = {"mounts": [{"destination": "/a", "type": "tmpfs", "source": "tmpfs"}], "mkdir": ["/b"],
               "interfaces": [{"name": "eth0"}], "bindNS": {"uts": "/run/uts", "net": "/run/net"}}
    a = runtime_script(runtime, "/containers/services/x")
    assert a == runtime_script(dict(reversed(list(runtime.items()))), "/containers/services/x")
    (tmp_path / "r.sh").write_text(a)
    for shell in SHELLS:
        subprocess.run([*shell, "-n", str(tmp_path / "r.sh")], check=True)
    # bindNS order is fixed (sorted by namespace), whatever order the YAML had
    assert a.index("_bindns 'net'") < a.index("_bindns 'uts'")


@pytest.mark.parametrize("runtime,field", [
    ({"mounts": [{"destination": "../../etc", "type": "tmpfs"}]}, "runtime.mounts[0].destination"),
    ({"mounts": [{"type": "tmpfs"}]}, "runtime.mounts[0].destination"),
    ({"mounts": [{"destination": "/a", "options": ["size=1,mode=0777"]}]}, "runtime.mounts[0].options[0]"),
    ({"mounts": [{"destination": "/a", "source": "-oremount"}]}, "runtime.mounts[0].source"),
    ({"mounts": [{"destination": "/a", "options": ["upperdir=rel/up"]}]}, "runtime.mounts[0].options[0]"),
    ({"mounts": "tmpfs"}, "runtime.mounts"),
    ({"mkdir": ["/a\0b"]}, "runtime.mkdir[0]"),
    ({"mkdir": [3]}, "runtime.mkdir[0]"),
    ({"cgroups": [".."]}, "runtime.cgroups[0]"),
    ({"interfaces": [{"name": "averyveryverylongname"}]}, "runtime.interfaces[0].name"),
    ({"interfaces": [{"name": "eth/0"}]}, "runtime.interfaces[0].name"),
    ({"interfaces": [{"name": "-eth0"}]}, "runtime.interfaces[0].name"),
    ({"interfaces": [{"name": "v0", "add": "veth"}]}, "runtime.interfaces[0].peer"),
    ({"interfaces": [{"name": "v0", "add": "veth; reboot"}]}, "runtime.interfaces[0].add"),
    ({"interfaces": [{"name": "v0", "createInRoot": "yes"}]}, "runtime.interfaces[0].createInRoot"),
    ({"bindNS": {"time": "/run/t"}}, "runtime.bindNS"),
    ({"bindNS": {"net": "relative/path"}}, "runtime.bindNS.net"),
])
def test_bad_input_names_the_field(runtime, field):
    with pytest.raises(SpecError) as e:
        runtime_script(runtime, "/containers/onboot/000-x")
    assert field in str(e.value)


def test_bundle_path_must_be_absolute():
    with pytest.raises(SpecError, match="absolute"):
        runtime_script({}, "containers/onboot/000-x")


# --- the other build-to-guest shell helpers (run with busybox sh, as in the guest) ---------------

REPO = Path(__file__).resolve().parents[1]
USERDATA_JSON = REPO / "specs/pkgs/init/rootfs/usr/bin/mobykit-userdata-json"
SYSCTL = REPO / "specs/pkgs/sysctl/rootfs/usr/bin/mobykit-sysctl"
BUSYBOX = Path("/bin/busybox")
needs_busybox = pytest.mark.skipif(not BUSYBOX.exists(), reason="busybox-static is not installed")


def _userdata(tmp: Path, data: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BUSYBOX), "sh", str(USERDATA_JSON), str(tmp / "config")], input=data,
                          capture_output=True, text=True, timeout=30)


@needs_busybox
def test_linuxkit_json_user_data_becomes_files(tmp_path):
    data = json.dumps({
        "ssh": {"perm": "0700", "entries": {"authorized_keys": {"content": "ssh-ed25519 AAA k\u00e9y\n", "perm": "0600"}}},
        "hostname": {"content": "web-1"},
        "quoted": {"content": "a \"b\" \\ / \t$(x)", "unknown": {"nested": [1, True, None]}},
    })
    r = _userdata(tmp_path, data)
    assert r.returncode == 0, r.stderr
    cfg = tmp_path / "config"
    assert (cfg / "ssh/authorized_keys").read_text() == "ssh-ed25519 AAA k\u00e9y\n"
    assert (cfg / "ssh/authorized_keys").stat().st_mode & 0o777 == 0o600
    assert (cfg / "ssh").stat().st_mode & 0o777 == 0o700
    assert (cfg / "hostname").read_text() == "web-1"
    assert (cfg / "hostname").stat().st_mode & 0o777 == 0o644
    assert (cfg / "quoted").read_text() == "a \"b\" \\ / \t$(x)"


@needs_busybox
@pytest.mark.parametrize("data", [
    '{"ok": {"content": "x"}, "../escape": {"content": "y"}}',
    '{"ok": {"content": "x"}, "d": {"entries": {"..": {"content": "y"}}}}',
    '{"ok": {"content": "x"}, "a/b": {"content": "y"}}',
    '{"ok": {"content": "x"}, "bad": {"content": "y", "perm": "0644; touch PWNED"}}',
    '{"ok": {"content": "x"}, "trunc": {"content": "y"',
    '{"ok": {"content": "x"}, "nul": {"content": "a\\u0000b"}}',
])
def test_bad_json_user_data_writes_nothing(tmp_path, data):
    r = _userdata(tmp_path, data)
    assert r.returncode != 0
    assert "user data JSON" in r.stderr
    assert not (tmp_path / "config").exists()
    assert not list(tmp_path.rglob("PWNED")) and not (tmp_path / "escape").exists()


@needs_busybox
def test_sysctl_script_applies_skips_absent_and_fails_loudly(tmp_path):
    proc = tmp_path / "proc_sys"
    (proc / "kernel").mkdir(parents=True)
    (proc / "kernel/kptr_restrict").write_text("0\n")
    (proc / "net/ipv4/conf/all").mkdir(parents=True)
    (proc / "net/ipv4/conf/all/rp_filter").write_text("0\n")
    (proc / "net/ipv4/ping_group_range").write_text("1 0\n")
    (proc / "kernel/readonly").mkdir()  # a directory: writing to it fails like a refused sysctl
    conf = tmp_path / "sysctl.d"
    conf.mkdir()
    (conf / "10-a.conf").write_text("# comment\nkernel.kptr_restrict = 1\n; other comment\nkernel.absent=1\n")
    (conf / "20-b.conf").write_text("kernel.kptr_restrict=2  # later file wins\nnet.ipv4.conf.all.rp_filter= 1\n"
                                    "\t net.ipv4.ping_group_range =\t1 2000 \n")
    env = {"PATH": "/usr/bin:/bin", "PROC_SYS": str(proc)}
    r = subprocess.run([str(BUSYBOX), "sh", str(SYSCTL), str(conf)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (proc / "kernel/kptr_restrict").read_text() == "2\n"
    assert (proc / "net/ipv4/conf/all/rp_filter").read_text() == "1\n"
    assert (proc / "net/ipv4/ping_group_range").read_text() == "1 2000\n"  # inner blanks kept, ends trimmed
    assert "not in this kernel: kernel.absent" in r.stdout
    (conf / "30-c.conf").write_text("kernel.readonly = 1\n-kernel.readonly = 1\n")
    r = subprocess.run([str(BUSYBOX), "sh", str(SYSCTL), str(conf)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stdout.count("cannot set kernel.readonly") == 1  # the "-" line is lenient


def test_shipped_sysctl_settings_parse():
    """Every line of the shipped settings is a comment, blank, or key = value with a dotted key."""
    conf = REPO / "specs/pkgs/sysctl/rootfs/etc/sysctl.d/00-mobykit-hardening.conf"
    keys = []
    for line in conf.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, eq, value = line.partition("=")
        assert eq and re.fullmatch(r"[a-z0-9_]+(\.[a-z0-9_*]+)+", key.strip()) and value.strip(), line
        keys.append(key.strip())
    assert len(keys) == len(set(keys))
    assert {"kernel.kptr_restrict", "kernel.dmesg_restrict", "kernel.unprivileged_bpf_disabled",
            "net.core.bpf_jit_harden", "kernel.yama.ptrace_scope", "kernel.kexec_load_disabled",
            "dev.tty.ldisc_autoload", "fs.protected_symlinks", "fs.protected_regular"} <= set(keys)
