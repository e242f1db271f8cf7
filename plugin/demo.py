"""``make demo`` (``python -m mobykit.demo``): mobykit's main job end to end on the local libvirt.

1. build the package recipes the demo image specs use (``mobykit pkg build``; cached after the first
   run), then the two images (specs/images/demo.yml and demo-v2.yml);
2. start a private session libvirtd (in its own temp dir: qemu's monitor socket path deep inside
   it must fit a unix socket address) and ``mobykit serve`` on a unix socket in the demo's temp dir,
   or use the libvirt at ``$MOBYKIT_LIBVIRT_URI`` / ``--uri`` instead of the private daemon;
3. commit specs/groups/demo.yml (3 VMs, each publishing port 80 on its own free 127.0.0.1 port),
   wait until all 3 are HEALTHY and show each VM's demo page fetched from this host;
4. commit the same group with the v2 image and follow the rolling update (a new VM provisioned,
   healthy, an old one drained and destroyed, three times) while a thread keeps fetching the page
   from every HEALTHY VM, and report whether the service ever stopped answering;
5. tear everything down: the group's VMs, the server and the daemon (by PID), the image volumes the
   demo published, the temp dir. Also on Ctrl-C or a failure.

Why the steps are functions over a ``Stack``: the slow e2e test (tests/test_demo_e2e.py) runs the
same steps on the test session's libvirtd and asserts on what they return, so the demo a user sees
and the acceptance test cannot drift apart. The demo talks to the server only through the gRPC
client (``mobykit.rpc.client``), as ``mobykit group`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobykit.errors import FailedPrecondition, MobykitError, SpecError, Unavailable

ROOT = Path(__file__).resolve().parents[1]
GROUP_SPEC = ROOT / "specs" / "groups" / "demo.yml"
IMAGE_V1 = ROOT / "specs" / "images" / "demo.yml"
IMAGE_V2 = ROOT / "specs" / "images" / "demo-v2.yml"
GROUP_TAG = "infrakit.group"
HASH_TAG = "infrakit.config.hash"
IMAGE_TAG = "mobykit.image"
GUEST_PORT = "80"
_H1 = re.compile(r"<h1>(.*?)</h1>", re.S)

Say = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


class Printer:
    """Progress lines prefixed with the seconds since the demo began: the timing is part of the show."""

    def __init__(self, out=None):
        self.t0 = time.monotonic()
        self.out = out or sys.stdout
        self._lock = threading.Lock()

    def __call__(self, msg: str) -> None:
        with self._lock:
            print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=self.out, flush=True)


# -- step 1: packages and images -----------------------------------------------------------------


def build_image(spec: Path, *, cache=None, say: Say = _quiet):
    """Build the spec as kernel+initrd into the image store (a no-op when unchanged): the moby
    flavor then finds it there by its inputs instead of building during the first Provision."""
    from mobykit.image import store

    t = time.monotonic()
    image = store.build_and_store(spec, cache=cache)
    say(f"image {spec.name}: {image.id} ({time.monotonic() - t:.1f}s)")
    return image


# -- step 2: libvirtd and the server -------------------------------------------------------------


@dataclass
class Stack:
    """What the demo runs on. ``libvirt`` is the provider config the server was given."""

    workdir: Path
    address: str  # unix:PATH of the server's gRPC socket
    libvirt: dict[str, str]
    cache_root: Path
    serve: subprocess.Popen
    serve_log: Path
    clients: Any = None
    own_daemon: bool = False
    images_before: set[str] = field(default_factory=set)  # pool volumes that were there already
    log_mark: int = 0  # where in serve_log the current commit's messages begin


def _pool_volumes(libvirt_config: dict[str, str]) -> set[str]:
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open(libvirt_config["URI"])
    except libvirt.libvirtError:
        return set()
    try:
        pool = conn.storagePoolLookupByName(libvirt_config.get("Pool") or "mobykit")
        pool.refresh(0)
        return set(pool.listVolumes())
    except libvirt.libvirtError:
        return set()
    finally:
        conn.close()


def start_serve(workdir: Path, libvirt_config: dict[str, str], cache_root: Path,
                timeout: float = 60.0) -> tuple[subprocess.Popen, str, Path]:
    """``mobykit serve`` on ``unix:<workdir>/mobykit.sock`` (no Infrakit socket: nothing is written
    outside ``workdir``), as our child in its own session so Ctrl-C reaches only the demo, which
    then shuts things down in order."""
    import yaml

    config = workdir / "config.yml"
    # The server reads only what its operator allows; the demo's specs and recipes live in specs/.
    config.write_text(yaml.safe_dump({"providers": {"libvirt": libvirt_config}, "default_provider": "libvirt",
                                      "cache": str(cache_root), "allow_paths": [str(ROOT / "specs")]}))
    sock = workdir / "mobykit.sock"
    log = workdir / "serve.log"
    env = dict(os.environ, MOBYKIT_CACHE=str(cache_root))
    env.pop("MOBYKIT_CONFIG", None)
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mobykit.cli.main", "serve", "--listen", f"unix:{sock}", "--no-infrakit",
             "--config", str(config), "--store", f"file:{workdir}/state"],  # not the user's ~/.mobykit/state
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=workdir,
            start_new_session=True, text=True)
    # "listening on ..." then nothing more on stdout; read it in a thread so a hang cannot block us.
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while not any(line.startswith("listening on") for line in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            tail = log.read_text(errors="replace")[-2000:]
            raise Unavailable(f"mobykit serve did not start (exit status {proc.returncode}):\n{tail}")
        time.sleep(0.05)
    return proc, f"unix:{sock}", log


def stop_process(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM by PID, SIGKILL after ``grace``; always reaped."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@contextlib.contextmanager
def stack(*, libvirt_config: dict[str, str] | None = None, cache_root: Path | None = None,
          group_id: str = "demo", say: Say = _quiet) -> Iterator[Stack]:
    """A session libvirtd (unless ``libvirt_config`` names one) and ``mobykit serve``, each in a temp
    dir; on exit the group's VMs, the server, the daemon, the published images and the dirs go."""
    from mobykit.image.cache import default_root
    from mobykit.rpc.client import connect
    from mobykit.run import libvirtd

    cache_root = Path(cache_root or os.environ.get("MOBYKIT_CACHE") or default_root())
    workdir = Path(tempfile.mkdtemp(prefix="mobykit-demo-"))
    daemon = proc = serve = None
    st: Stack | None = None
    try:
        if libvirt_config is None:
            t = time.monotonic()
            # Not inside workdir: qemu's monitor socket path, deep under the daemon's dir, must fit
            # in the 108 bytes of a unix socket address.
            daemon, proc = libvirtd.start_libvirtd()
            libvirt_config = daemon.config
            say(f"libvirtd (session, pid {daemon.pid}) at {daemon.uri} ({time.monotonic() - t:.1f}s)")
        else:
            say(f"libvirt at {libvirt_config['URI']}")
        before = _pool_volumes(libvirt_config)
        serve, address, log = start_serve(workdir, libvirt_config, cache_root)
        say(f"mobykit serve (pid {serve.pid}) on {address}")
        st = Stack(workdir=workdir, address=address, libvirt=dict(libvirt_config), cache_root=cache_root,
                   serve=serve, serve_log=log, clients=connect(address, timeout=120), own_daemon=daemon is not None,
                   images_before=before)
        yield st
    finally:
        _teardown(st, group_id, serve, daemon, proc, libvirt_config, say)
        shutil.rmtree(workdir, ignore_errors=True)


