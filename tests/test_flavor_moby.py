"""The moby flavor: Prepare puts the built image into the instance, Healthy follows the console.

Prepare is tested with a stand-in builder that returns a BootImage the way
``mobykit.image.store.build_and_store`` does (the build itself is tested by the image tests);
Healthy runs against real providers: the memory provider (which prints our init's readiness line)
behind a real InstanceCore, libvirt's test:///default for Mode running, and real TCP/HTTP servers
on 127.0.0.1 for the port probes.
"""

from __future__ import annotations

import http.server
import socket
import sys
import threading
from pathlib import Path

import pytest
import yaml

from mobykit.core.instance import InstanceCore
from mobykit.errors import FailedPrecondition, ImageError, InvalidArgument
from mobykit.flavor.moby import IMAGE_TAG, MobyFlavor
from mobykit.providers.base import BootImage, MachineSpec
from mobykit.providers.memory import MemoryProvider
from mobykit.spec.load import SpecSource
from mobykit.spi.types import Allocation, Description, Health, Index, Spec

ALLOC = Allocation(size=1)
IMAGE_A = "sha256:" + "a1" * 32
IMAGE_B = "sha256:" + "b2" * 32


class StandInBuilder:
    """Returns a fixed BootImage per spec, and records the spec documents it was asked to build."""

    def __init__(self, image_id: str = IMAGE_A):
        self.image_id = image_id
        self.calls: list[list[SpecSource]] = []

    def __call__(self, sources: list[SpecSource], progress):
        self.calls.append(sources)
        return BootImage(id=self.image_id, name="t", kernel=Path("/k"), initrd=Path("/i"), cmdline="console=ttyS0")


@pytest.fixture
def spec_file(tmp_path):
    p = tmp_path / "web.yml"
    p.write_text("kernel:\n  image: linuxkit/kernel:6.6\ninit: []\n")
    return str(p)


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- Prepare -----------------------------------------------------------------------------------


def test_prepare_writes_image_id_into_properties_and_tag_and_appends_init(spec_file):
    build = StandInBuilder()
    f = MobyFlavor({}, build=build)
    spec = Spec(properties={"Memory": 256}, tags={"infrakit.group": "web"}, init="echo spec")
    props = {"Image": spec_file, "Init": ["echo a", "echo b"], "Tags": {"role": "web"}}
    out = f.prepare("moby", props, spec, ALLOC, Index("web", 1))
    assert [[(s.path, s.field) for s in call] for call in build.calls] == [[(Path(spec_file), "Properties.Image")]]
    assert out.properties == {"Memory": 256, "Image": IMAGE_A}
    assert out.tags == {"infrakit.group": "web", "role": "web", IMAGE_TAG: IMAGE_A}
    assert out.init == "echo spec\necho a\necho b"
    assert spec.properties == {"Memory": 256} and IMAGE_TAG not in spec.tags  # input untouched


def test_a_new_image_changes_the_instance_properties(spec_file):
    spec = Spec(properties={})
    first = MobyFlavor({}, build=StandInBuilder(IMAGE_A)).prepare("", {"Image": spec_file}, spec, ALLOC, Index())
    second = MobyFlavor({}, build=StandInBuilder(IMAGE_B)).prepare("", {"Image": spec_file}, spec, ALLOC, Index())
    assert first.properties["Image"] != second.properties["Image"]
    assert second.tags[IMAGE_TAG] == IMAGE_B


def test_inline_spec_is_handed_to_the_builder():
    build = StandInBuilder()
    inline = {"kernel": {"image": "linuxkit/kernel:6.6"}, "init": ["linuxkit/init:v1"]}
    out = MobyFlavor({}, build=build).prepare("", {"Image": inline}, Spec(), ALLOC, Index())
    [[source]] = build.calls
    assert source.path is None and yaml.safe_load(source.text) == inline
    assert out.properties == {"Image": IMAGE_A}


def test_a_failing_build_fails_prepare_with_its_error(spec_file):
    def broken(_sources, _progress):
        raise ImageError("layer is hostile", image="docker.io/x/y:1", path="../etc/passwd")

    with pytest.raises(ImageError, match="x/y:1"):
        MobyFlavor({}, build=broken).prepare("", {"Image": spec_file}, Spec(), ALLOC, Index())


