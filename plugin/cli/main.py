"""``mobykit`` command line. Each command lives in its own module under ``mobykit.cli`` and exposes
``register(subparsers)``; those modules import nothing heavy at top level (cloud SDKs, gRPC), so
``mobykit build`` starts fast. Errors the user can fix print one line and exit with their code."""

from __future__ import annotations

import argparse
import importlib
import sys

from mobykit import __version__
from mobykit.errors import MobykitError

# Command modules, in the order they appear in --help.
COMMANDS = ("build", "cache", "pkg", "run", "serve", "group", "volume")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mobykit", description="Build immutable LinuxKit-style images and keep groups of machines on them.")
    p.add_argument("--version", action="version", version=f"mobykit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"mobykit.cli.{name}")
        except ModuleNotFoundError as e:  # a command whose module is not there yet
            if e.name != f"mobykit.cli.{name}":
                raise
            continue
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not getattr(args, "func", None):
        p.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except MobykitError as e:
        print(f"mobykit: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # the environment (permissions, a full disk, a missing directory), not a bug
        print(f"mobykit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mobykit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