def _teardown(st: Stack | None, group_id: str, serve, daemon, proc, libvirt_config, say: Say) -> None:
    """Every step runs even when an earlier one failed; another Ctrl-C or SIGTERM is held off meanwhile."""
    held = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in held}
    try:
        if st is not None:
            try:
                st.clients.group.destroy_group(group_id)
                say(f"group {group_id} destroyed")
            except MobykitError:
                pass  # never committed, or the server is gone: the provider sweep below covers it
            st.clients.close()
        if serve is not None:
            stop_process(serve)
        if libvirt_config is not None:
            left = _sweep(libvirt_config, group_id, st.images_before if st else None)
            if left:
                say(f"removed what was left: {', '.join(left)}")
        if daemon is not None:
            from mobykit.run import libvirtd

            libvirtd.stop_libvirtd(daemon, proc)
            say("libvirtd stopped")
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _sweep(libvirt_config: dict[str, str], group_id: str, images_before: set[str] | None) -> list[str]:
    """Destroy the group's VMs still there, and delete the image volumes the demo added to the pool."""
    import libvirt

    from mobykit.providers.libvirt import LibvirtProvider

    gone = []
    provider = LibvirtProvider(libvirt_config)
    try:
        for m in provider.list({GROUP_TAG: group_id}):
            provider.destroy(m.id)
            gone.append(m.id)
    except MobykitError:
        pass
    finally:
        provider.close()
    added = sorted(_pool_volumes(libvirt_config) - images_before) if images_before is not None else []
    added = [n for n in added if n.endswith((".kernel", ".initrd", ".cmdline"))]
    if added:
        try:
            conn = libvirt.open(libvirt_config["URI"])
        except libvirt.libvirtError:
            return gone
        try:
            pool = conn.storagePoolLookupByName(libvirt_config.get("Pool") or "mobykit")
            for name in added:
                with contextlib.suppress(libvirt.libvirtError):
                    pool.storageVolLookupByName(name).delete(0)
                    gone.append(name)
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()
    return gone