@pytest.mark.parametrize(
    "props, needle",
    [
        ({}, "Properties.Image: required"),
        ({"Image": "/nonexistent/spec.yml"}, "/nonexistent/spec.yml: no such spec file"),
        ({"Image": 7}, "Properties.Image"),
        ("SPEC_FILE+Colour", "Colour"),
        ("SPEC_FILE+Health.Interval", "Properties.Health: unknown key.*Interval"),
        ("SPEC_FILE+Health.Mode=ping", "Properties.Health.Mode"),
        ("SPEC_FILE+Health.Mode=tcp", "Properties.Health.Port: required"),
        ("SPEC_FILE+Health.Deadline=soon", "Properties.Health.Deadline"),
        ("SPEC_FILE+Drain.Timeout", "Properties.Drain: unknown key.*Timeout"),
        ("SPEC_FILE+Init=str", "Properties.Init"),
    ],
)
def test_bad_properties_are_named(spec_file, props, needle):
    if isinstance(props, str):
        extra = props.split("+", 1)[1]
        props = {"Image": spec_file}
        if extra == "Colour":
            props["Colour"] = "blue"
        elif extra == "Init=str":
            props["Init"] = "echo hi"
        else:
            section, _, rest = extra.partition(".")
            key, _, value = rest.partition("=")
            props[section] = {key: value or 5}
    f = MobyFlavor({}, build=StandInBuilder())
    with pytest.raises(InvalidArgument, match=needle):
        f.validate("", props, ALLOC)
    with pytest.raises(InvalidArgument, match=needle):
        f.prepare("", props, Spec(), ALLOC, Index())


def test_go_style_durations_and_case_insensitive_keys_are_accepted(spec_file):
    f = MobyFlavor({}, build=StandInBuilder())
    f.validate("", {"image": spec_file, "health": {"mode": "console", "deadline": "1m30s"}}, ALLOC)
    f.validate("", {"Image": spec_file, "Drain": {"Grace": "500ms", "Command": ["true"]}}, ALLOC)


# --- Healthy through a real InstanceCore over the memory provider ------------------------------


@pytest.fixture
def memory_core():
    clock = Clock(0.0)
    mp = MemoryProvider({"boot_latency": 5.0, "clock": clock})
    core = InstanceCore({"default_provider": "memory"}, providers={"memory": mp})
    return core, mp, clock


def _provision(core, image=IMAGE_A) -> Description:
    # Straight to the provider: the core would first look the (fake) image up in the built-image store.
    iid = core.provider("memory").create(MachineSpec(properties={"Image": image}, tags={IMAGE_TAG: image})).id
    (desc,) = [d for d in core.describe_instances("memory", {}, True) if d.id == iid]
    return desc


def test_unknown_until_the_console_says_ready_then_healthy(memory_core, spec_file):
    core, mp, mclock = memory_core
    flavor = MobyFlavor({"default_provider": "memory"}, instances=core, clock=Clock())
    inst = _provision(core)
    props = {"Image": spec_file}
    assert flavor.healthy("moby", props, inst) == Health.UNKNOWN
    mclock.now = 6.0  # the machine finishes booting and prints our init's readiness line
    assert flavor.healthy("moby", props, inst) == Health.HEALTHY
    assert flavor.healthy("moby", props, inst) == Health.HEALTHY


def test_a_ready_line_for_another_image_does_not_count(memory_core, spec_file):
    core, mp, mclock = memory_core
    flavor = MobyFlavor({"default_provider": "memory"}, instances=core, clock=Clock())
    inst = _provision(core)
    mp.write_console(inst.id, f"mobykit: ready {IMAGE_B}\n")
    assert flavor.healthy("moby", {"Image": spec_file}, inst) == Health.UNKNOWN


def test_not_ready_line_makes_it_unhealthy(memory_core, spec_file):
    core, mp, mclock = memory_core
    flavor = MobyFlavor({"default_provider": "memory"}, instances=core, clock=Clock())
    inst = _provision(core)
    mclock.now = 6.0
    assert flavor.healthy("moby", {"Image": spec_file}, inst) == Health.HEALTHY
    mp.write_console(inst.id, "mobykit: not ready: onboot/001-dhcpcd exited 1\n")
    assert flavor.healthy("moby", {"Image": spec_file}, inst) == Health.UNHEALTHY


def test_past_the_deadline_without_ready_is_unhealthy(memory_core, spec_file):
    core, mp, mclock = memory_core
    clock = Clock()
    flavor = MobyFlavor({"default_provider": "memory"}, instances=core, clock=clock)
    inst = _provision(core)
    props = {"Image": spec_file, "Health": {"Deadline": "30s"}}
    assert flavor.healthy("moby", props, inst) == Health.UNKNOWN  # first seen now
    clock.now += 29
    assert flavor.healthy("moby", props, inst) == Health.UNKNOWN
    clock.now += 2
    assert flavor.healthy("moby", props, inst) == Health.UNHEALTHY


