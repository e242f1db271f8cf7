"""The memory provider keeps the Provider promises other tests rely on."""

from __future__ import annotations

import threading

import pytest

from mobykit.errors import InvalidArgument, NotFound, Unavailable
from mobykit.providers import load
from mobykit.providers.base import BootImage, MachineSpec
from mobykit.providers.memory import MemoryProvider


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_loaded_by_name_and_ids_sort_in_creation_order():
    p = load("memory", {})
    assert p.name == "memory"
    ids = [p.create(MachineSpec({}, {"n": str(i)})).id for i in range(12)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 12


def test_pending_until_boot_latency_then_console_says_ready():
    clock = Clock()
    p = MemoryProvider({"boot_latency": 3, "clock": clock, "sleep": clock.sleep})
    m = p.create(MachineSpec({"Image": "sha256:abc"}, {"g": "1"}))
    assert m.state == "pending"
    assert p.console_output(m.id) == ""
    clock.t = 2.9
    assert p.list({"g": "1"})[0].state == "pending"
    clock.t = 3.0
    assert p.list({"g": "1"})[0].state == "running"
    assert p.console_output(m.id) == "mobykit: ready sha256:abc\n"


def test_provision_latency_uses_injected_sleep():
    clock = Clock()
    p = MemoryProvider({"provision_latency": 2, "clock": clock, "sleep": clock.sleep})
    p.create(MachineSpec({}))
    assert clock.t == 2


def test_list_filters_by_all_tags_and_set_tags_replaces():
    p = MemoryProvider({})
    a = p.create(MachineSpec({}, {"g": "x", "h": "1"}))
    p.create(MachineSpec({}, {"g": "y"}))
    assert [m.id for m in p.list({"g": "x", "h": "1"})] == [a.id]
    p.set_tags(a.id, {"g": "z"})
    assert p.list({"g": "x"}) == []
    assert p.list({"g": "z"})[0].tags == {"g": "z"}


def test_destroy_gone_is_success_and_unknown_console_is_not_found():
    p = MemoryProvider({})
    m = p.create(MachineSpec({}))
    p.destroy(m.id)
    p.destroy(m.id)
    assert p.list({}) == []
    with pytest.raises(NotFound):
        p.console_output(m.id)
    with pytest.raises(NotFound):
        p.set_tags(m.id, {})


def test_failure_injection_is_seeded_and_repeatable():
    def outcomes(seed):
        p = MemoryProvider({"create_failure_rate": 0.5, "seed": seed})
        out = []
        for _ in range(20):
            try:
                p.create(MachineSpec({}))
                out.append(True)
            except Unavailable:
                out.append(False)
        return out

    assert outcomes(7) == outcomes(7)
    assert True in outcomes(7) and False in outcomes(7)


def test_boot_failure_console_never_says_ready():
    p = MemoryProvider({"boot_failure_rate": 1})
    m = p.create(MachineSpec({}))
    assert "ready" not in p.console_output(m.id)
    assert "failed" in p.console_output(m.id)


def test_bad_config_and_properties_name_the_key():
    with pytest.raises(InvalidArgument, match="boot_latency"):
        MemoryProvider({"boot_latency": -1})
    with pytest.raises(InvalidArgument, match="create_failure_rate"):
        MemoryProvider({"create_failure_rate": 2})
    with pytest.raises(InvalidArgument, match="Image"):
        MemoryProvider({}).validate({"Image": 5})


def test_crash_keeps_machine_listed_as_stopped():
    p = MemoryProvider({})
    m = p.create(MachineSpec({}))
    p.crash(m.id)
    assert p.list({})[0].state == "stopped"
    assert "panic" in p.console_output(m.id)


def test_publish_image_is_idempotent(tmp_path):
    p = MemoryProvider({})
    img = BootImage("sha256:1", "x", tmp_path / "k", tmp_path / "i", "")
    assert p.publish_image(img, {}) == p.publish_image(img, {}) == "memory:sha256:1"


def test_concurrent_creates_get_unique_ids():
    p = MemoryProvider({})
    ids: list[str] = []
    lock = threading.Lock()

    def work():
        for _ in range(50):
            mid = p.create(MachineSpec({})).id
            with lock:
                ids.append(mid)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 400
    assert len(p.list({})) == 400