# -- step 3 and 4: commit and watch -------------------------------------------------------------


def group_spec(path: Path, image: Path):
    """The group spec at ``path`` with its flavor's ``Image`` set to ``image`` (absolute: the
    server resolves relative paths against its own working directory)."""
    from mobykit.group.spec import load

    cfg = load(path)
    spec = cfg.spec()
    props = copy.deepcopy(spec.properties)
    props["Flavor"]["Properties"]["Image"] = str(Path(image).resolve())
    spec.properties = props
    return spec


@dataclass
class VM:
    """One group member as the demo sees it."""

    id: str
    hash: str
    image: str
    health: str
    port: int | None


def snapshot(st: Stack, group_id: str, flavor_properties: Any) -> list[VM]:
    """The group's instances with their config hash, image, health (asked of the flavor, as the
    controller asks) and the host port of the demo service."""
    descs = st.clients.instance.describe_instances("libvirt", {GROUP_TAG: group_id}, True)
    out = []
    for d in descs:
        tags = d.tags or {}
        try:
            health = st.clients.flavor.healthy("moby", flavor_properties, d).name
        except MobykitError:
            health = "UNKNOWN"
        ports = (d.properties or {}).get("Ports") or {}
        out.append(VM(id=d.id, hash=tags.get(HASH_TAG, "?"), image=tags.get(IMAGE_TAG, "?"), health=health,
                      port=ports.get(GUEST_PORT)))
    return out


def fetch(port: int, path: str = "/", timeout: float = 3.0) -> str | None:
    """The body of GET http://127.0.0.1:PORT/PATH when it answers 200, else None."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "mobykit-demo"})
        r = conn.getresponse()
        body = r.read().decode(errors="replace")
        return body if r.status == 200 else None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def page_summary(port: int) -> str:
    """What a VM's demo service says: the page heading and the demo-version file."""
    page = fetch(port)
    if page is None:
        return "no answer"
    m = _H1.search(page)
    heading = m.group(1).strip() if m else page.strip()[:60]
    version = fetch(port, "/mobykit/demo-version")
    return f"{heading!r}" + (f", demo-version {version.strip()}" if version else "")


