"""Prepare and the builds in flight (``mobykit.image.inflight``): one build per spec however many
Prepares ask, a Prepare that cannot wait told what the build is doing, the build outliving it.

Most tests inject a builder that counts its calls and blocks on an Event, so "concurrent" is
arranged, not hoped for: a test releases a build only once the requests it wants have joined
(``builds.waiting``). The last tests build the harness's small images for real behind real gRPC
and JSON-RPC servers. No test asserts a duration; waits are bounded and generous.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from harness.images import SPEC, standard_images
from harness.mobykit_server import call, grpc_server, jsonrpc_server
from mobykit.core import paths
from mobykit.errors import ImageError, InvalidArgument, Unavailable
from mobykit.flavor.moby import IMAGE_TAG, PREPARE_WAIT, MobyFlavor
from mobykit.image import store
from mobykit.image.cache import Cache
from mobykit.image.inflight import BuildInProgress, Builds
from mobykit.image.progress import Progress
from mobykit.providers.base import BootImage
from mobykit.spec.load import SpecSource
from mobykit.spi.types import Allocation, Description, Health, Index, Spec

WAIT = 30.0  # bound of every wait in these tests; none should come near it
IMAGE_A = "sha256:" + "a1" * 32
STAMP = r"since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ, \d+s\)"


class GatedBuilder:
    """A builder that counts its calls and holds each build until ``gate`` is set; ``errors`` are
    raised by the first builds, one each; ``step`` runs first with the build's Progress."""

    def __init__(self) -> None:
        self.calls = 0
        self.started = threading.Event()
        self.gate = threading.Event()
        self.errors: list[Exception] = []
        self.step: Callable[[Progress], None] | None = None
        self._lock = threading.Lock()

    def __call__(self, sources: list[SpecSource], progress: Progress) -> BootImage:
        with self._lock:
            self.calls += 1
            error = self.errors.pop(0) if self.errors else None
        if self.step is not None:
            self.step(progress)
        self.started.set()
        if not self.gate.wait(WAIT):
            raise AssertionError("the test never released the build")
        if error is not None:
            raise error
        return BootImage(id=IMAGE_A, name="t", kernel=Path("/k"), initrd=Path("/i"), cmdline="console=ttyS0")


def build_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("build-")]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


@pytest.fixture
def gated() -> Iterator[GatedBuilder]:
    builder = GatedBuilder()
    yield builder
    builder.gate.set()
    wait_until(lambda: not build_threads(), "every build thread has ended")  # none leaked


@pytest.fixture
def spec_file(tmp_path: Path) -> str:
    p = tmp_path / "web.yml"
    p.write_text("kernel:\n  image: example.test/kernel:1\ninit: []\n")
    return str(p)


def moby(build, wait: str | float = "60s") -> MobyFlavor:
    return MobyFlavor({"flavors": {"moby": {"PrepareWait": wait}}}, build=build)


def prepare(flavor: MobyFlavor, image) -> Spec:
    return flavor.prepare("moby", {"Image": image}, Spec(properties={}), Allocation(size=1), Index("web", 1))


def key_of(image) -> str:
    return store.build_key(store.spec_sources(image, "Properties.Image"))


# --- one build per spec ------------------------------------------------------------------------


def test_two_concurrent_prepares_of_one_spec_count_one_build(gated, spec_file):
    flavor = moby(gated)
    with ThreadPoolExecutor(2) as pool:
        answers = [pool.submit(prepare, flavor, spec_file) for _ in range(2)]
        wait_until(lambda: flavor.builds.waiting(key_of(spec_file)) == 2, "both Prepares wait for the build")
        assert gated.calls == 1
        gated.gate.set()
        images = [a.result(WAIT).properties["Image"] for a in answers]
    assert images == [IMAGE_A, IMAGE_A]
    assert gated.calls == 1


