"""How much a single request may ask of the server, on either transport.

Why these numbers: a legitimate Infrakit call is small. The deepest one is a group commit whose
moby flavor carries an inline image spec, about 12 levels counting the JSON-RPC envelope
(specs/groups/demo.yml alone is 5), and a spec file is at most 1 MiB (``yamlfile.MAX_BYTES``).
Protobuf (upb) refuses a ``google.protobuf.Struct`` nested deeper than about 33 object levels, so a
value the JSON-RPC side accepts at ``MAX_DEPTH`` can still be answered over gRPC. Every limit is
far above real use and far below what would exhaust the stack (Python's recursion limit is 1000)
or turn a 16 MiB body into gigabytes of Python objects.
"""

from __future__ import annotations

MAX_DEPTH = 32  # nested arrays/objects in one JSON-RPC body, the envelope included
MAX_VALUES = 100_000  # containers + array elements + object members in one body (yamlfile.MAX_NODES)
MAX_STRING = 1 << 20  # bytes of one JSON string as written; a spec file is at most this
MAX_MESSAGE_BYTES = 1024  # an error message sent back; gRPC puts it in an 8 KiB trailer

_ELLIPSIS = " ... (truncated)"


def clip(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``message`` cut to at most ``limit`` UTF-8 bytes.

    Why: error messages quote what the caller sent (``unknown provider 'xxx...'``). gRPC carries
    the message in a trailer whose size is capped (a 20 KB message reaches the client as
    RESOURCE_EXHAUSTED instead of the real status), and a JSON-RPC reply should not echo a
    megabyte back."""
    data = message.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return message
    keep = data[: max(0, limit - len(_ELLIPSIS))]
    return keep.decode("utf-8", "ignore") + _ELLIPSIS