class Watcher:
    """Says what changed between two snapshots: provisioned, healthy, drained and destroyed."""

    def __init__(self, say: Say, current_hash: str):
        self.say = say
        self.current_hash = current_hash
        self.known: dict[str, VM] = {}
        self.latest: list[VM] = []
        self.min_healthy: int | None = None  # fewest HEALTHY seen in one listing since reset_counts
        self.listings = 0

    def prime(self, vms: list[VM]) -> None:
        """Start from these VMs without announcing them (they were there before the commit)."""
        self.known, self.latest = {v.id: v for v in vms}, vms

    def reset_counts(self) -> None:
        self.min_healthy, self.listings = None, 0

    def update(self, vms: list[VM]) -> None:
        now = {v.id: v for v in vms}
        for v in vms:
            old = self.known.get(v.id)
            tag = "new" if v.hash == self.current_hash else "old"
            if old is None:
                self.say(f"+ {v.id} provisioned ({tag} config {v.hash[:8]}, image {v.image[:19]}, "
                         f"port {v.port or '-'})")
            if v.health != (old.health if old else "UNKNOWN"):
                extra = f": {page_summary(v.port)}" if v.health == "HEALTHY" and v.port else ""
                if v.health == "UNHEALTHY" and tag == "old":
                    # An old instance the controller is draining and destroying stops answering
                    # (its console goes with it) before it leaves the listing.
                    extra = " (old config: being replaced)"
                self.say(f"  {v.id} {v.health}{extra}")
        for gone in sorted(set(self.known) - set(now)):
            self.say(f"- {gone} drained and destroyed")
        self.known, self.latest = now, vms
        healthy = sum(1 for v in vms if v.health == "HEALTHY")
        self.min_healthy = healthy if self.min_healthy is None else min(self.min_healthy, healthy)
        self.listings += 1


def wait_converged(st: Stack, spec, watcher: Watcher, *, timeout: float, interval: float = 1.0) -> list[VM]:
    """Poll until the controller says converged and every instance is HEALTHY on the committed
    config; FailedPrecondition (with the server log's tail) on timeout or an unhealthy instance."""
    from mobykit.group.hash import instance_hash

    size = spec.properties["Allocation"]["Size"]
    want = instance_hash(spec.properties)
    flavor_props = spec.properties["Flavor"]["Properties"]
    deadline = time.monotonic() + timeout
    while True:
        vms = snapshot(st, spec.id, flavor_props)
        watcher.update(vms)
        done = (len(vms) == size and all(v.hash == want and v.health == "HEALTHY" for v in vms)
                and st.clients.group.describe_group(spec.id).converged)
        if done:
            return vms
        sick = [v for v in vms if v.hash == want and v.health == "UNHEALTHY"]
        log = st.serve_log.read_text(errors="replace")
        # The controller stops provisioning after repeated failures and says so in its log only
        # (DescribeGroup has no field for it): no point waiting out the timeout then.
        gave_up = f"gave up group={spec.id} " in log[st.log_mark:]
        if sick or gave_up or time.monotonic() > deadline:
            why = (f"{sick[0].id} is UNHEALTHY" if sick else "the server gave up provisioning" if gave_up
                   else f"not converged after {timeout:.0f}s")
            console = ""
            if sick:
                with contextlib.suppress(Exception):
                    from mobykit.providers.libvirt import LibvirtProvider

                    p = LibvirtProvider(st.libvirt)
                    console = "\nits console ends:\n" + p.console_output(sick[0].id)[-1500:]
                    p.close()
            tail = log[-1500:]
            raise FailedPrecondition(f"group {spec.id}: {why}{console}\nserver log ends:\n{tail}")
        time.sleep(interval)


