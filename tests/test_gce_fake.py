"""The fake Compute Engine server, through the real google-cloud-compute client: what the GCP
provider's tests rely on it to do as GCE does (operations over polls, requestId idempotency,
404/409/412, label rules, the filter grammar, pagination, injected faults)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

compute_v1 = pytest.importorskip("google.cloud.compute_v1")

from gce_fake import FakeCompute, running  # noqa: E402
from gce_fake.filters import FilterError, parse  # noqa: E402
from google.api_core import exceptions as gexc  # noqa: E402
from google.api_core.client_options import ClientOptions  # noqa: E402
from google.auth.credentials import AnonymousCredentials  # noqa: E402

P, Z = "proj", "us-central1-a"
DONE = compute_v1.Operation.Status.DONE


class Clients:
    def __init__(self, endpoint: str):
        kw = {"credentials": AnonymousCredentials(), "transport": "rest",
              "client_options": ClientOptions(api_endpoint=endpoint)}
        self.instances = compute_v1.InstancesClient(**kw)
        self.images = compute_v1.ImagesClient(**kw)
        self.zone_ops = compute_v1.ZoneOperationsClient(**kw)
        self.global_ops = compute_v1.GlobalOperationsClient(**kw)

    def wait_zone(self, op):
        seen = [op.status]
        while op.status != DONE:
            op = self.zone_ops.wait(project=P, zone=Z, operation=op.name)
            seen.append(op.status)
        return op, seen

    def wait_global(self, op):
        while op.status != DONE:
            op = self.global_ops.get(project=P, operation=op.name)
        return op


@pytest.fixture
def fake() -> Iterator[FakeCompute]:
    with running() as f:
        yield f


@pytest.fixture
def c(fake) -> Clients:
    return Clients(fake.endpoint)


def image(c: Clients, name="img") -> str:
    op = c.images.insert_unary(request={"project": P, "request_id": str(uuid.uuid4()), "image_resource": {
        "name": name, "description": "mobykit image sha256:" + "ab" * 32, "labels": {"mobykit-image": "ab"},
        "raw_disk": {"source": "https://storage.googleapis.com/b/o.tar.gz"}}})
    c.wait_global(op)
    return f"projects/{P}/global/images/{name}"


def instance(name: str, source: str, labels: dict | None = None) -> dict:
    return {"name": name, "machine_type": f"zones/{Z}/machineTypes/e2-small", "labels": labels or {},
            "network_interfaces": [{"network": "global/networks/default"}],
            "disks": [{"boot": True, "auto_delete": True, "initialize_params": {"source_image": source}}]}


def insert(c: Clients, body: dict, rid: str | None = None):
    return c.instances.insert_unary(request={"project": P, "zone": Z, "instance_resource": body,
                                             "request_id": rid or str(uuid.uuid4())})


def test_operations_go_pending_running_done_over_polls_and_the_effect_follows(c, fake):
    src = image(c)
    op = insert(c, instance("a", src))
    assert op.status == compute_v1.Operation.Status.PENDING
    assert c.instances.get(project=P, zone=Z, instance="a").status == "PROVISIONING"
    op, seen = c.wait_zone(op)
    assert [compute_v1.Operation.Status(s).name for s in seen] == ["PENDING", "RUNNING", "DONE"]
    inst = c.instances.get(project=P, zone=Z, instance="a")
    assert inst.status == "RUNNING"
    # health stands in for the guest: the readiness line of the image the instance booted
    out = c.instances.get_serial_port_output(project=P, zone=Z, instance="a")
    assert "mobykit: ready sha256:" + "ab" * 32 in out.contents


def test_request_id_makes_a_repeated_insert_the_same_operation(c, fake):
    src = image(c)
    rid = str(uuid.uuid4())
    first = insert(c, instance("a", src), rid)
    again = insert(c, instance("b", src), rid)  # same id, other body: the first answer, nothing done
    assert again.name == first.name
    assert [i.name for i in c.instances.list(project=P, zone=Z)] == ["a"]
    assert fake.world.counts["instances.insert"] == 1
    with pytest.raises(gexc.BadRequest, match="Must be a valid UUID"):
        insert(c, instance("c", src), "not-a-uuid")


def test_404_409_412_and_label_rules(c, fake):
    src = image(c)
    with pytest.raises(gexc.NotFound):
        c.instances.get(project=P, zone=Z, instance="nope")
    with pytest.raises(gexc.NotFound):
        c.instances.list(project=P, zone="mars-1a").pages.__next__()
    with pytest.raises(gexc.NotFound):
        insert(c, instance("a", "projects/proj/global/images/missing"))
    c.wait_zone(insert(c, instance("a", src)))
    with pytest.raises(gexc.Conflict):
        insert(c, instance("a", src))
    with pytest.raises(gexc.BadRequest, match="labels"):
        insert(c, instance("b", src, {"Upper": "x"}))
    with pytest.raises(gexc.BadRequest, match="labels"):
        insert(c, instance("b", src, {"k": "sha256:x"}))
    with pytest.raises(gexc.BadRequest, match="labels"):
        insert(c, instance("b", src, {f"k{i}": "v" for i in range(65)}))
    with pytest.raises(gexc.BadRequest, match="name"):
        insert(c, instance("Bad_Name", src))
    fp = c.instances.get(project=P, zone=Z, instance="a").label_fingerprint
    req = {"project": P, "zone": Z, "instance": "a"}
    c.instances.set_labels_unary(request={**req, "instances_set_labels_request_resource": {
        "labels": {"k": "v"}, "label_fingerprint": fp}})
    with pytest.raises(gexc.PreconditionFailed):  # the fingerprint is stale now
        c.instances.set_labels_unary(request={**req, "instances_set_labels_request_resource": {
            "labels": {"k": "w"}, "label_fingerprint": fp}})
    op, _ = c.wait_zone(c.instances.delete_unary(request={**req, "request_id": str(uuid.uuid4())}))
    with pytest.raises(gexc.NotFound):
        c.instances.delete_unary(request=req)


def test_filters_and_pages(c, fake):
    src = image(c)
    for i in range(5):
        c.wait_zone(insert(c, instance(f"i{i}", src, {"g": "x" if i < 4 else "y", "n": str(i)})))
    names = lambda flt, size=500: [i.name for i in c.instances.list(  # noqa: E731
        request={"project": P, "zone": Z, "filter": flt, "max_results": size})]
    assert names('labels.g = "x"') == ["i0", "i1", "i2", "i3"]
    assert names('(labels.g = "x") AND (labels.n = "2")') == ["i2"]
    assert names('(labels.g = "x") (labels.n != "2")') == ["i0", "i1", "i3"]
    assert names('labels.n = "1" OR labels.n = "4"') == ["i1", "i4"]
    assert names('labels.g = "x"', size=3) == ["i0", "i1", "i2", "i3"]  # two pages, followed by the pager
    assert fake.count("instances.list") == 5 + 1
    with pytest.raises(gexc.BadRequest, match="Invalid list filter"):
        names('labels.g = "x" AND (')


def test_filter_grammar_directly():
    r = {"labels": {"a": "1", "b": "2"}, "status": "RUNNING"}
    assert parse('labels.a = "1" AND labels.b = "2"')(r)
    assert not parse('(labels.a = "1") AND (labels.b = "3")')(r)
    assert parse("labels.a:*")(r) and not parse("labels.z:*")(r)
    assert parse('NOT labels.a = "2"')(r) and parse("status = RUNNING")(r)
    for bad in ('labels.a = ', '(labels.a = "1"', 'labels.a "1"'):
        with pytest.raises(FilterError):
            parse(bad)


def test_injected_faults_lose_answers_after_the_effect(c, fake):
    """A lost answer (the effect happened, the client saw 5xx) is what requestId exists for."""
    src = image(c)
    fake.fault_rate = 1.0
    rid = str(uuid.uuid4())
    seen = 0
    for _ in range(10):
        try:
            insert(c, instance("a", src), rid)
            break
        except (gexc.ServiceUnavailable, gexc.InternalServerError, gexc.TooManyRequests):
            seen += 1
    assert seen == 10
    fake.fault_rate = 0.0
    assert fake.world.counts.get("instances.insert", 0) == 1  # done once, however often it was asked
    op = insert(c, instance("a", src), rid)
    c.wait_zone(op)
    assert [i.name for i in c.instances.list(project=P, zone=Z)] == ["a"]
