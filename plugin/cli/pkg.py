"""``mobykit pkg build|show``: turn package recipes (specs/pkgs/NAME/build.yml) into images in the
cache. The last line(s) of stdout are image references, one per recipe, ready for a spec."""

from __future__ import annotations

import sys
from pathlib import Path


def _cache(args):
    from mobykit.image.cache import Cache

    return Cache(args.cache) if args.cache else Cache()


def _dirs(args) -> list[Path]:
    from mobykit.errors import InvalidArgument
    from mobykit.pkg.build import find_recipes

    dirs = [Path(d) for d in args.recipes]
    if args.all:
        dirs += find_recipes(args.root)
    if not dirs:
        raise InvalidArgument("pkg build: name a recipe directory (specs/pkgs/NAME) or use --all")
    out = []
    for d in dirs:
        if not d.exists() and (Path(args.root) / str(d)).exists():
            d = Path(args.root) / str(d)  # a bare NAME means specs/pkgs/NAME
        if d not in out:
            out.append(d)
    return out


def _build(args) -> int:
    from mobykit.pkg.build import build

    cache = _cache(args)
    for d in _dirs(args):
        result = build(d, cache=cache, force=args.force)
        if not result.rebuilt:
            print(f"{d}: up to date", file=sys.stderr)
        print(result.ref, flush=True)
    return 0


def _show(args) -> int:
    from mobykit.errors import NotFound
    from mobykit.pkg import recipe as recipe_mod
    from mobykit.pkg.build import cached, deb_cache_dir, input_hash, resolve_packages

    cache = _cache(args)
    missing = []
    for d in _dirs(args):
        r = recipe_mod.load(d)
        pkgs, kpkg = resolve_packages(r, deb_cache_dir(cache) / "resolved.json")
        ref = f"{r.repository}:{input_hash(r, pkgs, kpkg)[:20]}"
        print(ref)
        if not cached(cache, ref):
            missing.append(ref)
    if missing:
        raise NotFound(f"not built yet (run mobykit pkg build): {', '.join(missing)}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("pkg", help="build base images from Debian-package recipes")
    sub = p.add_subparsers(dest="pkg_command", metavar="SUBCOMMAND")
    for name, func, helptext in (
        ("build", _build, "build recipes into the image cache (skipped when unchanged); prints refs"),
        ("show", _show, "print the refs recipes build to, without building (exit 1 if not built)"),
    ):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("recipes", nargs="*", metavar="RECIPE", help="recipe directory, or NAME under --root")
        q.add_argument("--all", action="store_true", help="every recipe under --root")
        q.add_argument("--root", default="specs/pkgs", help="where recipes live (default specs/pkgs)")
        q.add_argument("--cache", help="image cache directory (default $MOBYKIT_CACHE or ~/.cache/mobykit)")
        if name == "build":
            q.add_argument("--force", action="store_true", help="rebuild even if the image is cached")
        q.set_defaults(func=func)
    p.set_defaults(func=lambda args: (p.print_help(sys.stderr), 2)[1])


