"""The guest init, booted for real: Debian's cloud kernel under qemu TCG, an initrd assembled by
tests/harness/guestkit.py from busybox, crun and/or runc, the init package and hand-written OCI
bundles.

Each scenario boots once (module-scoped fixture), lives through its whole life - boot, readiness,
an HTTP request from the host, the ACPI power button, onshutdown, qemu exiting - and the tests
below then check one promise each against what the console showed. crun is the init's default
runtime and runs every scenario; the "good" image holds both runtimes and boots a second time
with mobykit.runtime=runc, so every promise of the good path is checked against runc too."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest

from harness import guestkit as gk
from mobykit.run.cidata import make_iso

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

IMAGE_ID = "sha256:" + "5e" * 32
BOOT_TIMEOUT = 150

# Values the sysctl package must leave in the guest (KSPP recommendations the kernel supports).
SYSCTLS = {
    "kernel/kptr_restrict": "2",
    "kernel/dmesg_restrict": "1",
    "kernel/unprivileged_bpf_disabled": "1",
    "net/core/bpf_jit_harden": "2",
    "kernel/yama/ptrace_scope": "2",
    "kernel/kexec_load_disabled": "1",
    "dev/tty/ldisc_autoload": "0",
    "fs/protected_symlinks": "1",
    "fs/protected_hardlinks": "1",
    "fs/protected_fifos": "2",
    "fs/protected_regular": "2",
    "fs/suid_dumpable": "0",
    "net/ipv4/conf/all/accept_redirects": "0",
    "net/ipv4/conf/all/send_redirects": "0",
    "net/ipv4/conf/all/rp_filter": "1",
    "net/ipv4/conf/default/accept_redirects": "0",
}

USERDATA_SCRIPT = """#!/bin/sh
echo "userdata: ran hostname=$(hostname) provider=$(cat /run/config/provider)"
echo "userdata: host mnt=$(readlink /proc/1/ns/mnt) pidns=$(readlink /proc/1/ns/pid)"
for k in SYSCTL_KEYS; do echo "sysctl: $k=$(cat /proc/sys/$k)"; done
if touch /rootfile 2>/dev/null; then echo "userdata: root=rw"; else echo "userdata: root=ro"; fi
[ -e /run/netns/rw ] && echo "userdata: bindns=present"
ip link show veth-h >/dev/null 2>&1 && echo "userdata: veth-h=in-root"
""".replace("SYSCTL_KEYS", " ".join(SYSCTLS))


def _overlay_mounts(b: str) -> list[dict]:
    """runtime.json mounts for a writable bundle, in the shape mobykit.spec.oci (and LinuxKit)
    writes them: a tmpfs for the upper layer, made private, and the overlay on rootfs."""
    return [
        {"destination": f"{b}/tmp", "type": "tmpfs", "source": "tmpfs"},
        {"destination": f"{b}/tmp", "options": ["remount", "private"]},
        {"destination": f"{b}/rootfs", "type": "overlay", "source": "overlay",
         "options": [f"lowerdir={b}/lower", f"upperdir={b}/tmp/upper", f"workdir={b}/tmp/work"]},
    ]


@dataclass
class Run:
    runtime: str
    console: str
    http_body: bytes | None
    exit_code: int
    ready_at: int  # offset of the readiness line in the console text
    shutdown_at: int


def _get_with_retries(url: str, attempts: int = 40) -> bytes:
    """The page, retried while the connection is refused or reset: "ready" means every service
    was created, and the service's process may still be starting to listen (a client retries)."""
    for i in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return r.read()
        except (ConnectionError, urllib.error.URLError):
            if i == attempts - 1:
                raise
            time.sleep(0.25)
    raise AssertionError("unreachable")


