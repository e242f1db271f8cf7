"""``etcd://HOST:PORT[,HOST:PORT...]``: the store shared by several replicas, on etcd v3.

Client: ``etcd3gw`` (OpenStack), which speaks etcd's own v3 JSON gRPC gateway (``/v3/kv``,
``/v3/lease``, ``/v3/watch``) over ``requests``. Chosen because it is maintained, works with
etcd 3.3+ (Debian 12 ships 3.4), and needs no protobuf/grpcio of its own: the ``etcd3`` package
pins protobuf 3 and is unmaintained, and generating stubs from etcd's rpc.proto would pull in
gogoproto and google.api annotations just to get the same calls. We use its request plumbing
(sessions, TLS, error mapping) and send etcd's documented JSON bodies ourselves where we need a
field it does not expose (txn compares on the leader key, watch from a revision with progress).

Keys (under ``/mobykit/``): ``format`` (the store's format version), ``groups/<id>`` (one
record per group), ``leader`` (held with a lease by the replica that runs the controllers).
Every write is a txn: a commit compares the record's mod_revision (no lost update between two
replicas), and the leader's own writes also compare the leader key's create_revision (its term),
so a deposed leader's late write fails instead of overwriting its successor's.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import requests

from mobykit.errors import InvalidArgument, Unavailable
from mobykit.group.store.base import FORMAT_VERSION, Event, GroupRecord, Guard, StoreError
from mobykit.group.store.codec import check_format, decode, encode

log = logging.getLogger("mobykit.store")

PREFIX = "/mobykit/"
FORMAT_KEY = PREFIX + "format"
GROUPS = PREFIX + "groups/"
LEADER_KEY = PREFIX + "leader"
REQUEST_TIMEOUT = 2.0  # seconds: below any sensible lease TTL, so a hung member cannot outlive a lease


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def unb64(data: str) -> bytes:
    return base64.b64decode(data)


def prefix_end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return bytes(raw).decode()


def parse_endpoints(url: str) -> tuple[str, list[tuple[str, int]]]:
    scheme, _, rest = url.partition("://")
    protocol = "https" if scheme == "etcds" else "http"
    out = []
    for part in rest.strip("/").split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise InvalidArgument(f"store {url!r}: expected {scheme}://HOST:PORT[,HOST:PORT...], got {part!r}")
        out.append((host.strip("[]"), int(port)))
    return protocol, out


class EtcdClient:
    """etcd3gw clients for every endpoint; a call that cannot reach one member goes to the next
    (a stopped member must not stop the replicas while the others hold a quorum)."""

    def __init__(self, url: str, tls: dict[str, str] | None = None, timeout: float = REQUEST_TIMEOUT):
        import etcd3gw

        self.url = url
        self.protocol, self.endpoints = parse_endpoints(url)
        tls = tls or {}
        self.clients = [etcd3gw.client(host=h, port=p, protocol=self.protocol, timeout=timeout, api_path="/v3/",
                                       ca_cert=tls.get("ca"), cert_cert=tls.get("cert"), cert_key=tls.get("key"))
                        for h, p in self.endpoints]
        self._current = 0
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        h, p = self.endpoints[self._current]
        return f"{h}:{p}"

    def _members(self):
        """(index, client) of each member once, starting with the last one that answered."""
        for i in range(len(self.clients)):
            with self._lock:
                idx = (self._current + i) % len(self.clients)
            yield idx, self.clients[idx]

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST one v3 gateway request, trying each member once starting with the last good one."""
        from etcd3gw import exceptions as ex

        errors = []
        for idx, c in self._members():
            try:
                out = c.post(c.get_url(path), json=body)
            except (ex.ConnectionFailedError, ex.ConnectionTimeoutError) as e:
                why = "timed out" if isinstance(e, ex.ConnectionTimeoutError) else "connection failed"
                if "refused" in (e.detail_text or ""):
                    why = "connection refused"
                errors.append(f"{self.endpoints[idx][0]}:{self.endpoints[idx][1]}: {why}")
                continue
            except ex.Etcd3Exception as e:
                detail = (e.detail_text or "").strip()[:200]
                raise Unavailable(f"store {self.url}: etcd refused {path}: {detail or type(e).__name__}") from None
            with self._lock:
                self._current = idx
            return out
        raise Unavailable(f"store {self.url}: cannot reach etcd ({'; '.join(errors)})")

    def stream(self, body: dict[str, Any]) -> requests.Response:
        """Open a watch stream on the current member (or the next that answers)."""
        errors = []
        for _idx, c in self._members():
            try:
                r = c.session.post(c.get_url("/watch"), json=body, stream=True, timeout=(REQUEST_TIMEOUT, None))
                r.raise_for_status()
                return r
            except requests.RequestException as e:
                errors.append(str(e)[:120])
        raise Unavailable(f"store {self.url}: cannot watch ({'; '.join(errors)})")

    # -- leases and the leader key (mobykit.group.leader) --------------------------------------

    def grant(self, ttl: int) -> tuple[int, int]:
        r = self.call("/lease/grant", {"TTL": ttl})
        return int(r["ID"]), int(r.get("TTL", ttl))

    def keepalive(self, lease: int) -> int:
        """The lease's new TTL, or -1 when it has already expired."""
        r = self.call("/lease/keepalive", {"ID": lease})
        return int(r.get("result", {}).get("TTL", -1))

    def revoke(self, lease: int) -> None:
        self.call("/kv/lease/revoke", {"ID": lease})

    def range(self, key: str, end: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"key": b64(key)}
        if end:
            body["range_end"] = b64(end)
        return self.call("/kv/range", body)

    def txn(self, compare: list[dict], success: list[dict], failure: list[dict] | None = None) -> dict[str, Any]:
        return self.call("/kv/txn", {"compare": compare, "success": success, "failure": failure or []})