def test_deadline_counts_from_the_creation_time_the_provider_reports(spec_file):
    clock = Clock(1_000_000.0)
    flavor = MobyFlavor({}, instances=_StaticProbe(""), clock=clock)
    old = Description(id="x-1", properties={"CreatedNs": int((clock.now - 301) * 1e9)})
    new = Description(id="x-2", properties={"Created": "1970-01-12T13:46:30Z"})  # 999990 s
    assert flavor.healthy("", {"Image": spec_file}, old) == Health.UNHEALTHY
    assert flavor.healthy("", {"Image": spec_file}, new) == Health.UNKNOWN


def test_a_gone_instance_is_unhealthy(memory_core, spec_file):
    core, _mp, _mclock = memory_core
    flavor = MobyFlavor({"default_provider": "memory"}, instances=core, clock=Clock())
    inst = _provision(core)
    core.destroy("memory", inst.id)
    assert flavor.healthy("moby", {"Image": spec_file}, inst) == Health.UNHEALTHY


class _StaticProbe:
    def __init__(self, text: str, state: str | None = "running"):
        self.text, self.st = text, state

    def console_output(self, instance_id: str) -> str:
        return self.text

    def state(self, instance_id: str) -> str | None:
        return self.st


# --- Mode running on libvirt's test driver -----------------------------------------------------


def test_mode_running_follows_the_provider_state(spec_file):
    libvirt = pytest.importorskip("libvirt")
    core = InstanceCore({"providers": {"libvirt": {"URI": "test:///default", "Pool": "mobykit-flavor"}}})
    flavor = MobyFlavor({"providers": {"libvirt": {}}}, instances=core, clock=Clock())
    props = {"Image": spec_file, "Health": {"Mode": "running"}}
    iid = core.provision("libvirt", Spec(properties={"Kernel": "/k", "Initrd": "/i"}, tags={"t": "run"}))
    try:
        (inst,) = core.describe_instances("libvirt", {"t": "run"}, True)
        assert flavor.healthy("moby", props, inst) == Health.HEALTHY
    finally:
        core.destroy("libvirt", iid)
    assert flavor.healthy("moby", props, inst) == Health.UNHEALTHY
    conn = libvirt.open("test:///default")
    pool = conn.storagePoolLookupByName("mobykit-flavor")
    assert pool.listVolumes() == []
    pool.destroy()
    pool.undefine()
    conn.close()


# --- tcp and http probes against real servers on 127.0.0.1 -------------------------------------


@pytest.fixture
def http_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()
    t.join()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_mode_needs_ready_line_and_a_2xx(http_server, spec_file):
    ready = _StaticProbe(f"boot...\nmobykit: ready {IMAGE_A}\n")
    inst = Description(id="x-1", tags={IMAGE_TAG: IMAGE_A})
    ok = {"Image": spec_file, "Health": {"Mode": "http", "Port": http_server, "Path": "/healthz"}}
    missing = {"Image": spec_file, "Health": {"Mode": "http", "Port": http_server, "Path": "/nope"}}
    assert MobyFlavor({}, instances=ready, clock=Clock()).healthy("", ok, inst) == Health.HEALTHY
    assert MobyFlavor({}, instances=ready, clock=Clock()).healthy("", missing, inst) == Health.UNKNOWN
    not_yet = _StaticProbe("booting\n")
    assert MobyFlavor({}, instances=not_yet, clock=Clock()).healthy("", ok, inst) == Health.UNKNOWN


def test_tcp_mode_probes_the_published_port(http_server, spec_file):
    ready = _StaticProbe(f"mobykit: ready {IMAGE_A}\n")
    inst = Description(id="x-1", tags={IMAGE_TAG: IMAGE_A})
    listening = {"Image": spec_file, "Health": {"Mode": "tcp", "Port": http_server}}
    closed = {"Image": spec_file, "Health": {"Mode": "tcp", "Port": _free_port()}}
    assert MobyFlavor({}, instances=ready, clock=Clock()).healthy("", listening, inst) == Health.HEALTHY
    assert MobyFlavor({}, instances=ready, clock=Clock()).healthy("", closed, inst) == Health.UNKNOWN


class _PublishingProbe(_StaticProbe):
    """A ready console and the instance's published ports, as a provider lists them."""

    def __init__(self, text: str, ports: dict[str, int]):
        super().__init__(text)
        self.ports, self.lookups = ports, 0

    def published_ports(self, instance_id: str) -> dict[str, int] | None:
        self.lookups += 1
        return dict(self.ports)


