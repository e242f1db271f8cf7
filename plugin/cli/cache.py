"""``mobykit cache``: look at and fill the image cache (an OCI image layout).

``import`` is the offline path (OCI layouts, OCI archives, ``docker save`` tarballs); ``pull``
fetches from a registry ahead of a build; ``ls`` lists tags, as TSV when stdout is not a terminal
so scripts can read it without parsing a table.
"""

from __future__ import annotations

import argparse


def _cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", metavar="DIR", help="image cache (default: $MOBYKIT_CACHE or ~/.cache/mobykit)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="list, import and pull images in the local image cache",
                       description="Manage the local image cache (an OCI image layout).")
    csub = p.add_subparsers(dest="cache_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: p.print_help() or 2)

    ls = csub.add_parser("ls", help="list cached images: reference, digest, size")
    _cache_arg(ls)
    ls.set_defaults(func=run_ls)

    imp = csub.add_parser("import", help="import an OCI layout (dir or tar) or a docker save tarball",
                          description="Import images from an OCI image layout directory, an OCI archive (tar of a "
                          "layout) or a `docker save` tarball, tagging the references they name.")
    imp.add_argument("sources", nargs="+", metavar="FILE|DIR")
    imp.add_argument("--name", metavar="REPO[:TAG]",
                     help="repository for images the source names only by tag (or not at all)")
    _cache_arg(imp)
    imp.set_defaults(func=run_import)

    pull = csub.add_parser("pull", help="pull images from their registries into the cache")
    pull.add_argument("refs", nargs="+", metavar="REF")
    pull.add_argument("--arch", help="platform architecture (default: the host's)")
    pull.add_argument("--insecure-registry", dest="insecure", action="append", default=[], metavar="HOST[:PORT]",
                      help="allow plain http for this registry (loopback registries always may)")
    _cache_arg(pull)
    pull.set_defaults(func=run_pull)


def _cache(args):
    from mobykit.image.cache import Cache, default_root

    return Cache(args.cache or default_root())


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def run_ls(args: argparse.Namespace) -> int:
    import sys

    rows = _cache(args).images()
    if not sys.stdout.isatty():
        for ref, digest, size in rows:
            print(f"{ref}\t{digest}\t{size}")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("REFERENCE", "DIGEST", "SIZE", box=None)
    for ref, digest, size in rows:
        table.add_row(ref, digest[:19], _human(size))
    Console().print(table)
    return 0


def run_import(args: argparse.Namespace) -> int:
    from mobykit.image.importer import import_path
    from mobykit.image.progress import Progress

    cache = _cache(args)
    with Progress() as progress:
        results = [r for src in args.sources for r in import_path(cache, src, name=args.name, progress=progress)]
    for ref, digest in results:
        print(f"{ref or '<untagged>'}\t{digest}")
    return 0


def run_pull(args: argparse.Namespace) -> int:
    from mobykit.image.cache import host_arch
    from mobykit.image.progress import Progress
    from mobykit.image.registry import Registry

    cache = _cache(args)
    with Progress() as progress:
        reg = Registry(cache, insecure=args.insecure, progress=progress)
        infos = [reg.pull(ref, args.arch or host_arch()) for ref in args.refs]
    for info in infos:
        print(f"{info.ref}\t{info.digest}")
    return 0
