"""Which files a request may make the server read: the one check every entry point goes through.

Why this exists: a spec, a flavor's ``Image``, a ``files: source:``, an ``@pkg:`` recipe, a libvirt
``Kernel``/``Initrd`` all name paths, and when the server builds or boots them it reads those files
with its own rights (root, in the container image and in ``make demo``). A local ``mobykit build``
reading its own user's files is fine; a server reading files named by its clients is not. So
``mobykit serve`` installs a policy (``--allow-path DIR``, config ``allow_paths``, default the
config file's directory) and every read of a request-named path asks this module:

- ``resolve`` makes the path absolute (relative paths against the caller's base, else the first
  root), resolves every symlink and ``..``, and refuses it when the result leaves the roots;
- ``open_file`` does that, then opens the file once and checks *the opened file* (its real path
  from ``/proc/self/fd`` and that it is a regular file), so a symlink swapped in between the check
  and the open is caught; callers read from the returned handle, never from the path again;
- ``check_dir`` is ``resolve`` for a directory (recipe directories).

The policy is process-wide, not per call: the group controller builds images in its own threads
long after the request that committed the spec returned, and those builds must be held to the
same roots. Without ``install`` (the CLI) every path is allowed, as for any local tool.
Refusals name the field, the path and the roots, and are InvalidArgument (gRPC INVALID_ARGUMENT,
JSON-RPC -32000), or SpecError with file:line when the path was written in a spec.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mobykit.errors import InvalidArgument, MobykitError, SpecError


@dataclass(frozen=True)
class PathPolicy:
    """``roots`` are real (symlink-free) absolute directories; ``None`` means no restriction."""

    roots: tuple[Path, ...] | None = None

    @classmethod
    def under(cls, dirs: Sequence[str | Path]) -> PathPolicy:
        """A policy allowing ``dirs`` (each must exist and be a directory)."""
        if not dirs:
            raise InvalidArgument("allow_paths: at least one directory is needed")
        roots: list[Path] = []
        for d in dirs:
            real = Path(os.path.realpath(os.path.expanduser(str(d))))
            if not real.is_dir():
                raise InvalidArgument(f"allow_paths: {d}: not a directory")
            if real not in roots:
                roots.append(real)
        return cls(tuple(roots))

    @property
    def restricted(self) -> bool:
        return self.roots is not None

    def base(self) -> Path:
        """Where a relative path in a request (or in an inline spec) is taken from."""
        return self.roots[0] if self.roots else Path.cwd()

    def allows(self, real: str | Path) -> bool:
        if self.roots is None:
            return True
        p = Path(real)
        return any(p == r or r in p.parents for r in self.roots)

    def describe(self) -> str:
        return "any path" if self.roots is None else ", ".join(str(r) for r in self.roots)


_lock = threading.Lock()
_policy = PathPolicy()


def install(policy: PathPolicy) -> None:
    """Make ``policy`` the server's (``mobykit serve`` calls this once, before serving)."""
    global _policy
    with _lock:
        _policy = policy


def current() -> PathPolicy:
    return _policy


@contextlib.contextmanager
def using(policy: PathPolicy) -> Iterator[PathPolicy]:
    """``policy`` for the duration of a block (tests and in-process servers)."""
    old = current()
    install(policy)
    try:
        yield policy
    finally:
        install(old)


def _refuse(message: str, field: str, file: str | None, line: int | None) -> MobykitError:
    if file:
        return SpecError(message, file=file, line=line, field=field)
    return InvalidArgument(f"{field}: {message}")


def _absolute(path: str | Path, base: str | Path | None, policy: PathPolicy) -> str:
    text = os.fspath(path)
    if "\0" in text:
        raise InvalidArgument("path contains a NUL byte")
    if text == "~" or text.startswith("~/"):
        text = os.path.expanduser(text)
    if not os.path.isabs(text):
        text = os.path.join(os.fspath(base) if base is not None else policy.base(), text)
    return text


def resolve(path: str | Path, field: str, *, base: str | Path | None = None,
            file: str | None = None, line: int | None = None) -> Path:
    """The real path ``path`` names, refused (naming ``field``) when it leaves the allowed roots.
    ``base`` is where a relative path is taken from (a spec file's directory), else the first root."""
    policy = current()
    try:
        text = _absolute(path, base, policy)
    except InvalidArgument as e:
        raise _refuse(f"{path!r}: {e}", field, file, line) from None
    real = os.path.realpath(text)
    if not policy.allows(real):
        raise _refuse(f"{path}: outside the paths this server may read ({policy.describe()}); "
                      "the operator allows more with `mobykit serve --allow-path DIR`", field, file, line)
    return Path(real) if policy.restricted else Path(text)


def check_dir(path: str | Path, field: str, **where) -> Path:
    """``resolve`` for a directory that must exist."""
    real = resolve(path, field, **where)
    if not real.is_dir():
        raise _refuse(f"{path}: no such directory", field, where.get("file"), where.get("line"))
    return real


def open_file(path: str | Path, field: str, *, base: str | Path | None = None,
              file: str | None = None, line: int | None = None) -> BinaryIO:
    """Open a regular file for reading, checked before *and* after the open (see the module
    docstring). Missing files raise FileNotFoundError as ``open`` does, so callers keep their own
    wording for them; everything refused raises with ``field`` named."""
    policy = current()
    real = resolve(path, field, base=base, file=file, line=line)
    target = real if policy.restricted else Path(_absolute(path, base, policy))
    # O_NONBLOCK: a FIFO placed where a file was expected must not hang the server (it is then
    # refused as not a regular file); O_NOCTTY: a terminal never becomes ours.
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(21, "Is a directory", str(path))
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(f"{path}: not a regular file", field, file, line)
        if policy.restricted:
            opened = os.readlink(f"/proc/self/fd/{fd}")
            if not policy.allows(opened):
                raise _refuse(f"{path}: changed to point outside the paths this server may read "
                              f"({policy.describe()}) while it was opened", field, file, line)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | Path, field: str, **where) -> bytes:
    with open_file(path, field, **where) as fh:
        return fh.read()
