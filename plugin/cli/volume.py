"""``mobykit volume``: the persistent volumes logical ids own (instance property ``Volumes``):
libvirt pool volumes, EBS volumes, GCE persistent disks. A volume outlives every instance that
used it - replacement, scale-down, a crash - and goes only when removed here (or by ``group
destroy --volumes``), so data is never deleted as a side effect of a group change.

The command talks to the provider directly (``--provider``, default the config's
``default_provider``, else libvirt) with that provider's settings of the serve config
(``--config``, ``$MOBYKIT_CONFIG``), so it works whether or not a server is running; the
provider's ``NamespaceTags`` select the volumes of this deployment on a shared cloud account.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("volume", help="list and remove the persistent volumes of logical ids",
                       description="Persistent volumes (<group>-<logical id>-<name>) live until removed here.")
    vsub = p.add_subparsers(dest="volume_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: p.print_help() or 2)

    ls = vsub.add_parser("ls", help="list volumes: name, size, space used, the instance that has it, its owner")
    _common(ls)
    ls.set_defaults(func=run_ls)

    rm = vsub.add_parser("rm", help="delete volumes and their data (not while attached)")
    rm.add_argument("names", nargs="+", metavar="NAME")
    _common(rm)
    rm.set_defaults(func=run_rm)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="serve config whose providers.<provider> is used "
                   "(default $MOBYKIT_CONFIG)")
    p.add_argument("--provider", help="libvirt, aws or gcp (default: the config's default_provider, else libvirt)")
    p.add_argument("--uri", help="libvirt URI (default: the config's, $MOBYKIT_LIBVIRT_URI or qemu:///session)")
    p.add_argument("--pool", help="the provider's pool (volumes are in <pool>-volumes; default: the config's or mobykit)")


def _provider(args: argparse.Namespace):
    """(provider, keyword arguments of its volume calls) for the command's options."""
    from mobykit.core import config as cfg

    config = cfg.load(args.config)
    return open_provider(config, getattr(args, "provider", None) or config.get("default_provider") or "libvirt",
                         uri=getattr(args, "uri", None), pool=getattr(args, "pool", None))


def open_provider(config: dict, name: str, uri: str | None = None, pool: str | None = None):
    """The provider ``name`` with its settings from ``config``, and the keyword arguments of its
    ``list_volumes``/``remove_volume`` (the cloud ones take the NamespaceTags; libvirt has none)."""
    from mobykit import providers
    from mobykit.core import config as cfg
    from mobykit.errors import FailedPrecondition, InvalidArgument

    settings = cfg.provider_settings(config, name)
    namespace = settings.pop("NamespaceTags", None) or {}
    if name == "libvirt":
        from mobykit.providers.libvirt import LibvirtProvider

        if uri:
            settings["URI"] = uri
        if pool:
            settings["Pool"] = pool
        return LibvirtProvider(settings), {}
    if uri or pool:
        raise InvalidArgument(f"--uri and --pool are libvirt's; the provider is {name}")
    provider = providers.load(name, settings)
    if not hasattr(provider, "list_volumes"):
        raise FailedPrecondition(f"provider {name!r} has no persistent volumes")
    return provider, {"namespace": dict(namespace)}


def run_ls(args: argparse.Namespace) -> int:
    provider, kw = _provider(args)
    try:
        volumes = provider.list_volumes(**kw)
    finally:
        provider.close()
    rows = [(v["Name"], f"{v['SizeGb']:g}G", _human(v["Allocated"]) if "Allocated" in v else "-", v["Instance"] or "-",
             v.get("Owner") or "-") for v in volumes]
    if not sys.stdout.isatty():  # scripts read TSV
        for row in rows:
            print("\t".join(row))
        return 0
    header = ("NAME", "SIZE", "USED", "INSTANCE", "OWNER")  # OWNER: group/logical id, where the provider tags it
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def run_rm(args: argparse.Namespace) -> int:
    """Each name in turn; the first that cannot be removed stops the command with its error."""
    provider, kw = _provider(args)
    try:
        for name in args.names:
            provider.remove_volume(name, **kw)
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


def group_volumes(group: str, properties: dict, config: dict) -> tuple[str, list[str]]:
    """(provider name, volume names) a group's logical ids own, from its committed spec: the
    instance plugin's type (``mobykit/aws`` -> aws; ``Properties.Provider`` wins; else the
    config's default provider) and ``<group>-<lid>-<name>`` for every logical id and volume."""
    from mobykit.providers.persistent import volume_name

    instance = (properties or {}).get("Instance") or {}
    iprops = instance.get("Properties") or {}
    plugin = instance.get("Plugin") or ""
    name = iprops.get("Provider") or (plugin.split("/", 1)[1] if "/" in plugin else "") \
        or config.get("default_provider") or "libvirt"
    lids = ((properties or {}).get("Allocation") or {}).get("LogicalIDs") or []
    names = [v.get("Name") for v in iprops.get("Volumes") or [] if isinstance(v, dict)]
    return name, [volume_name(group, str(lid), n) for lid in lids for n in names if isinstance(n, str)]


def remove_volumes(config: dict, provider_name: str, names: list[str], timeout: float = 300.0) -> list[str]:
    """Remove ``names`` (``group destroy --volumes``), returning the ones removed. A name never made
    is skipped; one still attached is retried until ``timeout`` (the group's instances are going
    away), then its FailedPrecondition is raised."""
    import time

    from mobykit.errors import FailedPrecondition, NotFound

    provider, kw = open_provider(config, provider_name)
    removed = []
    deadline = time.monotonic() + timeout
    try:
        for name in names:
            delay = 0.05
            while True:
                try:
                    provider.remove_volume(name, **kw)
                    removed.append(name)
                    break
                except NotFound:
                    break
                except FailedPrecondition:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(delay)
                    delay = min(2 * delay, 2.0)
    finally:
        provider.close()
    return removed
