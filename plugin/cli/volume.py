"""``mobykit volume``: the persistent volumes logical ids own on libvirt (instance property
``Volumes``). A volume outlives every instance that used it - replacement, scale-down, a crash -
and goes only when removed here, so data is never deleted as a side effect of a group change.

The command talks to libvirt directly, with the libvirt settings of the serve config
(``--config``, ``$MOBYKIT_CONFIG``), so it works whether or not a server is running.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("volume", help="list and remove the persistent volumes of logical ids (libvirt)",
                       description="Persistent volumes (<group>-<logical id>-<name>) live until removed here.")
    vsub = p.add_subparsers(dest="volume_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: p.print_help() or 2)

    ls = vsub.add_parser("ls", help="list volumes: name, size, space used, the instance that has it")
    _common(ls)
    ls.set_defaults(func=run_ls)

    rm = vsub.add_parser("rm", help="delete volumes and their data (not while attached)")
    rm.add_argument("names", nargs="+", metavar="NAME")
    _common(rm)
    rm.set_defaults(func=run_rm)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="serve config whose providers.libvirt is used "
                   "(default $MOBYKIT_CONFIG)")
    p.add_argument("--uri", help="libvirt URI (default: the config's, $MOBYKIT_LIBVIRT_URI or qemu:///session)")
    p.add_argument("--pool", help="the provider's pool (volumes are in <pool>-volumes; default: the config's or mobykit)")


def _provider(args: argparse.Namespace):
    from mobykit.core import config as cfg
    from mobykit.providers.libvirt import LibvirtProvider

    settings = cfg.provider_settings(cfg.load(args.config), "libvirt")
    if args.uri:
        settings["URI"] = args.uri
    if args.pool:
        settings["Pool"] = args.pool
    return LibvirtProvider(settings)


def run_ls(args: argparse.Namespace) -> int:
    provider = _provider(args)
    try:
        volumes = provider.list_volumes()
    finally:
        provider.close()
    rows = [(v["Name"], f"{v['SizeGb']:g}G", _human(v["Allocated"]), v["Instance"] or "-") for v in volumes]
    if not sys.stdout.isatty():  # scripts read TSV
        for row in rows:
            print("\t".join(row))
        return 0
    header = ("NAME", "SIZE", "USED", "INSTANCE")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def run_rm(args: argparse.Namespace) -> int:
    """Each name in turn; the first that cannot be removed stops the command with its error."""
    provider = _provider(args)
    try:
        for name in args.names:
            provider.remove_volume(name)
            print(name)
    finally:
        provider.close()
    return 0


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"