def test_different_specs_build_separately_and_a_build_beyond_the_workers_says_it_is_queued(gated, tmp_path):
    specs = []
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.yml").write_text("init: []\n")
        specs.append(str(tmp_path / f"{name}.yml"))
    flavor = moby(gated, "60s")
    with ThreadPoolExecutor(2) as pool:
        answers = [pool.submit(prepare, flavor, s) for s in specs[:2]]
        wait_until(lambda: gated.calls == 2, "both specs are building")
        flavor.prepare_wait = 0.0
        with pytest.raises(BuildInProgress, match=r"queued: 2 other build\(s\) are running") as e:
            prepare(flavor, specs[2])
        assert specs[2] in str(e.value)
        gated.gate.set()
        assert [a.result(WAIT).properties["Image"] for a in answers] == [IMAGE_A, IMAGE_A]
    wait_until(lambda: gated.calls == 3, "the queued build has run")


# --- a Prepare that cannot wait ----------------------------------------------------------------


def test_a_prepare_that_cannot_wait_is_told_the_step_and_a_retry_gets_the_image_at_once(gated, spec_file):
    gated.step = lambda progress: progress.task("unpack example.test/kernel:1", total=200).advance(50)
    flavor = moby(gated, "0.05s")
    with pytest.raises(Unavailable) as first:
        prepare(flavor, spec_file)
    assert "still being built" in str(first.value)
    assert gated.started.wait(WAIT)
    with pytest.raises(BuildInProgress) as e:  # joins the running build, and is told what it is at
        prepare(flavor, spec_file)
    message = str(e.value)
    assert message.startswith(f"Properties.Image {spec_file}: the image is still being built (")
    assert re.search(STAMP, message), message
    assert "assembling: unpack example.test/kernel:1 (25%)" in message
    assert "retry" in message
    assert gated.calls == 1

    gated.gate.set()  # the callers gave up; the build goes on and finishes
    wait_until(lambda: flavor.builds.status(key_of(spec_file)) is None, "the build has finished")
    flavor.prepare_wait = 0.0  # "at once": this Prepare does not wait at all
    assert prepare(flavor, spec_file).tags[IMAGE_TAG] == IMAGE_A
    assert gated.calls == 1

    # Handed over, the result is not kept: the next Prepare builds again (in the store, a no-op
    # when the spec's inputs are unchanged), so an edited spec file is picked up.
    flavor.prepare_wait = WAIT
    assert prepare(flavor, spec_file).properties["Image"] == IMAGE_A
    assert gated.calls == 2


def test_before_its_first_step_a_build_is_resolving(gated, spec_file):
    flavor = moby(gated, 0)
    gated.step = lambda progress: None
    with pytest.raises(BuildInProgress):
        prepare(flavor, spec_file)
    assert gated.started.wait(WAIT)
    status = flavor.builds.status(key_of(spec_file))
    assert status is not None and "resolving" in status.step
    gated.gate.set()


# --- failures ----------------------------------------------------------------------------------


def test_a_failed_build_fails_every_waiter_and_the_next_prepare_builds_afresh(gated, spec_file):
    gated.errors = [ImageError("layer is hostile", image="docker.io/x/y:1", path="../etc/passwd")]
    flavor = moby(gated)
    with ThreadPoolExecutor(2) as pool:
        answers = [pool.submit(prepare, flavor, spec_file) for _ in range(2)]
        wait_until(lambda: flavor.builds.waiting(key_of(spec_file)) == 2, "both Prepares wait for the build")
        gated.gate.set()
        for a in answers:
            with pytest.raises(ImageError, match="x/y:1"):
                a.result(WAIT)
    assert gated.calls == 1
    assert prepare(flavor, spec_file).properties["Image"] == IMAGE_A  # not cached: a fresh attempt
    assert gated.calls == 2


def test_the_error_of_a_build_whose_callers_gave_up_is_told_to_the_next_prepare_once(gated, spec_file):
    gated.errors = [ImageError("no such manifest", image="docker.io/x/y:1")]
    flavor = moby(gated, 0)
    with pytest.raises(BuildInProgress):
        prepare(flavor, spec_file)
    gated.gate.set()
    wait_until(lambda: flavor.builds.status(key_of(spec_file)) is None, "the build has failed")
    with pytest.raises(ImageError, match="no such manifest"):
        prepare(flavor, spec_file)
    assert gated.calls == 1
    flavor.prepare_wait = WAIT
    assert prepare(flavor, spec_file).properties["Image"] == IMAGE_A
    assert gated.calls == 2


