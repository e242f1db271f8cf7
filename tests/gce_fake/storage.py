"""Cloud Storage for the tests: ``gcp-storage-emulator`` (PyPI) on a free loopback port, in memory,
reached by google-cloud-storage through ``STORAGE_EMULATOR_HOST``."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote


@dataclass
class Storage:
    endpoint: str
    server: Any

    def exists(self, bucket: str, name: str) -> bool:
        """What GCE's image import asks of ``rawDisk.source``: is the object there?"""
        url = f"{self.endpoint}/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status == 200
        except urllib.error.HTTPError:
            return False

    def objects(self, bucket: str) -> list[str]:
        import json

        with urllib.request.urlopen(f"{self.endpoint}/storage/v1/b/{quote(bucket, safe='')}/o", timeout=10) as r:
            return [o["name"] for o in json.load(r).get("items", [])]


@contextmanager
def emulator(bucket: str) -> Iterator[Storage]:
    """A started emulator holding ``bucket``; stopped on the way out."""
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", 0, in_memory=True, default_bucket=bucket)
    server.start()
    try:
        port = server._api._httpd.server_address[1]  # bound by the OS: no port guessed
        yield Storage(f"http://127.0.0.1:{port}", server)
    finally:
        server.stop()


class FaultProxy:
    """Cloud Storage with faults: forwards to the emulator, answering ``fault_rate`` of the calls
    with 503 or 429, half of them after forwarding (the effect happened, the answer is lost).
    Point ``STORAGE_EMULATOR_HOST`` at ``endpoint``."""

    def __init__(self, upstream: str, fault_rate: float = 0.0, seed: int = 0):
        import random
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        self.upstream = urlsplit(upstream)
        self.fault_rate = fault_rate
        self.faults = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return None

            def _serve(self) -> None:
                proxy._forward(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        class Server(ThreadingHTTPServer):
            request_queue_size = 128
            daemon_threads = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="gcs-faults", daemon=True)
        self._thread.start()

    def _forward(self, h: Any) -> None:
        import http.client

        with self._lock:
            fault = self._rng.random() < self.fault_rate
            status = self._rng.choice((429, 503))
            after = self._rng.random() < 0.5
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        answer: tuple[int, list[tuple[str, str]], bytes]
        if fault and not after:
            answer = (status, [], b'{"error": {"code": %d, "message": "injected"}}' % status)
        else:
            conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
            try:
                headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(h.command, h.path, body=body, headers=headers)
                r = conn.getresponse()
                answer = (r.status, [(k, v) for k, v in r.getheaders()
                                     if k.lower() not in ("content-length", "transfer-encoding", "connection")],
                          r.read())
            finally:
                conn.close()
            if fault:
                answer = (status, [], b'{"error": {"code": %d, "message": "injected after"}}' % status)
        if fault:
            with self._lock:
                self.faults += 1
        code, headers_out, data = answer
        h.send_response(code)
        for k, v in headers_out:
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
