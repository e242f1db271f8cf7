"""Errors users see. Each names where the problem is (file:line: field, image/layer/path, request)
and carries the process exit code, so the CLI never has to guess how to report it."""

from __future__ import annotations


class MobykitError(Exception):
    """Base of every error that is the user's input or environment, not a bug in mobykit."""

    exit_code = 1


class SpecError(MobykitError):
    """A spec file is invalid. ``str()`` is ``file:line: field: message`` (exit code 2)."""

    exit_code = 2

    def __init__(self, message: str, file: str | None = None, line: int | None = None, field: str | None = None):
        self.message, self.file, self.line, self.field = message, file, line, field
        where = ""
        if file:
            where = f"{file}:{line}: " if line else f"{file}: "
        super().__init__(f"{where}{field + ': ' if field else ''}{message}")


class ImageError(MobykitError):
    """An image or one of its layers is unusable or hostile: names the image, layer digest and path."""

    exit_code = 3

    def __init__(self, message: str, image: str | None = None, layer: str | None = None, path: str | None = None):
        self.message, self.image, self.layer, self.path = message, image, layer, path
        parts = [p for p in (image, f"layer {layer}" if layer else None, path) if p]
        super().__init__(f"{': '.join(parts)}: {message}" if parts else message)


class RegistryError(MobykitError):
    """Talking to a registry failed (network, auth, missing manifest, digest mismatch)."""

    exit_code = 4


class CacheMiss(MobykitError):
    """An image is not in the local cache and pulling was not allowed."""

    exit_code = 4


class BuildError(MobykitError):
    """The build could not produce its outputs (tools missing, disk, an output backend failed)."""

    exit_code = 5


class MissingTool(BuildError):
    """A program a format needs is not installed: names it and the Debian package that has it. The
    build's input is fine but cannot be made here, so the CLI exits 2 as for bad input."""

    exit_code = 2


class NotFound(MobykitError):
    """A named instance, group or image does not exist (gRPC NOT_FOUND)."""


class InvalidArgument(MobykitError):
    """A request is malformed: names the field (gRPC INVALID_ARGUMENT, exit code 2)."""

    exit_code = 2


class FailedPrecondition(MobykitError):
    """The request is valid but the system is not in a state to honour it (gRPC FAILED_PRECONDITION)."""


class Unavailable(MobykitError):
    """A provider or backend cannot be reached right now; retrying may succeed (gRPC UNAVAILABLE)."""


class InProgress(Unavailable):
    """What the request needs is still being made (an image build): asking again later joins it or
    gets its result. Not a failure: a caller that retries (a group controller) does not count it."""