@dataclass
class PollStats:
    """What the availability poller saw: one round = one GET to every HEALTHY VM."""

    rounds: int = 0
    rounds_none_answered: int = 0
    min_answered: int | None = None
    requests: int = 0
    failures: int = 0
    pages: dict[str, int] = field(default_factory=dict)  # page heading/version -> answers


class Poller:
    """A thread fetching the demo page from every VM the latest listing calls HEALTHY."""

    def __init__(self, watcher: Watcher, interval: float = 0.5):
        self.watcher = watcher
        self.interval = interval
        self.stats = PollStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-poller", daemon=True)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        s = self.stats
        while not self._stop.is_set():
            ports = [v.port for v in self.watcher.latest if v.health == "HEALTHY" and v.port]
            if ports:
                answered = 0
                for port in ports:
                    page = fetch(port, "/mobykit/demo-version", timeout=2.0)
                    s.requests += 1
                    if page is None:
                        s.failures += 1
                        continue
                    answered += 1
                    s.pages[page.strip()] = s.pages.get(page.strip(), 0) + 1
                s.rounds += 1
                s.rounds_none_answered += answered == 0
                s.min_answered = answered if s.min_answered is None else min(s.min_answered, answered)
            self._stop.wait(self.interval)


@dataclass
class Timed:
    """How long a commit took against how long its new VMs took to boot, from the same run."""

    seconds: float  # commit -> done (a roll: the last old VM undefined; a converge: seen converged)
    boot: float  # median of the new VMs' domain start -> readiness line on the console
    min_ready: float = 0.0
    waves: int = 0  # 0: a converge, judged against one VM's boot
    timeline: list[str] = field(default_factory=list)  # each VM: started, ready, gone (s after the commit)
    destroy: float | None = None  # median, a new VM's MinReadySeconds over -> the old one undefined
    define: float | None = None  # median, an old VM undefined -> the next new one started

    @property
    def floor(self) -> float:
        """A roll as fast as this host's libvirt allows: waves x (boot + MinReady + destroy + define)."""
        return self.waves * (self.boot + self.min_ready + (self.destroy or 0) + (self.define or 0))

    @property
    def ideal(self) -> float:
        """A roll: waves x (boot + MinReady + 1 s to define and destroy); a converge: one boot."""
        return self.waves * (self.boot + self.min_ready + 1.0) if self.waves else self.boot

    @property
    def ratio(self) -> float:
        return self.seconds / self.ideal if self.ideal > 0 else float("inf")


@dataclass
class RollResult:
    vms: list[VM]
    stats: PollStats
    min_healthy: int
    listings: int
    seconds: float
    timed: Timed | None = None


def _boot_times(st: Stack):
    """``providers.libvirt.boottimes`` on the stack's libvirt, None when it cannot run here."""
    try:
        from mobykit.providers.libvirt.boottimes import BootTimes

        return BootTimes(st.libvirt).start()
    except Exception:  # noqa: BLE001 - a remote daemon, no inotify: the demo runs untimed
        return None


def _timeline(seen: dict, t0: float) -> list[str]:
    def at(x: float | None) -> str:
        return "-" if x is None else f"{x - t0:6.1f}"

    order = sorted(seen.values(), key=lambda d: (d.started is None, d.started or 0, d.name))
    return [f"{d.name}: started {at(d.started)} ready {at(d.ready)} gone {at(d.undefined)}" for d in order]


def _wave_costs(seen: dict, old: set[str], min_ready: float) -> tuple[float | None, float | None]:
    """Medians of what each wave spends past boot and MinReadySeconds: the old VM's destroy (from
    its replacement's MinReadySeconds running out to its undefine) and the next provision (from
    that undefine to the next new VM's start), from libvirt's events."""
    import statistics

    new = sorted((d for n, d in seen.items() if n not in old and d.started is not None), key=lambda d: d.started)
    gone = sorted(seen[n].undefined for n in old if n in seen and seen[n].undefined is not None)
    destroys = [g - (d.ready + min_ready) for d, g in zip(new, gone, strict=False) if d.ready is not None]
    defines = [d.started - g for g, d in zip(gone, new[1:], strict=False)]
    return (statistics.median(destroys) if destroys else None, statistics.median(defines) if defines else None)


