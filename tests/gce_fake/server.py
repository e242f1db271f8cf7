"""The fake Compute Engine v1 REST API over HTTP, for the real google-cloud-compute client.

Routes (under ``/compute/v1/projects/{project}``): ``zones/{zone}``; ``zones/{zone}/instances``
(list, insert), ``.../instances/{name}`` (get, delete), ``.../setLabels``, ``.../setMetadata``,
``.../serialPort``; ``zones/{zone}/disks`` (list, insert), ``.../disks/{name}`` (get, delete;
``disks.py``); ``zones/{zone}/operations/{op}`` and ``.../wait``; ``global/images`` (list,
insert), ``global/images/{name}`` (get, delete); ``global/operations/{op}`` and ``.../wait``.
Lists take ``filter`` (``filters.py``), ``maxResults`` (default and maximum 500) and ``pageToken``.

Knobs a test turns at any time: ``latency`` (seconds slept before every answer), ``fault_rate``
(that share of calls answered 429, 500 or 503; for a mutation, half of those faults come *after*
the effect, i.e. a lost answer, which is what ``requestId`` exists for), ``seed``. ``calls`` records
(method, route, status) of every request.
"""

from __future__ import annotations

import base64
import json
import random
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from gce_fake import disks
from gce_fake.filters import FilterError, parse
from gce_fake.state import ApiError, World

_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (m, re.compile("^/compute/v1/projects/(?P<project>[^/]+)/" + p + "$"), name) for m, p, name in [
        ("GET", r"zones/(?P<zone>[^/]+)", "zones.get"),
        ("GET", r"zones/(?P<zone>[^/]+)/instances", "instances.list"),
        ("POST", r"zones/(?P<zone>[^/]+)/instances", "instances.insert"),
        ("GET", r"zones/(?P<zone>[^/]+)/instances/(?P<name>[^/]+)", "instances.get"),
        ("DELETE", r"zones/(?P<zone>[^/]+)/instances/(?P<name>[^/]+)", "instances.delete"),
        ("POST", r"zones/(?P<zone>[^/]+)/instances/(?P<name>[^/]+)/setLabels", "instances.setLabels"),
        ("POST", r"zones/(?P<zone>[^/]+)/instances/(?P<name>[^/]+)/setMetadata", "instances.setMetadata"),
        ("GET", r"zones/(?P<zone>[^/]+)/instances/(?P<name>[^/]+)/serialPort", "instances.getSerialPortOutput"),
        ("GET", r"zones/(?P<zone>[^/]+)/operations/(?P<op>[^/]+)", "zoneOperations.get"),
        ("POST", r"zones/(?P<zone>[^/]+)/operations/(?P<op>[^/]+)/wait", "zoneOperations.wait"),
        ("GET", r"zones/(?P<zone>[^/]+)/disks", "disks.list"),
        ("POST", r"zones/(?P<zone>[^/]+)/disks", "disks.insert"),
        ("GET", r"zones/(?P<zone>[^/]+)/disks/(?P<name>[^/]+)", "disks.get"),
        ("DELETE", r"zones/(?P<zone>[^/]+)/disks/(?P<name>[^/]+)", "disks.delete"),
        ("GET", r"global/images", "images.list"),
        ("POST", r"global/images", "images.insert"),
        ("GET", r"global/images/(?P<name>[^/]+)", "images.get"),
        ("DELETE", r"global/images/(?P<name>[^/]+)", "images.delete"),
        ("GET", r"global/operations/(?P<op>[^/]+)", "globalOperations.get"),
        ("POST", r"global/operations/(?P<op>[^/]+)/wait", "globalOperations.wait"),
    ]
]
MUTATIONS = {"instances.insert", "instances.delete", "instances.setLabels", "instances.setMetadata",
             "images.insert", "images.delete", "disks.insert", "disks.delete"}
FAULTS = ((429, "rateLimitExceeded", "Rate Limit Exceeded"), (500, "backendError", "Internal error"),
          (503, "backendError", "The service is currently unavailable."))
MAX_RESULTS = 500


