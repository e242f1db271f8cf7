"""Where health events come from: the moby flavor's watch over followed and polled consoles.

- A followed console (libvirt's console file, through real inotify on a real file): the readiness
  line is an event at once, and Healthy answers from it without reading the console again.
- A polled console (clouds: no stream): read with a doubling back-off only while pending, on a
  virtual clock, then not at all; a Deadline running out is an event too.
- End to end over the memory provider (polled) behind a real InstanceCore: the moby flavor's
  events drive the group controller to converge with its poll an hour away.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from fakes import group_spec

from mobykit.core.instance import InstanceCore
from mobykit.errors import NotFound
from mobykit.flavor.health import ConsoleScanner
from mobykit.flavor.healthwatch import HealthWatch
from mobykit.flavor.moby import MobyFlavor
from mobykit.group.controller import GroupController, Options
from mobykit.group.spec import parse
from mobykit.group.wake import HEALTH, POLL
from mobykit.providers.libvirt.consolewatch import ConsoleFiles
from mobykit.providers.memory import MemoryProvider
from mobykit.spi.group import GroupSpec
from mobykit.spi.types import Health

IMAGE = "sha256:" + "ab" * 32


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Events:
    """A listener that records ids and lets a test wait for one (a bound on a hang, not a timing)."""

    def __init__(self):
        self.ids: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, iid: str) -> None:
        with self._cond:
            self.ids.append(iid)
            self._cond.notify_all()

    def wait_for(self, count: int, limit: float = 20.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.ids) >= count, limit)


class FileProbe:
    """An InstanceProbe over console files in a directory, followed like the libvirt provider's."""

    def __init__(self, root: Path, follow: bool = True):
        self.root, self.files = root, ConsoleFiles()
        self.follow = follow
        self.reads = 0

    def console_output(self, iid: str) -> str:
        self.reads += 1
        try:
            return (self.root / iid).read_text()
        except FileNotFoundError:
            raise NotFound(iid) from None

    def state(self, iid: str) -> str | None:
        return "running"

    def follow_console(self, iid, output):
        return self.files.follow(str(self.root / iid), output) if self.follow else None


def test_console_scanner_matches_console_verdict_in_any_pieces():
    text = f"boot\nmobykit: ready sha256:other\nmobykit: ready {IMAGE}\nsvc\nmobykit: not ready: x\nmobykit: ready {IMAGE}\n"
    for size in (1, 3, 7, 24):
        s = ConsoleScanner(IMAGE)
        verdicts = [s.feed(text[i:i + size]) for i in range(0, len(text), size)]
        assert verdicts[-1] is True
        assert False in verdicts  # the "not ready" in between was seen, whatever the pieces
    assert ConsoleScanner(IMAGE).feed(f"mobykit: ready {IMAGE[:20]}") is None  # half a line is no verdict


def test_a_followed_console_file_is_an_event_the_moment_the_line_is_written(tmp_path):
    console = tmp_path / "vm-1"
    console.write_text("SeaBIOS\n")
    probe = FileProbe(tmp_path)
    watch = HealthWatch(lambda: probe)
    events = Events()
    watch.subscribe(events)
    try:
        assert watch.seen("vm-1", IMAGE).verdict is None
        assert watch.followed() == 1 and probe.reads == 1
        with open(console, "a") as f:
            f.write("Linux version 6.1\nmobykit: rea")
            f.flush()
            f.write(f"dy {IMAGE}\n")
        assert events.wait_for(1)
        assert events.ids == ["vm-1"]
        assert watch.seen("vm-1", IMAGE).verdict is True
        assert probe.reads == 1  # Healthy was answered from the stream, not by reading again
        with open(console, "a") as f:
            f.write("mobykit: not ready: service web exited\n")
        assert events.wait_for(2)
        assert watch.seen("vm-1", IMAGE).verdict is False
        os.unlink(console)  # the instance is destroyed with its console volume
        assert events.wait_for(3)
        assert watch.seen("vm-1", IMAGE).gone
    finally:
        watch.close()
        probe.files.close()
    assert probe.files.followed() == 0


def test_a_polled_console_is_read_with_back_off_only_while_pending():
    clock = Clock()
    text = {"i-1": "booting\n"}

    class Cloud:
        reads = 0

        def console_output(self, iid):
            Cloud.reads += 1
            return text[iid]

        def state(self, iid):
            return "running"

    watch = HealthWatch(lambda: Cloud(), clock=clock, poll_first=0.25, poll_max=4.0, thread=False)
    events = Events()
    watch.subscribe(events)
    assert watch.seen("i-1", IMAGE, deadline_at=clock.now + 300).verdict is None
    times = []
    while not events.ids:
        nxt = watch.run_due()
        assert nxt is not None and nxt > clock.now and clock.now < 1100
        clock.now = nxt
        before = Cloud.reads
        watch.run_due()
        if Cloud.reads > before:
            times.append(round(clock.now - 1000, 2))
        if clock.now > 1012 and "ready" not in text["i-1"]:
            text["i-1"] += f"mobykit: ready {IMAGE}\n"
    gaps = [round(b - a, 2) for a, b in zip([0.0] + times, times, strict=False)]
    assert gaps[:6] == [0.25, 0.5, 1.0, 2.0, 4.0, 4.0]  # doubling, then capped
    assert events.ids == ["i-1"]  # the poll that found the line told the listener
    reads = Cloud.reads
    assert watch.run_due() is None  # nothing pending: no more background reads, no timer
    clock.now += 3600
    assert watch.run_due() is None and Cloud.reads == reads