def _boot_scenario(build, *, runtime: str = "crun", append: str = "", user_data: str | None = None, meta_data: str = "",
                   http: bool = False, ready: str = r"^mobykit: (not )?ready .*$",
                   metadata: gk.FakeMetadata | None = None, press_power: bool = True,
                   smbios: str | None = None) -> Run:
    parts = gk.parts()
    with gk.workdir() as w:
        img = gk.GuestImage(w, parts)
        build(img)
        initrd = img.write_initrd(w / "initrd.gz")
        iso = make_iso(w / "cidata.iso", user_data, meta_data) if user_data is not None else None
        with gk.boot(parts.kernel, initrd, w, append=append, cdrom=iso, http=http,
                     metadata=metadata.port if metadata else None, smbios=smbios) as g:
            m = g.wait_for(ready, BOOT_TIMEOUT)
            body = None
            if http:
                body = _get_with_retries(f"http://127.0.0.1:{g.http_port}/")
            if press_power:
                g.powerdown()
            code = g.wait_exit(90)
            text = g.text()
            shutdown = text.find("mobykit: shutdown (")
            return Run(runtime, text, body, code, m.start(), shutdown)


@pytest.fixture(scope="module", params=["crun", "runc"])
def good(request) -> Run:
    """Everything working: onboot probes, the sysctl package, a writable bundle with a veth pair
    and a bound netns, an httpd service, an onshutdown container and a user-data script. One
    image with both runtimes, booted with each; its last onboot bundle has a relative
    process.cwd, which crun accepts and runc refuses ("Cwd must be an absolute path")."""
    runtime = request.param

    def build(img: gk.GuestImage) -> None:
        img.add_system(image_id=IMAGE_ID, runtimes=("crun", "runc"))
        img.add_bundle("onboot", "000-probe", gk.oci_config(["/bin/sh", "-c", (
            'echo "probe: capeff=$(grep CapEff /proc/self/status | cut -f2) pid=$$'
            ' mnt=$(readlink /proc/self/ns/mnt) pidns=$(readlink /proc/self/ns/pid)";'
            ' echo "probe: owner=$(stat -c %u:%g /owned)";'
            ' if touch /x 2>/dev/null; then echo probe: rootfs=rw; else echo probe: rootfs=ro; fi')],
            caps=["CAP_CHOWN", "CAP_NET_BIND_SERVICE"], hostname="probe"),
            runtime={"mounts": [{"destination": "/containers/onboot/000-probe/rootfs",
                                 "source": "/containers/onboot/000-probe/rootfs", "options": ["bind"]}]},
            files={"owned": "uid 1234 has no name in the init's /etc/passwd\n"})
        os.chown(img.root / "containers/onboot/000-probe/rootfs/owned", 1234, 4321)
        img.add_bundle("onboot", "001-sysctl", gk.oci_config(
            ["/usr/bin/mobykit-sysctl"], caps=["CAP_SYS_ADMIN", "CAP_SYS_PTRACE"], namespaces=("pid", "mount", "ipc", "uts"),
            rw_proc_sys=True), extra_roots=[gk.SYSCTL_ROOTFS])
        img.add_bundle("onboot", "002-rw", gk.oci_config(["/bin/sh", "-c", (
            'echo data > /written && echo "rw: wrote=$(cat /written) links=$(ls /sys/class/net | tr "\\n" " ")"')],
            readonly=False), runtime={"mounts": _overlay_mounts("/containers/onboot/002-rw"),
                                      "interfaces": [{"name": "veth-c", "peer": "veth-h"}],
                                      "bindNS": {"net": "/run/netns/rw"}, "mkdir": ["/var/lib/rwtest"]})
        img.add_bundle("services", "web", gk.oci_config(
            ["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/www"], caps=["CAP_NET_BIND_SERVICE"],
            namespaces=("pid", "mount", "ipc", "uts")), files={"www/index.html": "hello from mobykit\n"})
        img.add_bundle("onshutdown", "000-bye", gk.oci_config(["/bin/echo", "bye: onshutdown ran"]))
        relcwd = gk.oci_config(["/bin/echo", "relcwd: ran"])
        relcwd["process"]["cwd"] = "tmp"
        img.add_bundle("onboot", "003-relcwd", relcwd)

    append = "mobykit.runtime=runc" if runtime == "runc" else ""
    return _boot_scenario(build, runtime=runtime, append=append, user_data=USERDATA_SCRIPT, meta_data="instance-id: i-1\nlocal-hostname: guest-a\n",
                          http=True)


