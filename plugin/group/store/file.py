"""``file:DIR``: the embedded store of a single server.

One JSON file per group under ``DIR/groups``, each replaced atomically (written to a temp file in
the same directory, fsync'd, renamed over the old one, the directory fsync'd): after a kill -9 at
any point a group's file is either the old record or the new one, never a mix. Temp files a killed
server left behind are ignored. ``DIR/.lock`` is flock'd for the server's lifetime, so a second
server on the same directory is refused by name instead of two controllers fighting over one group.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from mobykit.group.store.base import FORMAT_VERSION, Event, GroupRecord, Guard, StoreError
from mobykit.group.store.codec import check_format, decode, encode

_SUFFIX = ".json"
_TMP = ".tmp-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{_TMP}{path.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


class FileStore:
    def __init__(self, root: Path, url: str | None = None):
        self.root = root
        self.url = url or f"file:{root}"
        self._lock = threading.Lock()
        self._revisions: dict[str, int] = {}
        self._lock_fd: int | None = None
        self._open()

    def _open(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "groups").mkdir(exist_ok=True)
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StoreError(f"store {self.url}: cannot open {self.root}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreError(f"store {self.url}: in use by another mobykit serve (pid {holder}); one server per "
                             "file: store (use etcd:// for several)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        try:
            fmt = self.root / "format"
            if fmt.exists():
                try:
                    doc = json.loads(fmt.read_text())
                except ValueError:
                    raise StoreError(f"{fmt}: corrupt store (format file is not JSON); nothing was changed") from None
                check_format(doc.get("format") if isinstance(doc, dict) else None, str(fmt))
            else:
                atomic_write(fmt, json.dumps({"format": FORMAT_VERSION}).encode() + b"\n")
        except BaseException:
            self.close()
            raise

    def _path(self, id: str) -> Path:
        return self.root / "groups" / (urllib.parse.quote(id, safe="") + _SUFFIX)

    def load(self) -> dict[str, GroupRecord]:
        out: dict[str, GroupRecord] = {}
        for p in sorted((self.root / "groups").iterdir()):
            if p.name.startswith(_TMP) or not p.name.endswith(_SUFFIX):
                continue  # a write a kill interrupted: the old file is still whole
            rec = self._read(p)
            out[rec.id] = rec
        return out

    def _read(self, p: Path) -> GroupRecord:
        try:
            data = p.read_bytes()
        except OSError as e:
            raise StoreError(f"{p}: cannot read store record: {e.strerror}") from None
        with self._lock:
            rev = self._revisions.setdefault(urllib.parse.unquote(p.name[: -len(_SUFFIX)]), 1)
        rec = decode(data, str(p), rev)
        if self._path(rec.id) != p:
            raise StoreError(f"{p}: corrupt store record (holds group {rec.id!r}); nothing was changed")
        return rec

    def get(self, id: str) -> GroupRecord | None:
        p = self._path(id)
        return self._read(p) if p.exists() else None

    def put(self, record: GroupRecord, *, expect: int | None = None, guard: Guard | None = None) -> bool:
        with self._lock:
            current = self._revisions.get(record.id, 1 if self._path(record.id).exists() else 0)
            if expect is not None and expect != current:
                return False
            atomic_write(self._path(record.id), encode(record))
            self._revisions[record.id] = current + 1
            record.revision = current + 1
            return True

    def delete(self, id: str) -> bool:
        with self._lock:
            p = self._path(id)
            if not p.exists():
                return False
            p.unlink()
            _fsync_dir(p.parent)
            self._revisions.pop(id, None)
            return True

    def watch(self, callback: Callable[[Event], None]) -> None:
        """One server per file store: there is nobody else whose writes could be watched."""

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