@dataclass
class FakeCompute:
    """The fake's HTTP face over a ``World``; ``endpoint`` once started."""

    world: World = field(default_factory=World)
    latency: float = 0.0
    fault_rate: float = 0.0
    seed: int = 0
    wait_seconds: float = 0.02  # how long operations.wait holds an answer, as the real one blocks
    calls: list[tuple[str, str, int]] = field(default_factory=list)
    filters: list[str] = field(default_factory=list)  # the ``filter`` of every list call, in order

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._rng_lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    def start(self) -> FakeCompute:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return None

            def _serve(self) -> None:
                fake._handle(self)

            do_GET = do_POST = do_DELETE = _serve

        class Server(ThreadingHTTPServer):
            # socketserver's backlog of 5 drops the 6th simultaneous connect, which the client
            # retries a second later: a cloud API takes many at once.
            request_queue_size = 128

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="gce-fake", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(10)
            self._server = None

    def count(self, route: str, status: int | None = None) -> int:
        return sum(1 for _, r, s in list(self.calls) if r == route and (status is None or s == status))

    # -- one request ------------------------------------------------------------------------------

    def _draw_fault(self) -> tuple[tuple[int, str, str] | None, bool]:
        with self._rng_lock:
            hit = self._rng.random() < self.fault_rate
            fault = self._rng.choice(FAULTS)
            after = self._rng.random() < 0.5
        return (fault if hit else None), after

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        route, params = "", {}
        for method, pattern, name in _ROUTES:
            m = pattern.match(url.path)
            if m and method == h.command:
                route, params = name, {k: unquote(v) for k, v in m.groupdict().items()}
                break
        if self.latency:
            time.sleep(self.latency)
        fault, after = self._draw_fault()
        status, body = 200, {}
        try:
            if not route:
                raise ApiError(404, "notFound", f"no route for {h.command} {url.path}")
            if fault and not (after and route in MUTATIONS):
                raise ApiError(*fault[:1], fault[1], fault[2])
            payload = json.loads(raw) if raw else {}
            body = self._dispatch(route, params, query, payload)
            if fault:
                raise ApiError(fault[0], fault[1], fault[2])  # the effect happened; the answer is lost
        except ApiError as e:
            status, body = e.code, e.body()
        except (ValueError, KeyError) as e:
            status, body = 400, ApiError(400, "invalid", f"Invalid request: {e}").body()
        self.calls.append((h.command, route or url.path, status))
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json; charset=UTF-8")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _dispatch(self, route: str, p: dict[str, str], q: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        w, project = self.world, p.get("project", "")
        rid = q.get("requestId")
        if route.endswith("Operations.wait"):
            # The real wait blocks until DONE or about 2 minutes; it may answer earlier, not DONE.
            time.sleep(self.wait_seconds)
        with w.lock:
            if route == "zones.get":
                return w.zone(project, p["zone"])
            if route == "instances.list":
                self.filters.append(q.get("filter", ""))
                return self._page("compute#instanceList", w.list_instances(project, p["zone"]), q,
                                  f"projects/{project}/zones/{p['zone']}/instances")
            if route == "instances.insert":
                return w.insert_instance(project, p["zone"], body, rid)
            if route == "instances.get":
                return w.get_instance(project, p["zone"], p["name"])
            if route == "instances.delete":
                return w.delete_instance(project, p["zone"], p["name"], rid)
            if route == "instances.setLabels":
                return w.set_labels(project, p["zone"], p["name"], body, rid)
            if route == "instances.setMetadata":
                return w.set_metadata(project, p["zone"], p["name"], body, rid)
            if route == "instances.getSerialPortOutput":
                return w.serial_output(project, p["zone"], p["name"], int(q.get("start", "0")))
            if route in ("zoneOperations.get", "zoneOperations.wait"):
                w.zone(project, p["zone"])
                return w.poll(p["op"])
            if route in ("globalOperations.get", "globalOperations.wait"):
                return w.poll(p["op"])
            if route == "disks.list":
                self.filters.append(q.get("filter", ""))
                return self._page("compute#diskList", disks.list_disks(w, project, p["zone"]), q,
                                  f"projects/{project}/zones/{p['zone']}/disks")
            if route == "disks.insert":
                return disks.insert(w, project, p["zone"], body, rid)
            if route == "disks.get":
                return disks.get(w, project, p["zone"], p["name"])
            if route == "disks.delete":
                return disks.delete(w, project, p["zone"], p["name"], rid)
            if route == "images.list":
                return self._page("compute#imageList", w.list_images(project), q, f"projects/{project}/global/images")
            if route == "images.insert":
                return w.insert_image(project, body, rid)
            if route == "images.get":
                return w.get_image(project, p["name"])
            if route == "images.delete":
                return w.delete_image(project, p["name"], rid)
        raise ApiError(404, "notFound", route)

    @staticmethod
    def _page(kind: str, items: list[dict[str, Any]], q: dict[str, str], where: str) -> dict[str, Any]:
        try:
            keep = parse(q.get("filter", ""))
        except FilterError as e:
            raise ApiError(400, "invalid", str(e)) from None
        size = int(q.get("maxResults", MAX_RESULTS))
        if not 0 < size <= MAX_RESULTS:
            raise ApiError(400, "invalid", f"Invalid value for field 'maxResults': {size}. Must be in [0, 500].")
        selected = [i for i in items if keep(i)]
        start = 0
        if q.get("pageToken"):
            try:
                start = int(base64.urlsafe_b64decode(q["pageToken"]).decode().removeprefix("offset:"))
            except ValueError:
                raise ApiError(400, "invalid", "Invalid value for field 'pageToken'") from None
        out: dict[str, Any] = {"kind": kind, "id": where, "items": selected[start:start + size],
                               "selfLink": f"https://www.googleapis.com/compute/v1/{where}"}
        if start + size < len(selected):
            out["nextPageToken"] = base64.urlsafe_b64encode(f"offset:{start + size}".encode()).decode()
        return out


@contextmanager
def running(fake: FakeCompute | None = None) -> Iterator[FakeCompute]:
    """A started fake, stopped on the way out."""
    fake = (fake or FakeCompute()).start()
    try:
        yield fake
    finally:
        fake.stop()