def test_a_result_nobody_collected_is_dropped_after_keep_seconds():
    """A spec file may have been edited since: an old unclaimed result must not be handed out."""
    now, gate, results = [0.0], threading.Event(), iter(("first", "second", "third"))
    builds: Builds[str] = Builds(keep=60.0, clock=lambda: now[0])

    def build(progress: Progress) -> str:
        assert gate.wait(WAIT)
        return next(results)

    def abandoned_build() -> None:  # its caller gives up; it finishes with nobody waiting
        gate.clear()
        with pytest.raises(BuildInProgress):
            builds.get("k", "spec", build, 0.0)
        gate.set()
        wait_until(lambda: builds.status("k") is None, "the build has finished")

    abandoned_build()  # "first"
    now[0] += 59.0
    assert builds.get("k", "spec", build, 0.0) == "first"  # within keep: handed over at once
    abandoned_build()  # "second"
    now[0] += 61.0
    assert builds.get("k", "spec", build, WAIT) == "third"  # too old: dropped, built again
    builds.close(WAIT)
    assert not build_threads()


# --- the rest of the flavor does not wait ------------------------------------------------------


class ReadyProbe:
    def console_output(self, instance_id: str) -> str:
        return f"mobykit: ready {IMAGE_A}\n"

    def state(self, instance_id: str) -> str:
        return "running"


def test_validate_healthy_and_drain_do_not_wait_on_a_running_build(gated, spec_file):
    flavor = MobyFlavor({"flavors": {"moby": {"PrepareWait": 0}}}, build=gated, instances=ReadyProbe())
    with pytest.raises(BuildInProgress):
        prepare(flavor, spec_file)
    assert gated.started.wait(WAIT)
    inst = Description(id="i-1", tags={IMAGE_TAG: IMAGE_A})
    props = {"Image": spec_file}
    with ThreadPoolExecutor(1) as pool:  # bounded: a call that waited on the build would hang here
        pool.submit(flavor.validate, "moby", props, Allocation(size=1)).result(WAIT / 3)
        assert pool.submit(flavor.healthy, "moby", props, inst).result(WAIT / 3) == Health.HEALTHY
        pool.submit(flavor.drain, "moby", props, inst).result(WAIT / 3)
    assert not gated.gate.is_set() and flavor.builds.waiting(key_of(spec_file)) == 0


def test_a_closed_flavor_starts_no_build(gated, spec_file):
    flavor = moby(gated)
    flavor.close()
    with pytest.raises(Unavailable, match="stopping"):
        prepare(flavor, spec_file)
    assert gated.calls == 0


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("section, wait", [(None, PREPARE_WAIT), ({"PrepareWait": "2s"}, 2.0),
                                           ({"preparewait": 1}, 1.0), ({"PrepareWait": "0"}, 0.0)])
def test_prepare_wait_comes_from_the_flavor_section_of_the_config(section, wait):
    config = {"flavors": {"moby": section}} if section is not None else {}
    assert MobyFlavor(config).prepare_wait == wait


@pytest.mark.parametrize("flavors, needle", [
    ({"moby": {"Wait": "2s"}}, r"config: flavors.moby: unknown key\(s\) Wait \(known: PrepareWait\)"),
    ({"moby": {"PrepareWait": "soon"}}, "config: flavors.moby.PrepareWait: 'soon' is not a duration"),
    ({"moby": {"PrepareWait": -1}}, "config: flavors.moby.PrepareWait: must not be negative"),
    ({"moby": "10s"}, "config: flavors.moby: must be an object"),
    (["moby"], "config: flavors: must be a mapping"),
])
def test_bad_flavor_config_is_named(flavors, needle):
    with pytest.raises(InvalidArgument, match=needle):
        MobyFlavor({"flavors": flavors})