def watch_stream(client: EtcdClient, key: str, end: str | None, start_revision: int,
                 on_events: Callable[[list[dict], int], None], stop: threading.Event,
                 on_compacted: Callable[[], int] | None = None) -> None:
    """Follow ``key`` (up to ``end``) from ``start_revision`` until ``stop``: reconnect (to another
    member if need be) and resume after the last revision seen, so no change is missed."""
    rev = start_revision
    while not stop.is_set():
        body: dict[str, Any] = {"create_request": {"key": b64(key), "start_revision": rev, "progress_notify": True}}
        if end:
            body["create_request"]["range_end"] = b64(end)
        try:
            resp = client.stream(body)
        except Unavailable:
            stop.wait(0.2)
            continue
        try:
            for line in resp.iter_lines(chunk_size=None):
                if stop.is_set():
                    break
                if not line.strip():
                    continue
                result = json.loads(line).get("result", {})
                if int(result.get("compact_revision", 0) or 0) > 0 and on_compacted is not None:
                    rev = on_compacted()  # too far behind: the caller re-reads everything
                    break
                events = result.get("events") or []
                header_rev = int(result.get("header", {}).get("revision", 0) or 0)
                if events:
                    on_events(events, header_rev)
                    rev = max(rev, max(int(e["kv"]["mod_revision"]) for e in events) + 1)
        except (requests.RequestException, ValueError, AttributeError) as e:
            log.debug("watch of %s broke: %s", key, e)
        finally:
            resp.close()
        stop.wait(0.05)


class EtcdStore:
    def __init__(self, client: EtcdClient):
        self.client = client
        self.url = client.url
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @classmethod
    def open(cls, url: str, tls: dict[str, str] | None = None) -> EtcdStore:
        store = cls(EtcdClient(url, tls))
        store._check_format()
        return store

    def _check_format(self) -> None:
        r = self.client.range(FORMAT_KEY)
        kvs = r.get("kvs") or []
        if kvs:
            where = f"{self.url} key {FORMAT_KEY}"
            try:
                doc = json.loads(unb64(kvs[0].get("value", "")))
            except ValueError:
                raise StoreError(f"{where}: corrupt store (not JSON); nothing was changed") from None
            check_format(doc.get("format") if isinstance(doc, dict) else None, where)
            return
        value = b64(json.dumps({"format": FORMAT_VERSION}))
        self.client.txn([{"key": b64(FORMAT_KEY), "target": "CREATE", "create_revision": "0"}],
                        [{"request_put": {"key": b64(FORMAT_KEY), "value": value}}])
        self._check_format()  # another replica may have raced us with another version

    def _decode(self, kv: dict[str, Any]) -> GroupRecord:
        key = unb64(kv["key"]).decode()
        return decode(unb64(kv.get("value", "")), f"{self.url} key {key}", int(kv["mod_revision"]))

    def load(self) -> dict[str, GroupRecord]:
        self._check_format()
        r = self.client.range(GROUPS, prefix_end(GROUPS))
        self.revision = int(r["header"]["revision"])
        return {rec.id: rec for rec in (self._decode(kv) for kv in r.get("kvs") or [])}

    def get(self, id: str) -> GroupRecord | None:
        kvs = self.client.range(GROUPS + id).get("kvs") or []
        return self._decode(kvs[0]) if kvs else None

    def put(self, record: GroupRecord, *, expect: int | None = None, guard: Guard | None = None) -> bool:
        key = b64(GROUPS + record.id)
        compare = []
        if expect is not None:
            compare.append({"key": key, "target": "MOD", "mod_revision": str(expect)})
        if guard is not None:
            compare.extend(guard.condition())
        r = self.client.txn(compare, [{"request_put": {"key": key, "value": b64(encode(record))}}])
        if not r.get("succeeded"):
            return False
        record.revision = int(r["header"]["revision"])
        return True

    def delete(self, id: str) -> bool:
        r = self.client.call("/kv/deleterange", {"key": b64(GROUPS + id)})
        return int(r.get("deleted", 0) or 0) > 0

    def watch(self, callback: Callable[[Event], None]) -> None:
        start = getattr(self, "revision", None)
        if start is None:
            self.load()
            start = self.revision

        def on_events(events: list[dict], _rev: int) -> None:
            for e in events:
                kv = e["kv"]
                id = unb64(kv["key"]).decode()[len(GROUPS):]
                if e.get("type") == "DELETE":
                    callback(Event(id, None))
                    continue
                try:
                    callback(Event(id, self._decode(kv)))
                except StoreError as err:
                    log.error("ignoring a store record: %s", err)

        def compacted() -> int:
            for rec in self.load().values():
                callback(Event(rec.id, rec))
            return self.revision + 1

        t = threading.Thread(target=watch_stream, name="store-watch", daemon=True,
                             args=(self.client, GROUPS, prefix_end(GROUPS), start + 1, on_events, self._stop, compacted))
        t.start()
        self._threads.append(t)

    def close(self) -> None:
        self._stop.set()
