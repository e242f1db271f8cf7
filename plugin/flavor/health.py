"""How the moby flavor decides an instance is healthy: its console, its provider state, a port.

Our init prints ``mobykit: ready sha256:<image id>`` on the serial console when every onboot step
succeeded and services started, and ``mobykit: not ready`` when one failed. The console is the one
channel every provider has (libvirt's console file, EC2 GetConsoleOutput, GCE serial port), so the
flavor reads it through the provider rather than reaching into the guest.

Which provider holds an instance: a Healthy request carries only the instance Description, not the
instance plugin's name. ``ProviderProbe`` therefore takes a resolver from provider name to provider
(``InstanceCore.provider``, injected by the server so the flavor shares the core's connections) and
asks the configured providers in turn, remembering which one answered for each id.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from mobykit.errors import InvalidArgument, MobykitError, NotFound

READY = "mobykit: ready"
# "not ready" is what our init says when a step failed; "init failed" is its wording for a crash
# before the step list (also what the memory provider prints for an injected boot failure).
NOT_READY = ("mobykit: not ready", "mobykit: init failed")


class InstanceProbe(Protocol):
    """What the flavor needs from wherever the instance runs."""

    def console_output(self, instance_id: str) -> str:
        """The console so far; NotFound when the instance is gone."""

    def state(self, instance_id: str) -> str | None:
        """The provider's state (``mobykit.providers.base.STATES``), None when it is gone."""


def console_verdict(text: str, image_id: str | None) -> bool | None:
    """True when the last readiness line says ready (for ``image_id`` when known), False when it
    says not ready, None when there is none yet. The last line wins, so a guest can withdraw."""
    last: bool | None = None
    for line in text.splitlines():
        line = line.strip().replace("\x00", "")
        if any(bad in line for bad in NOT_READY):
            last = False
            continue
        at = line.find(READY)
        if at < 0:
            continue
        said = line[at + len(READY):].strip().split()
        if image_id and said and said[0] != image_id:
            continue  # a ready line from another image (e.g. before a rolling update) does not count
        last = True
    return last


class ConsoleScanner:
    """``console_verdict`` over a console that arrives in pieces (a followed console file): keeps
    the verdict of the complete lines seen so far and the unfinished last line, not the text."""

    def __init__(self, image_id: str | None):
        self.image_id = image_id
        self._done: bool | None = None  # the verdict of the complete lines
        self._partial = ""

    def feed(self, text: str) -> bool | None:
        """Add ``text``; returns the verdict of everything fed so far (as ``console_verdict``)."""
        if text:
            data = self._partial + text
            cut = data.rfind("\n")
            if cut >= 0:
                said = console_verdict(data[:cut], self.image_id)
                if said is not None:
                    self._done = said
                data = data[cut + 1:]
            self._partial = data[-4096:]  # a readiness line is short: a runaway one is not kept whole
        return self.verdict

    @property
    def verdict(self) -> bool | None:
        said = console_verdict(self._partial, self.image_id) if self._partial else None
        return self._done if said is None else said


def tcp_open(port: int, timeout: float = 2.0) -> bool:
    """A TCP connection to 127.0.0.1:``port`` is accepted and not reset at once (user-mode
    networking accepts on the host side even when the guest refuses, then closes)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(0.2)
            try:
                data = s.recv(1, socket.MSG_PEEK)
            except TimeoutError:
                return True  # open and quiet: a server waiting for us to speak
            return data != b""  # b"" means the far side closed: nothing listens in the guest
    except OSError:
        return False


def http_ok(port: int, path: str = "/", timeout: float = 3.0) -> bool:
    """GET http://127.0.0.1:``port````path`` answers 2xx or 3xx."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "mobykit-health"})
        return 200 <= conn.getresponse().status < 400
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


class ProviderProbe:
    """An InstanceProbe over named providers (``resolve(name) -> Provider``), tried in ``names`` order."""

    def __init__(self, resolve: Callable[[str], Any], names: Sequence[str]):
        self.resolve = resolve
        self.names = list(dict.fromkeys(names))
        self._where: dict[str, str] = {}
        self._lock = threading.Lock()

    def _providers(self, instance_id: str):
        with self._lock:
            first = self._where.get(instance_id)
        order = ([first] if first else []) + [n for n in self.names if n != first]
        for name in order:
            try:
                yield name, self.resolve(name)
            except (MobykitError, ImportError):
                continue  # not available on this server

    def console_output(self, instance_id: str) -> str:
        for name, provider in self._providers(instance_id):
            try:
                text = provider.console_output(instance_id)
            except NotFound:
                continue
            except InvalidArgument:
                continue  # an id this provider cannot even parse
            with self._lock:
                self._where[instance_id] = name
            return text
        raise NotFound(f"instance {instance_id!r} not found on {', '.join(self.names)}")

    def follow_console(self, instance_id: str, output: Callable[[str | None], None]) -> Callable[[], None] | None:
        """Follow the console through the provider that last answered ``console_output`` for this
        id (``providers.base.FollowsConsole``); None when it cannot (then the caller polls)."""
        with self._lock:
            name = self._where.get(instance_id)
        if name is None:
            return None
        try:
            follow = getattr(self.resolve(name), "follow_console", None)
        except (MobykitError, ImportError):
            return None
        if not callable(follow):
            return None
        try:
            return follow(instance_id, output)
        except (NotFound, InvalidArgument):
            return None

    def _machine(self, instance_id: str):
        for name, provider in self._providers(instance_id):
            try:
                machines = provider.list({})
            except MobykitError:
                continue
            for m in machines:
                if m.id == instance_id:
                    with self._lock:
                        self._where[instance_id] = name
                    return m
        return None

    def state(self, instance_id: str) -> str | None:
        m = self._machine(instance_id)
        return m.state if m is not None else None

    def published_ports(self, instance_id: str) -> dict[str, int] | None:
        """The instance's published ports (``Ports``: guest port -> port on 127.0.0.1), None when
        the instance is not found; {} when it publishes none."""
        m = self._machine(instance_id)
        if m is None:
            return None
        ports = (m.properties or {}).get("Ports")
        return dict(ports) if isinstance(ports, dict) else {}


def host_port(published: dict[str, Any] | None, port: int) -> int:
    """Where a health probe of ``port`` goes on 127.0.0.1: the host port the instance publishes
    its guest port ``port`` on (``Publish: ["0:2379"]`` gives each member a port of its own), else
    ``port`` itself (a fixed ``Publish: ["8080:80"]`` probed as 8080, or a port the host serves)."""
    mapped = (published or {}).get(str(port))
    return mapped if isinstance(mapped, int) and not isinstance(mapped, bool) and 0 < mapped < 65536 else port