def test_a_deadline_running_out_is_an_event():
    clock = Clock()

    class Silent:
        def console_output(self, iid):
            return ""

        def state(self, iid):
            return "running"

    watch = HealthWatch(lambda: Silent(), clock=clock, poll_first=1.0, poll_max=1.0, thread=False)
    events = Events()
    watch.subscribe(events)
    watch.seen("i-1", IMAGE, deadline_at=clock.now + 2.5)
    for _ in range(5):
        clock.now += 1
        watch.run_due()
    assert events.ids == ["i-1"]


def test_moby_flavor_events_drive_the_group_controller_without_polls(tmp_path):
    """Real pieces end to end: the memory provider (polled, as a cloud) behind an InstanceCore, the
    moby flavor's watch, and a threaded group controller whose poll is an hour away."""
    spec = tmp_path / "web.yml"
    spec.write_text("kernel:\n  image: linuxkit/kernel:6.6\ninit: []\n")
    mp = MemoryProvider({"boot_latency": 0.3})
    core = InstanceCore({"default_provider": "memory"}, providers={"memory": mp})
    flavor = MobyFlavor({"default_provider": "memory"}, instances=core)
    from fakes import ProviderInstancePlugin

    doc = group_spec(size=3)
    doc["Properties"]["Instance"] = {"Plugin": "mobykit/memory", "Properties": {"Image": IMAGE}}
    doc["Properties"]["Flavor"] = {"Plugin": "mobykit/moby", "Properties": {"Image": str(spec)}}
    cfg = parse(GroupSpec(doc["ID"], doc["Properties"]))

    class Prepared:
        """The flavor's Prepare would build the spec; the image id is given instead."""

        def __getattr__(self, name):
            return getattr(flavor, name)

        def prepare(self, type, properties, spec, allocation, index):
            spec.tags = {**spec.tags, "mobykit.image": IMAGE}
            return spec

    ctl = GroupController(cfg, ProviderInstancePlugin(mp), Prepared(),
                          options=Options(poll_interval=3600.0, idle_poll_interval=3600.0))
    ctl.flavor.subscribe_health  # noqa: B018 - reached through __getattr__, as the controller does
    ctl.start()
    try:
        done = threading.Event()
        for _ in range(3000):
            if ctl.status().converged:
                break
            done.wait(0.01)
        assert ctl.status().converged, ctl.status()
        assert ctl.status().healthy == 3
        assert ctl.passes[POLL] == 0 and ctl.passes[HEALTH] >= 1
        assert all(flavor.healthy("moby", cfg.flavor_properties, d) == Health.HEALTHY
                   for d in ProviderInstancePlugin(mp).describe_instances("", {}, False))
    finally:
        ctl.stop()
        flavor.close()


def test_a_port_probe_runs_on_its_own_schedule_and_its_passing_is_an_event():
    """Health Mode tcp: once the console is ready the port is probed on a doubling schedule (virtual
    clock) against a real socket on 127.0.0.1, and the probe that finds it open tells the listener."""
    import socket

    from mobykit.flavor.healthwatch import PortCheck

    clock = Clock()

    class Ready:
        def console_output(self, iid):
            return f"mobykit: ready {IMAGE}\n"

        def state(self, iid):
            return "running"

    server = socket.socket()
    server.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    try:
        check = PortCheck("tcp", server.getsockname()[1])
        watch = HealthWatch(lambda: Ready(), clock=clock, port_first=0.25, port_max=2.0, thread=False)
        events = Events()
        watch.subscribe(events)
        seen = watch.seen("i-1", IMAGE, port=check)
        assert seen.verdict is True and not seen.port_ok
        due = []
        for _ in range(4):  # closed: probed at 0.25, 0.5, 1, 2 s intervals
            nxt = watch.run_due()
            due.append(round(nxt - clock.now, 2))
            clock.now = nxt
        assert due == [0.25, 0.5, 1.0, 2.0] and events.ids == []
        server.listen()
        assert watch.run_due() is None  # the probe due now passes: no more probes after it
        assert events.ids == ["i-1"]
        assert watch.seen("i-1", IMAGE, port=check).port_ok
    finally:
        server.close()


def test_a_cloud_error_in_a_background_poll_is_retried_not_fatal():
    from mobykit.errors import Unavailable

    clock = Clock()
    answers = ["", Unavailable("GetConsoleOutput: throttled"), f"mobykit: ready {IMAGE}\n"]

    class Flaky:
        def console_output(self, iid):
            a = answers.pop(0) if len(answers) > 1 else answers[0]
            if isinstance(a, Exception):
                raise a
            return a

        def state(self, iid):
            return "running"

    watch = HealthWatch(lambda: Flaky(), clock=clock, poll_first=1.0, poll_max=1.0, thread=False)
    events = Events()
    watch.subscribe(events)
    assert watch.seen("i-1", IMAGE).verdict is None
    for _ in range(3):
        clock.now += 1
        watch.run_due()  # the throttled read is logged and retried after the back-off
    assert events.ids == ["i-1"]
    assert watch.watched()["i-1"].verdict is True