@pytest.fixture(scope="module")
def failing() -> Run:
    """Things going wrong: an onboot container exits 3, a service keeps crashing; user data in
    LinuxKit's JSON form; no image id in the image."""

    def build(img: gk.GuestImage) -> None:
        img.add_system(image_id=None)
        img.add_bundle("onboot", "000-fail", gk.oci_config(["/bin/sh", "-c", "echo fail: about to fail; exit 3"]))
        config = gk.oci_config(["/bin/sh", "-c", (
            'echo "config: key=$(cat /config/ssh/authorized_keys) perm=$(stat -c %a /config/ssh/authorized_keys)'
            ' host=$(cat /config/hostname) raw=$(head -c 1 /config/userdata)"')])
        config["mounts"].append({"destination": "/config", "type": "bind", "source": "/run/config", "options": ["rbind", "ro"]})
        img.add_bundle("onboot", "001-config", config, files={"config/.keep": ""})
        # writable, with no mounts in runtime.json: the init makes the overlay itself
        img.add_bundle("onboot", "002-plain-rw", gk.oci_config(["/bin/sh", "-c", (
            'echo x > /new && echo "plain-rw: ok root=$(grep " / " /proc/mounts | cut -d" " -f3)"')],
            readonly=False))
        # runtime.sh after_create (a veth pair) and a failing exit status must both reach the init
        img.add_bundle("onboot", "003-netfail", gk.oci_config(["/bin/sh", "-c", (
            'echo "netfail: links=$(ls /sys/class/net | tr "\\n" " ")"; exit 4')]),
            runtime={"interfaces": [{"name": "nf0", "peer": "nf0-h"}]})
        img.add_bundle("services", "crash", gk.oci_config(["/bin/sh", "-c", "echo crash: starting; exit 7"]))

    user_data = json.dumps({
        "ssh": {"entries": {"authorized_keys": {"content": "ssh-ed25519 AAAAtestkey user@host\n", "perm": "0600"}}},
        "hostname": {"content": "json-host"},
    })
    return _boot_scenario(build, user_data=user_data, ready=r"^mobykit: (not )?ready .*$\n(.|\n)*restart in 2s")


CLOUD_USERDATA = """#!/bin/sh
echo "userdata: on stdout"
{
echo "userdata: ran hostname=$(hostname) provider=$(cat /run/config/provider)"
echo "userdata: key=$(cat /run/config/ssh/authorized_keys) perm=$(stat -c %a /run/config/ssh/authorized_keys)"
echo "userdata: quiet.log=$(cat /var/log/quiet.log)"
} > /dev/console
"""
SSH_KEY = "ssh-ed25519 AAAAcloudkey core@example"


def _cloud(kind: str, append: str = "", refused_service: bool = False) -> tuple[Run, list]:
    server = gk.FakeMetadata(kind, user_data=CLOUD_USERDATA, hostname=f"{kind}-vm-1.internal", ssh_key=SSH_KEY)
    try:
        def build(img: gk.GuestImage) -> None:
            img.add_system(image_id=IMAGE_ID)
            img.add_bundle("onboot", "000-quiet", gk.oci_config(["/bin/echo", "quiet: only in the log"]))
            if refused_service:  # a hostname without a UTS namespace: every runtime refuses it
                img.add_bundle("services", "nouts", gk.oci_config(
                    ["/bin/echo", "nouts: started"], namespaces=("pid", "mount"), hostname="x") | {"hostname": "nouts"})

        # the cloud's DMI strings, as its VMs have them (the init asks a metadata server only there)
        smbios = {"aws": "type=1,manufacturer=Amazon EC2", "gcp": "type=1,product=Google Compute Engine"}[kind]
        return _boot_scenario(build, append=append, metadata=server, smbios=smbios), server.requests
    finally:
        server.close()


@pytest.fixture(scope="module")
def aws() -> tuple[Run, list]:
    """No cidata; an AWS-style metadata server (IMDSv2 only); container output off the console."""
    return _cloud("aws", append="mobykit.console=0")


@pytest.fixture(scope="module")
def gcp() -> tuple[Run, list]:
    """No cidata; a GCP-style metadata server; only the gcp provider asked for; a service the
    runtime refuses to create."""
    return _cloud("gcp", append="mobykit.metadata=gcp", refused_service=True)