def converge(st: Stack, spec, *, timeout: float = 300.0, say: Say = _quiet, interval: float = 1.0,
             timed: list[Timed] | None = None) -> list[VM]:
    """Commit ``spec`` and wait until its instances are all HEALTHY; shows each VM's page.
    ``timed`` receives the converge time against the VMs' boot time."""
    from mobykit.group.hash import instance_hash

    st.log_mark = len(st.serve_log.read_text(errors="replace"))
    clock = _boot_times(st)
    t = time.monotonic()
    try:
        say(st.clients.group.commit_group(spec, False))
        watcher = Watcher(say, instance_hash(spec.properties))
        vms = wait_converged(st, spec, watcher, timeout=timeout, interval=interval)
        seconds = time.monotonic() - t
        boot = clock.median_boot([v.id for v in vms]) if clock is not None else None
    finally:
        if clock is not None:
            clock.close()
    if boot:
        result = Timed(seconds, boot)
        if timed is not None:
            timed.append(result)
        say(f"converged: {len(vms)} HEALTHY in {seconds:.1f}s = {result.ratio:.2f}x one VM's boot to ready "
            f"({boot:.1f}s, median of the {len(vms)})")
    else:
        say(f"converged: {len(vms)} HEALTHY in {seconds:.0f}s")
    for v in vms:
        say(f"  {v.id}  http://127.0.0.1:{v.port}/  {page_summary(v.port) if v.port else 'no port'}")
    return vms


def roll(st: Stack, spec, *, timeout: float = 400.0, say: Say = _quiet, interval: float = 1.0) -> RollResult:
    """Commit ``spec`` over a converged group and follow the rolling update while polling. The
    result's ``timed``: from the commit to the last old VM's undefine, against 3 x (the new VMs'
    median boot to ready + MinReadySeconds + 1 s), all from this run (libvirt events and consoles)."""
    from mobykit.group.hash import instance_hash

    watcher = Watcher(say, instance_hash(spec.properties))
    flavor_props = spec.properties["Flavor"]["Properties"]
    watcher.prime(snapshot(st, spec.id, flavor_props))  # the serving VMs, before the commit
    old = set(watcher.known)
    clock = _boot_times(st)
    t = time.monotonic()
    try:
        with Poller(watcher) as poller:
            st.log_mark = len(st.serve_log.read_text(errors="replace"))
            say(st.clients.group.commit_group(spec, False))
            vms = wait_converged(st, spec, watcher, timeout=timeout, interval=interval)
        seconds = time.monotonic() - t
        timed = None
        if clock is not None:
            seen = clock.snapshot()
            ends = [seen[i].undefined for i in old if i in seen and seen[i].undefined is not None]
            boot = clock.median_boot([v.id for v in vms])
            if boot and len(ends) == len(old):
                updating = spec.properties.get("Updating") or {}
                min_ready = float(updating.get("MinReadySeconds") or 0)
                timed = Timed(max(ends) - t, boot, min_ready, len(old), _timeline(seen, t),
                              *_wave_costs(seen, old, min_ready))
    finally:
        if clock is not None:
            clock.close()
    s = poller.stats
    say(f"rolled to config {watcher.current_hash[:8]} in {seconds:.0f}s; "
        f"{watcher.listings} listings, never fewer than {watcher.min_healthy} HEALTHY")
    if timed is not None:
        say(f"roll: {timed.seconds:.1f}s from the commit to the last old VM gone = {timed.ratio:.2f}x "
            f"{timed.waves} x (boot to ready {timed.boot:.1f}s + MinReady {timed.min_ready:g}s + 1s) = "
            f"{timed.ideal:.1f}s (target <= 1.1x)")
        if timed.destroy is not None and timed.define is not None:
            say(f"  each wave past boot and MinReady: the old VM's destroy {timed.destroy:.1f}s, the next "
                f"provision {timed.define:.1f}s (libvirt's calls; {timed.seconds / timed.floor:.2f}x "
                f"{timed.waves} x (boot + MinReady + both) = {timed.floor:.1f}s)")
    verdict = "the demo service never stopped answering" if s.rounds and not s.rounds_none_answered \
        else f"the demo service was down in {s.rounds_none_answered} of {s.rounds} rounds"
    say(f"availability: {s.rounds} poll rounds, {s.requests} requests, {s.failures} failed "
        f"(a VM destroyed or not yet listening since the last listing), at least {s.min_answered} VM(s) answered each round: {verdict}")
    say("answers by demo-version: " + ", ".join(f"{k}: {n}" for k, n in sorted(s.pages.items())))
    for v in vms:
        say(f"  {v.id}  http://127.0.0.1:{v.port}/  {page_summary(v.port) if v.port else 'no port'}")
    return RollResult(vms=vms, stats=s, min_healthy=watcher.min_healthy or 0, listings=watcher.listings,
                      seconds=seconds, timed=timed)


