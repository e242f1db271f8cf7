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