@pytest.fixture(scope="module")
def rebooting() -> Run:
    """A user-data script that asks for a reboot (busybox reboot: SIGTERM to PID 1) in the middle
    of boot; no hostname anywhere, so the init names the machine after eth0's MAC."""

    def build(img: gk.GuestImage) -> None:
        img.add_system(image_id=IMAGE_ID)
        img.add_bundle("services", "never", gk.oci_config(["/bin/echo", "never: started"]))
        img.add_bundle("onshutdown", "000-bye", gk.oci_config(["/bin/echo", "bye: onshutdown ran"]))

    script = '#!/bin/sh\necho "userdata: hostname=$(hostname)"\nreboot\n'
    return _boot_scenario(build, user_data=script, meta_data="instance-id: i-2\n",
                          ready=r"^mobykit: shutdown \(reboot\)$", press_power=False)


# --- the good path -------------------------------------------------------------------------------

def test_readiness_line_names_the_image_once(good):
    lines = re.findall(r"^mobykit: (?:not )?ready.*$", good.console, re.M)
    if good.runtime == "crun":
        assert lines == [f"mobykit: ready {IMAGE_ID}"]
    else:  # runc refused the relative cwd: every other promise below still holds
        assert lines == [f"mobykit: not ready {IMAGE_ID} (onboot relcwd failed)"]


def test_a_bundle_one_runtime_refuses_is_reported_with_its_own_message(good):
    if good.runtime == "crun":
        assert re.search(r"^relcwd: ran$", good.console, re.M), good.console
    else:
        refused = good.console.find("Cwd must be an absolute path")
        failed = good.console.find("mobykit: onboot relcwd failed: exit 1")
        assert 0 <= refused < failed < good.ready_at, good.console
        assert "relcwd: ran" not in good.console


def test_onboot_output_precedes_readiness(good):
    for marker in ("probe: capeff=", "sysctl: applied", "rw: wrote=data", "userdata: ran"):
        at = good.console.find(marker)
        assert 0 <= at < good.ready_at, f"{marker!r} not on the console before the readiness line"


def test_onboot_container_has_exactly_the_capabilities_granted(good):
    # CAP_CHOWN (0) and CAP_NET_BIND_SERVICE (10): 0x401, nothing else
    assert re.search(r"^probe: capeff=0000000000000401 ", good.console, re.M), good.console


def test_onboot_container_has_its_own_pid_and_mount_namespaces(good):
    probe = re.search(r"^probe: .* pid=(\d+) mnt=(\S+) pidns=(\S+)$", good.console, re.M)
    host = re.search(r"^userdata: host mnt=(\S+) pidns=(\S+)$", good.console, re.M)
    assert probe and host, good.console
    assert probe.group(1) == "1"
    assert probe.group(2) != host.group(1)
    assert probe.group(3) != host.group(2)


def test_file_owners_survive_the_move_off_the_initramfs(good):
    assert "probe: owner=1234:4321" in good.console


def test_root_filesystems_are_read_only(good):
    assert "probe: rootfs=ro" in good.console
    assert "userdata: root=ro" in good.console


def test_writable_bundle_gets_an_overlay_and_runtime_extras(good):
    rw = re.search(r"^rw: wrote=data links=(.*)$", good.console, re.M)
    assert rw, good.console
    assert "veth-c" in rw.group(1).split()
    assert "eth0" not in rw.group(1).split()  # its own network namespace
    assert "userdata: bindns=present" in good.console
    assert "userdata: veth-h=in-root" in good.console


def test_sysctl_package_hardens_the_kernel(good):
    seen = dict(re.findall(r"^sysctl: (\S+)=(\S*)$", good.console, re.M))
    assert seen == SYSCTLS
    assert not re.search(r"^sysctl: cannot set", good.console, re.M)


def test_user_data_script_runs_with_cidata_hostname(good):
    assert re.search(r"^userdata: ran hostname=guest-a provider=cidata$", good.console, re.M), good.console


def test_service_answers_http_from_the_host(good):
    assert good.http_body == b"hello from mobykit\n"


def test_power_button_runs_onshutdown_and_powers_off(good):
    assert good.shutdown_at > good.ready_at
    bye = good.console.find("bye: onshutdown ran")
    assert bye > good.shutdown_at
    assert good.exit_code == 0


def test_no_service_failures_on_the_good_path(good):
    failures = re.findall(r"^mobykit: (?:onboot|service) .*$", good.console, re.M)
    assert failures == ([] if good.runtime == "crun" else ["mobykit: onboot relcwd failed: exit 1"])


# --- failures --------------------------------------------------------------------------------

