"""Regenerate plugin/rpc/gen/ from proto/ with grpc_tools.protoc.

Why a script and not a bare protoc line: protoc writes ``from mobykit.v1 import mobykit_pb2``
into the gRPC stubs (the proto's own package path), which is not importable here. We flatten the
output into ``mobykit.rpc.gen`` (one package, so the wheel's package list stays fixed) and rewrite
that import. The descriptor keeps its proto path ``mobykit/v1/mobykit.proto``, which is what
server reflection and grpcurl show.

    .venv/bin/python -m mobykit.rpc.generate            # rewrite plugin/rpc/gen/
    .venv/bin/python -m mobykit.rpc.generate --out DIR  # write elsewhere (staleness test)
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
PROTOS = ("mobykit/v1/mobykit.proto",)
DEFAULT_OUT = Path(__file__).resolve().parent / "gen"
INIT = '"""Generated from proto/ by ``python -m mobykit.rpc.generate``; do not edit."""\n'


def generate(out: Path) -> list[Path]:
    """Write the generated modules into ``out`` (created if needed); return the files written."""
    from grpc_tools import protoc  # the generator is a build-time tool, not a runtime import

    include = Path(protoc.__file__).resolve().parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={tmp}", f"--grpc_python_out={tmp}"]
        rc = protoc.main(args + list(PROTOS))
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        for proto in PROTOS:
            stem = Path(proto).with_suffix("")
            package = ".".join(stem.parent.parts)
            for suffix in ("_pb2.py", "_pb2_grpc.py"):
                src = Path(tmp) / f"{stem}{suffix}"
                text = src.read_text()
                text = re.sub(rf"^from {re.escape(package)} import ", "from mobykit.rpc.gen import ", text, flags=re.M)
                dest = out / f"{stem.name}{suffix}"
                dest.write_text(text)
                written.append(dest)
    init = out / "__init__.py"
    init.write_text(INIT)
    written.append(init)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.out.resolve() == DEFAULT_OUT:
        # Start clean so a renamed proto leaves no stale module behind.
        for old in DEFAULT_OUT.glob("*_pb2*.py"):
            old.unlink()
        shutil.rmtree(DEFAULT_OUT / "__pycache__", ignore_errors=True)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
