"""libvirt domain events for this process: one event loop thread, and subscriptions per connection.

Why: a listing's cost is mostly per domain (its metadata read and parsed, its state read: two
daemon round trips and an XML parse each). The listing cache (``cache.py``) keeps what it derived
from a domain until libvirt says the domain changed; these events are how it hears that.

libvirt delivers events only through an event loop registered *before* a connection is opened
(the remote driver hooks its socket and keepalive timer into it at open), so the provider calls
``ensure_loop`` before every ``libvirt.open``. The loop is libvirt's default implementation, run by
one daemon thread for the whole process (libvirt allows one implementation per process). When the
loop cannot start, or a driver cannot deliver events, ``subscribe`` returns None and the cache
checks every domain on every listing instead: events only save work, correctness never needs them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mobykit.providers.libvirt.binding import libvirt

log = logging.getLogger("mobykit.providers.libvirt")

_lock = threading.Lock()
_thread: threading.Thread | None = None
_failed = False


def ensure_loop() -> bool:
    """Register libvirt's default event loop and start its thread, once per process. False when
    it cannot run (then no connection gets events)."""
    global _thread, _failed
    with _lock:
        if _thread is not None:
            return _thread.is_alive()
        if _failed:
            return False
        lv = libvirt()
        try:
            if lv.virEventRegisterDefaultImpl() < 0:
                raise lv.libvirtError("virEventRegisterDefaultImpl failed")
        except lv.libvirtError as e:
            log.warning("libvirt events unavailable (listings re-read every domain): %s", e)
            _failed = True
            return False
        _thread = threading.Thread(target=_run, name="libvirt-events", daemon=True)
        _thread.start()
        return True


def loop_running() -> bool:
    """True while the event loop thread runs (a subscription is only as good as its loop)."""
    return _thread is not None and _thread.is_alive()


def _run() -> None:
    lv = libvirt()
    while True:
        try:
            if lv.virEventRunDefaultImpl() < 0:
                raise lv.libvirtError("virEventRunDefaultImpl failed")
        except Exception:  # noqa: BLE001 - the thread ends; caches see loop_running() false
            log.exception("libvirt event loop stopped; listings re-read every domain from now on")
            return


@dataclass
class Subscription:
    """The domain event callbacks registered on one connection; ``cancel`` removes them."""

    conn: Any
    callback_ids: list[int] = field(default_factory=list)
    close_callback: bool = False

    def cancel(self) -> None:
        lv = libvirt()
        for cid in self.callback_ids:
            try:
                self.conn.domainEventDeregisterAny(cid)
            except lv.libvirtError:
                pass  # the connection is gone already: so are its callbacks
        self.callback_ids.clear()
        if self.close_callback:
            try:
                self.conn.unregisterCloseCallback()
            except lv.libvirtError:
                pass
            self.close_callback = False


def subscribe(conn: Any, changed: Callable[[str], None], lost: Callable[[], None]) -> Subscription | None:
    """Call ``changed(domain UUID)`` whenever a domain on ``conn`` changes state or definition
    (lifecycle events) or metadata (metadata-change events), and ``lost()`` when the connection
    closes (its events stop). None when the driver cannot deliver both kinds of event: a cache
    told only of lifecycle changes would miss a retag made by another client."""
    if not loop_running():
        return None
    lv = libvirt()
    sub = Subscription(conn)

    def on_lifecycle(_conn: Any, dom: Any, _event: int, _detail: int, _opaque: Any) -> None:
        changed(dom.UUIDString())

    def on_metadata(_conn: Any, dom: Any, _type: int, _nsuri: str | None, _opaque: Any) -> None:
        changed(dom.UUIDString())

    try:
        sub.callback_ids.append(
            conn.domainEventRegisterAny(None, lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None))
        sub.callback_ids.append(
            conn.domainEventRegisterAny(None, lv.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, on_metadata, None))
    except (lv.libvirtError, AttributeError) as e:  # AttributeError: a libvirt-python before 3.0
        log.info("libvirt %s: no domain events (%s); listings re-read every domain", conn.getURI(), e)
        sub.cancel()
        return None
    try:
        conn.registerCloseCallback(lambda _conn, _reason, _opaque: lost(), None)
        sub.close_callback = True
    except lv.libvirtError:
        pass  # in-process drivers never close behind our back
    return sub