def test_failed_onboot_is_named_with_its_status(failing):
    assert "mobykit: onboot fail failed: exit 3" in failing.console
    lines = re.findall(r"^mobykit: (?:not )?ready.*$", failing.console, re.M)
    assert lines == ["mobykit: not ready sha256:unknown (onboot fail failed)"]


def test_after_create_container_reports_its_exit_status(failing):
    assert re.search(r"^netfail: links=lo nf0 $", failing.console, re.M), failing.console
    assert "mobykit: onboot netfail failed: exit 4" in failing.console


def test_boot_carries_on_after_a_failed_onboot(failing):
    assert failing.console.find("fail: about to fail") < failing.console.find("config: key=")


def test_json_user_data_becomes_files(failing):
    m = re.search(r"^config: key=(.*) perm=(\d+) host=(\S+) raw=(.)$", failing.console, re.M)
    assert m, failing.console
    assert m.groups() == ("ssh-ed25519 AAAAtestkey user@host", "600", "json-host", "{")


def test_writable_bundle_without_runtime_mounts_gets_an_overlay(failing):
    assert "plain-rw: ok root=overlay" in failing.console, failing.console


def test_crashing_service_is_restarted_with_backoff(failing):
    before = failing.console[: failing.shutdown_at]
    exits = re.findall(r"^mobykit: service crash exited: exit 7 \(restart in (\d+)s\)$", before, re.M)
    assert exits[:2] == ["1", "2"]
    assert before.count("crash: starting") >= 2


def test_no_restarts_after_shutdown(failing):
    after = failing.console[failing.shutdown_at:]
    assert "service crash exited" not in after
    assert failing.exit_code == 0


# --- cloud metadata servers ------------------------------------------------------------------

def test_aws_user_data_uses_imdsv2(aws):
    run, requests = aws
    assert "userdata: ran hostname=aws-vm-1 provider=aws" in run.console, run.console
    assert f"userdata: key={SSH_KEY} perm=600" in run.console
    token_puts = [r for r in requests if r[0] == "PUT" and r[1] == "/latest/api/token"]
    assert token_puts, requests
    gets = [r for r in requests if r[0] == "GET" and r[1].startswith("/latest/")]
    assert gets and all(r[2].get("X-aws-ec2-metadata-token") for r in gets)


def test_console_switch_keeps_container_output_in_logs_only(aws):
    run, _ = aws
    assert "userdata: quiet.log=quiet: only in the log" in run.console
    assert "\nquiet: only in the log" not in run.console
    assert "userdata: on stdout" not in run.console
    assert f"mobykit: ready {IMAGE_ID}" in run.console  # init's own lines stay


def test_gcp_user_data_and_keys(gcp):
    run, requests = gcp
    assert "userdata: ran hostname=gcp-vm-1 provider=gcp" in run.console, run.console
    assert f"userdata: key={SSH_KEY} perm=600" in run.console
    assert requests and all(r[2].get("Metadata-Flavor") == "Google" for r in requests)
    assert not any(r[1].startswith("/latest/") for r in requests)  # mobykit.metadata=gcp: AWS not asked


def test_a_service_the_runtime_refuses_makes_the_boot_not_ready(gcp):
    run, _ = gcp
    lines = re.findall(r"^mobykit: (?:not )?ready.*$", run.console, re.M)
    assert lines == [f"mobykit: not ready {IMAGE_ID} (service nouts failed)"], run.console
    refused = run.console.find("hostname requires the UTS namespace")  # crun's own words
    assert 0 <= refused < run.ready_at, run.console
    assert "nouts: started" not in run.console


# --- reboot during boot ----------------------------------------------------------------------

def test_hostname_defaults_to_the_mac(rebooting):
    # qemu's first NIC is 52:54:00:12:34:56
    assert "userdata: hostname=mobykit-525400123456" in rebooting.console, rebooting.console


def test_reboot_request_runs_onshutdown_and_stops_the_boot(rebooting):
    assert rebooting.console.find("bye: onshutdown ran") > rebooting.shutdown_at >= 0
    assert "mobykit: ready" not in rebooting.console  # services never started, never claimed ready
    assert "never: started" not in rebooting.console
    assert rebooting.exit_code == 0  # reboot -f under -no-reboot ends qemu
