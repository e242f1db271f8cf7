"""``mobykit build``: spec files -> image outputs. The image id is the last line of stdout."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="build an image from LinuxKit/Moby YAML specs",
        description="Build an image from one or more LinuxKit/Moby YAML spec files (merged in order). "
        "Prints the image id (sha256 of the canonical tar) as the last line of stdout.",
    )
    p.add_argument("specs", nargs="+", metavar="SPEC", help="spec file(s); later files merge over earlier ones")
    p.add_argument("-f", "--format", dest="formats", action="append", metavar="FORMAT",
                   help="output format, repeatable (tar, kernel+initrd, ...); default: the spec's outputs, else kernel+initrd")
    p.add_argument("-o", "--dir", dest="outdir", default=".", metavar="DIR", help="output directory (default: .)")
    p.add_argument("--name", help="output base name (default: the first spec's base name)")
    p.add_argument("--size", metavar="SIZE", help="disk size for disk formats (e.g. 1G, 512M; default: the "
                   "smallest that fits, whole GiB for aws and gcp)")
    add_cache_args(p)
    p.set_defaults(func=run)


def add_cache_args(p: argparse.ArgumentParser) -> None:
    """Options every command that resolves images shares."""
    p.add_argument("--cache", metavar="DIR", help="image cache (default: $MOBYKIT_CACHE or ~/.cache/mobykit)")
    p.add_argument("--pull", action="store_true", help="refresh tags from their registries even when cached")
    p.add_argument("--arch", help="platform architecture to resolve manifest lists to (default: the host's)")
    p.add_argument("--insecure-registry", dest="insecure", action="append", default=[], metavar="HOST[:PORT]",
                   help="allow plain http for this registry (loopback registries always may)")


def run(args: argparse.Namespace) -> int:
    import sys

    from mobykit.image.build import build, parse_size
    from mobykit.image.cache import Cache, default_root
    from mobykit.image.progress import Progress

    formats = [f for value in (args.formats or []) for f in value.split(",") if f]
    cache = Cache(args.cache or default_root())
    with Progress() as progress:
        result = build(args.specs, formats=formats or None, outdir=args.outdir, name=args.name, cache=cache,
                       pull=args.pull, arch=args.arch, insecure=args.insecure, progress=progress,
                       size=parse_size(args.size))
    if sys.stderr.isatty():
        state = "built" if result.rebuilt else "up to date"
        for path in result.outputs:
            print(f"{state}: {path}", file=sys.stderr)
    print(result.image_id)
    return 0