def test_http_health_port_is_the_guest_port_through_its_published_host_port(http_server, spec_file):
    """``Publish: ["0:2379"]`` gives each member a host port of its own: Health.Port names the guest's
    port and the probe goes to wherever the instance publishes it (from the listing, looked up once
    per instance, or from a Description that carries ``Ports``); an unpublished port is probed as is."""
    probe = _PublishingProbe(f"mobykit: ready {IMAGE_A}\n", {"2379": http_server})
    inst = Description(id="x-1", tags={IMAGE_TAG: IMAGE_A})
    props = {"Image": spec_file, "Health": {"Mode": "http", "Port": 2379, "Path": "/healthz"}}
    f = MobyFlavor({}, instances=probe, clock=Clock())
    assert f.healthy("", props, inst) == Health.HEALTHY
    assert f.healthy("", props, inst) == Health.HEALTHY and probe.lookups == 1
    described = Description(id="x-2", tags={IMAGE_TAG: IMAGE_A}, properties={"Ports": {"2379": http_server}})
    assert MobyFlavor({}, instances=_StaticProbe(f"mobykit: ready {IMAGE_A}\n"), clock=Clock()).healthy(
        "", props, described) == Health.HEALTHY
    elsewhere = _PublishingProbe(f"mobykit: ready {IMAGE_A}\n", {"2379": _free_port()})
    assert MobyFlavor({}, instances=elsewhere, clock=Clock()).healthy("", props, inst) == Health.UNKNOWN
    direct = {"Image": spec_file, "Health": {"Mode": "http", "Port": http_server, "Path": "/healthz"}}
    assert MobyFlavor({}, instances=elsewhere, clock=Clock()).healthy("", direct, inst) == Health.HEALTHY


# --- Drain -------------------------------------------------------------------------------------


def test_drain_runs_the_command_with_the_instance_and_waits_the_grace(tmp_path, spec_file):
    out = tmp_path / "drained"
    slept: list[float] = []
    script = f"import os; open({str(out)!r}, 'w').write(os.environ['MOBYKIT_INSTANCE_ID'] + ' ' + os.environ['MOBYKIT_INSTANCE_TAGS'])"
    f = MobyFlavor({}, instances=_StaticProbe(""), sleep=slept.append)
    props = {"Image": spec_file, "Drain": {"Command": [sys.executable, "-c", script], "Grace": "2s"}}
    f.drain("", props, Description(id="mobykit-1", tags={"a": "b"}))
    assert out.read_text() == 'mobykit-1 {"a": "b"}'
    assert slept == [2.0]


def test_a_failing_drain_command_is_reported(spec_file):
    f = MobyFlavor({}, instances=_StaticProbe(""), sleep=lambda s: None)
    props = {"Image": spec_file, "Drain": {"Command": "echo cannot drain >&2; exit 3"}}
    with pytest.raises(FailedPrecondition, match="exit status 3: cannot drain"):
        f.drain("", props, Description(id="i-9"))


def test_no_drain_section_does_nothing(spec_file):
    slept: list[float] = []
    MobyFlavor({}, instances=_StaticProbe(""), sleep=slept.append).drain("", {"Image": spec_file}, Description(id="i"))
    assert slept == []


def test_default_probe_reaches_providers_through_an_instance_core(spec_file):
    mp = MemoryProvider({})
    core = InstanceCore({"default_provider": "memory"}, providers={"memory": mp})
    iid = mp.create(MachineSpec(properties={"Image": IMAGE_A})).id
    flavor = MobyFlavor({"default_provider": "memory"}, instances=core, clock=Clock())
    inst = Description(id=iid, tags={IMAGE_TAG: IMAGE_A})
    assert flavor.healthy("", {"Image": spec_file}, inst) == Health.HEALTHY


# --- Prepare through the real build and built-image store ---------------------------------------


def _put_image(cache, ref: str, layer_tar: bytes) -> None:
    """Tag a one-layer OCI image in the cache, as a pull would leave it."""
    import hashlib
    import json

    from harness.tarlayers import compress

    blob = compress(layer_tar, "gzip")
    layer = cache.write_blob(blob)
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                      "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer_tar).hexdigest()]}})
    config = cache.write_blob(cfg.encode())
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": len(cfg)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": len(blob)}],
    }).encode()
    cache.tag(ref, cache.write_blob(manifest))