# -- the whole show -----------------------------------------------------------------------------


def run(*, uri: str | None = None, cache_root: Path | None = None, say: Say = print) -> int:
    from mobykit.image.cache import Cache, default_root

    cache_root = Path(cache_root or os.environ.get("MOBYKIT_CACHE") or default_root())
    cache = Cache(cache_root)
    # The specs' @pkg: templates build the recipes they name into the cache on demand.
    v1, v2 = IMAGE_V1, IMAGE_V2
    say(f"1/5 building packages and images (cache {cache_root})")
    image1 = build_image(v1, cache=cache, say=say)
    image2 = build_image(v2, cache=cache, say=say)
    if image1.id == image2.id:
        raise SpecError("builds the same image as demo.yml: nothing would roll", file=str(IMAGE_V2))
    say("2/5 starting libvirt and mobykit serve")
    libvirt_config = {"URI": uri, "Pool": "mobykit"} if uri else None
    spec1, spec2 = group_spec(GROUP_SPEC, v1), group_spec(GROUP_SPEC, v2)
    with stack(libvirt_config=libvirt_config, cache_root=cache_root, group_id=spec1.id, say=say) as st:
        say(f"3/5 committing {GROUP_SPEC.relative_to(ROOT)} (3 VMs, image {image1.id[:19]})")
        converge(st, spec1, say=say)
        say(f"4/5 rolling to {IMAGE_V2.relative_to(ROOT)} (image {image2.id[:19]}), MaxSurge 1, MaxUnavailable 0")
        result = roll(st, spec2, say=say)
        say("5/5 tearing down")
    ok = result.stats.rounds > 0 and result.stats.rounds_none_answered == 0
    say("demo done" + ("" if ok else ": the service was not answering at some point (see above)"))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mobykit.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--uri", default=os.environ.get("MOBYKIT_LIBVIRT_URI"),
                   help="use this libvirt instead of a private session daemon (default $MOBYKIT_LIBVIRT_URI)")
    p.add_argument("--cache", type=Path, help="image cache (default $MOBYKIT_CACHE or ~/.cache/mobykit)")
    args = p.parse_args(argv)
    say = Printer()

    def terminated(_sig, _frame):
        raise KeyboardInterrupt  # the same orderly teardown as Ctrl-C (our children have their own session)

    signal.signal(signal.SIGTERM, terminated)
    try:
        return run(uri=args.uri, cache_root=args.cache, say=say)
    except KeyboardInterrupt:
        say("interrupted: everything the demo started is stopped and removed")
        return 130
    except MobykitError as e:
        say(f"error: {e}")
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