# --- real builds behind real servers -----------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path, monkeypatch) -> Iterator[dict]:
    """gRPC and JSON-RPC servers over ``compose`` (as ``mobykit serve``), a policy allowing ``root``
    (the harness spec), a cache holding the harness's small images, and ``store.build_and_store``
    counted and held on ``gate``."""
    from mobykit.cli.serve import compose
    from mobykit.rpc.gen import mobykit_pb2_grpc as pbg

    root = tmp_path / "root"
    root.mkdir()
    (root / "example.yml").write_text(SPEC)
    (root / "app.json").write_text('{"app": true}\n')
    cache = Cache(tmp_path / "cache")
    standard_images(cache)
    real, gate, calls = store.build_and_store, threading.Event(), []

    def held(*args, **kwargs):
        calls.append(args[0])
        if not gate.wait(WAIT):
            raise AssertionError("the test never released the build")
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "build_and_store", held)
    config = {"cache": str(cache.root), "default_provider": "memory", "providers": {"memory": {}},
              "flavors": {"moby": {"PrepareWait": "0.2s"}}}
    with paths.using(paths.PathPolicy.under([root])):
        plugins = compose(config)
        with grpc_server(plugins) as (_server, bound, _tmp), jsonrpc_server(plugins) as js:
            channel = grpc.insecure_channel(bound[0])
            try:
                yield {"flavor": plugins.flavors["moby"], "stub": pbg.FlavorStub(channel), "jsonrpc": js.path,
                       "spec": str(root / "example.yml"), "cache": cache, "gate": gate, "calls": calls}
            finally:
                gate.set()
                wait_until(lambda: not build_threads(), "every build thread has ended")
                channel.close()


def grpc_prepare(s: dict) -> str:
    from mobykit.rpc.gen import mobykit_pb2 as pb

    props = json_format.ParseDict({"Image": s["spec"]}, struct_pb2.Value())
    reply = s["stub"].Prepare(pb.PrepareRequest(type="moby", properties=props, spec=pb.Spec(),
                                                allocation=pb.Allocation(size=1), index=pb.Index(group="g", sequence=1)),
                              timeout=WAIT)
    return json_format.MessageToDict(reply.spec.properties)["Image"]


def jsonrpc_prepare(s: dict) -> dict:
    return call(s["jsonrpc"], "Flavor.Prepare", {"Type": "moby", "Properties": {"Image": s["spec"]}, "Spec": {},
                                                 "Allocation": {"Size": 1}, "Index": {"Group": "g", "Sequence": 1}})


def test_over_both_transports_a_cold_build_answers_unavailable_then_its_image(served):
    key = key_of(served["spec"])
    with pytest.raises(grpc.RpcError) as e:
        grpc_prepare(served)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
    assert f"Properties.Image {served['spec']}: the image is still being built" in e.value.details()
    answer = jsonrpc_prepare(served)  # joins the same build
    assert answer["error"]["code"] == -32000 and "still being built" in answer["error"]["message"], answer
    assert re.search(STAMP, answer["error"]["message"]), answer
    assert len(served["calls"]) == 1

    served["gate"].set()
    wait_until(lambda: served["flavor"].builds.status(key) is None, "the build has finished")
    image_id = grpc_prepare(served)
    assert len(served["calls"]) == 1  # the finished build's result, not another build
    assert store.get(image_id, served["cache"]).id == image_id

    # Two Prepares of the spec at once, one per transport: one build (a no-op in the store now).
    served["gate"].clear()
    served["flavor"].prepare_wait = WAIT
    with ThreadPoolExecutor(2) as pool:
        by_grpc = pool.submit(grpc_prepare, served)
        by_jsonrpc = pool.submit(jsonrpc_prepare, served)
        wait_until(lambda: served["flavor"].builds.waiting(key) == 2, "both Prepares wait for the build")
        served["gate"].set()
        assert by_grpc.result(WAIT) == image_id
        assert by_jsonrpc.result(WAIT)["result"]["Spec"]["Properties"]["Image"] == image_id
    assert len(served["calls"]) == 2