@pytest.fixture
def built_cache(tmp_path):
    from harness.tarlayers import d, f, tar_bytes
    from mobykit.image.cache import Cache

    cache = Cache(tmp_path / "cache")
    _put_image(cache, "example.com/test/kernel:1",
               tar_bytes(f("kernel", b"\x7fKERNEL" * 64), f("kernel.tar", tar_bytes(d("lib/")))))
    _put_image(cache, "example.com/test/init:1", tar_bytes(d("sbin/"), f("sbin/init", b"#!/bin/sh\n", mode=0o755)))
    spec = tmp_path / "web.yml"
    spec.write_text("kernel:\n  image: example.com/test/kernel:1\n  cmdline: console=ttyS0\n"
                    "init:\n  - example.com/test/init:1\n")
    return cache, spec


def test_prepare_builds_once_and_the_core_publishes_the_built_image(built_cache):
    from mobykit.image import store

    cache, spec = built_cache
    flavor = MobyFlavor({"cache": str(cache.root)})
    first = flavor.prepare("moby", {"Image": str(spec)}, Spec(properties={}), ALLOC, Index("web", 1))
    image_id = first.properties["Image"]
    boot = store.get(image_id, cache)
    assert first.tags[IMAGE_TAG] == image_id == boot.id
    stamp = boot.initrd.stat().st_mtime_ns
    again = flavor.prepare("moby", {"Image": str(spec)}, Spec(properties={}), ALLOC, Index("web", 1))
    assert again.properties["Image"] == image_id
    assert boot.initrd.stat().st_mtime_ns == stamp  # unchanged spec: nothing rebuilt

    mp = MemoryProvider({})
    core = InstanceCore({"default_provider": "memory", "cache": str(cache.root)}, providers={"memory": mp})
    iid = core.provision("memory", first)
    assert image_id in mp.images  # the core published what the flavor built
    assert core.describe_instances("memory", {IMAGE_TAG: image_id}, False)[0].id == iid

    spec.write_text(spec.read_text().replace("console=ttyS0", "console=ttyS0 quiet"))
    changed = flavor.prepare("moby", {"Image": str(spec)}, Spec(properties={}), ALLOC, Index("web", 1))
    assert changed.properties["Image"] != image_id


def test_prepare_builds_an_inline_spec(built_cache):
    cache, _spec = built_cache
    inline = {"kernel": {"image": "example.com/test/kernel:1", "cmdline": "console=ttyS0"},
              "init": ["example.com/test/init:1"]}
    out = MobyFlavor({"cache": str(cache.root)}).prepare("", {"Image": inline}, Spec(), ALLOC, Index())
    assert out.properties["Image"].startswith("sha256:")


def test_health_does_not_need_the_spec_file_any_more(tmp_path):
    gone = str(tmp_path / "removed.yml")
    probe = _StaticProbe(f"mobykit: ready {IMAGE_A}\n")
    inst = Description(id="x-1", tags={IMAGE_TAG: IMAGE_A})
    assert MobyFlavor({}, instances=probe, clock=Clock()).healthy("", {"Image": gone}, inst) == Health.HEALTHY


def test_store_makes_other_formats_from_the_stored_canonical_tar_once(tmp_path):
    """A provider that boots a disk asks the stored image for that format: made on first use from
    the canonical tar, the same bytes ``mobykit build -f`` writes, and kept."""
    import shutil

    from harness.images import SPEC, standard_images
    from mobykit.image import store
    from mobykit.image.build import build
    from mobykit.image.cache import Cache

    cache = Cache(tmp_path / "cache")
    standard_images(cache)
    (tmp_path / "example.yml").write_text(SPEC)
    (tmp_path / "app.json").write_text('{"app": true}\n')
    image = store.build_and_store(str(tmp_path / "example.yml"), cache=cache)
    files = image.format("tar-kernel-initrd")
    assert [p.name for p in files] == ["image-initrd.tar"]
    again = store.get(image.id, cache).format("tar-kernel-initrd")
    assert again == files and again[0].stat().st_ino == files[0].stat().st_ino  # made once, kept
    out = build([tmp_path / "example.yml"], formats=["tar-kernel-initrd"], outdir=tmp_path / "out", name="image",
                cache=cache)
    assert out.image_id == image.id
    assert (tmp_path / "out" / "image-initrd.tar").read_bytes() == files[0].read_bytes()
    with pytest.raises(InvalidArgument, match="unknown output format"):
        image.format("floppy")
    shutil.rmtree(tmp_path / "cache" / "images" / image.id[7:] / "formats")
    assert image.format("tar-kernel-initrd")[0].read_bytes() == files[0].read_bytes()
