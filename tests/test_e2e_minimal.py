"""specs/images/minimal.yml, built from the repo's recipes and booted under qemu TCG: what a user
of the example image sees on the console and from the host. Two boots: the example (merged with
a spec that adds an isolation probe) and one with a failing onboot container and a crashing
service."""

from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path

import pytest

from harness.guestkit import boot, workdir
from mobykit.image.build import build
from mobykit.image.cache import Cache
from mobykit.run.cidata import make_iso

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = ROOT / "specs" / "images" / "minimal.yml"

# Merged over minimal.yml: an onboot container granted exactly CAP_NET_ADMIN that reports its
# own pid, namespaces and capabilities (the user-data script reports PID 1's, to compare).
ISOLATION = """\
onboot:
  - name: probe
    image: "@pkg:../pkgs/init"
    capabilities: [CAP_NET_ADMIN]
    command: ["/bin/sh", "-c", "echo probe pid=$$ mnt=$(readlink /proc/self/ns/mnt) pidns=$(readlink /proc/self/ns/pid); grep CapEff /proc/self/status | sed 's/^/probe /'"]
"""

USER_DATA = """#!/bin/sh
echo "userdata ran"
echo "host mnt=$(readlink /proc/1/ns/mnt) pidns=$(readlink /proc/1/ns/pid)"
for k in kernel/kptr_restrict kernel/dmesg_restrict kernel/unprivileged_bpf_disabled kernel/yama/ptrace_scope \
         net/ipv4/conf/all/accept_redirects net/ipv4/conf/all/rp_filter fs/protected_symlinks fs/protected_fifos; do
  echo "sysctl $k=$(cat /proc/sys/$k)"
done
echo "cmdline $(cat /proc/cmdline)"
if touch /rootfs-write-test 2>/dev/null; then echo "rootfs writable"; else echo "rootfs read-only"; fi
"""

FAILING = """\
onboot:
  - name: broken
    image: "@pkg:../pkgs/init"
    command: ["/bin/sh", "-c", "echo about to fail; exit 3"]
services:
  - name: crasher
    image: "@pkg:../pkgs/init"
    command: ["/bin/sh", "-c", "echo crasher up; exit 7"]
"""


def _fetch(url: str, within: float) -> str:
    deadline = time.monotonic() + within
    while True:
        try:
            return urllib.request.urlopen(url, timeout=10).read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Cache:
    os.environ.setdefault("MOBYKIT_DEB_CACHE", str(ROOT / ".cache" / "debs"))
    return Cache(tmp_path_factory.mktemp("cache"))


def _spec(tmp: Path, name: str, text: str) -> Path:
    # Extra spec files live beside minimal.yml's directory level so their @pkg: paths resolve.
    path = tmp / name
    path.write_text(text.replace("@pkg:../pkgs/", f"@pkg:{ROOT}/specs/pkgs/"))
    return path


def test_minimal_boots_serves_and_shuts_down(cache, tmp_path):
    extra = _spec(tmp_path, "isolation.yml", ISOLATION)
    result = build([MINIMAL, extra], outdir=tmp_path / "out", name="minimal", cache=cache)
    with workdir() as wd:
        iso = make_iso(wd / "cidata.iso", USER_DATA)
        with boot(result.path("-kernel"), result.path("-initrd.img"), wd, cdrom=iso,
                  append=result.path("-cmdline").read_text()) as guest:
            guest.wait_for(r"mobykit: (not )?ready", 240)
            console = guest.text()
            assert f"mobykit: ready {result.image_id}" in console, console[-4000:]
            assert "hello from onboot" in console
            assert "userdata ran" in console
            # Isolation: own pid and mount namespaces, exactly the capability granted.
            probe = re.search(r"probe pid=(\d+) mnt=(\S+) pidns=(\S+)", console)
            host = re.search(r"host mnt=(\S+) pidns=(\S+)", console)
            assert probe and host, console[-4000:]
            assert probe.group(1) == "1"
            assert probe.group(2) != host.group(1) and probe.group(3) != host.group(2)
            caps = re.search(r"probe CapEff:\s*([0-9a-f]+)", console)
            assert caps and int(caps.group(1), 16) == 1 << 12, caps  # CAP_NET_ADMIN is bit 12
            # Hardened settings, read back inside the guest.
            sysctl = dict(re.findall(r"sysctl (\S+)=(\S+)", console))
            assert sysctl["kernel/kptr_restrict"] == "2" and sysctl["kernel/dmesg_restrict"] == "1"
            assert sysctl["kernel/unprivileged_bpf_disabled"] in ("1", "2")
            assert sysctl["net/ipv4/conf/all/accept_redirects"] == "0" and sysctl["fs/protected_symlinks"] == "1"
            assert "slab_nomerge" in re.search(r"cmdline (.*)", console).group(1)
            assert "rootfs read-only" in console
            # The demo service answers on its forwarded port, from the host ("ready" means every
            # service was started, not that it listens yet: give httpd a moment).
            page = _fetch(f"http://127.0.0.1:{guest.http_port}/", 60)
            assert f"image {result.image_id}" in page
            guest.powerdown()
            guest.wait_for(r"goodbye from onshutdown", 120)
            assert guest.wait_exit(60) == 0


def test_failing_onboot_and_crashing_service_are_reported(cache, tmp_path):
    extra = _spec(tmp_path, "failing.yml", FAILING)
    result = build([MINIMAL, extra], outdir=tmp_path / "out", name="failing", cache=cache)
    with workdir() as wd, boot(result.path("-kernel"), result.path("-initrd.img"), wd,
                               append=result.path("-cmdline").read_text() + " mobykit.metadata=none") as guest:
        guest.wait_for(r"mobykit: not ready", 240)
        guest.wait_for(r"mobykit: service crasher exited: exit 7 \(restart in", 60)
        console = guest.text()
        assert "mobykit: onboot broken failed: exit 3" in console
        assert f"mobykit: not ready {result.image_id} (onboot broken failed)" in console
        assert f"mobykit: ready {result.image_id}" not in console
