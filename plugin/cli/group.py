"""``mobykit group``: commit, watch and manage groups on a running ``mobykit serve``.

Everything but ``hash`` goes through ``mobykit.rpc.client.connect(--server).group``, the Group SPI
over gRPC, so the same commands work against any server. ``hash`` is offline: it prints the
config hash (Infrakit's InstanceHash) that instances of a spec will be tagged with, so users can
tell which instances a commit would replace before committing.

On a terminal, ``commit`` follows the group live (instances per config, health, the step in
progress) until it converges; piped, it prints the plan and returns at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def register(subparsers) -> None:
    p = subparsers.add_parser("group", help="keep groups of machines at a spec (Infrakit's Group SPI)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default=None,
                   help="server address: unix:PATH, tcp://HOST:PORT (default $MOBYKIT_SERVER)")
    sub = p.add_subparsers(dest="group_command", metavar="COMMAND", required=True)

    c = sub.add_parser("commit", help="adopt a group spec (YAML or JSON), rolling instances by replacement")
    c.add_argument("spec", help="group spec file: {ID, Properties} or kind/metadata/properties")
    c.add_argument("--pretend", action="store_true", help="only say what would be done")
    c.add_argument("--watch", dest="watch", action="store_true", default=None,
                   help="follow progress until converged (default on a terminal)")
    c.add_argument("--no-watch", dest="watch", action="store_false")
    c.add_argument("--timeout", type=float, default=0, help="stop watching after this many seconds (0: never)")
    c.set_defaults(func=cmd_commit)

    d = sub.add_parser("describe", help="the group's instances and whether it has converged")
    d.add_argument("id")
    d.set_defaults(func=cmd_describe)

    ls = sub.add_parser("ls", help="the groups the server's store holds: ID, config hash, target size")
    ls.set_defaults(func=cmd_ls)

    i = sub.add_parser("inspect", help="the specs of all managed groups (JSON)")
    i.set_defaults(func=cmd_inspect)

    f = sub.add_parser("free", help="stop managing a group and remove it from the store; its instances keep running")
    f.add_argument("id")
    f.set_defaults(func=cmd_free)

    x = sub.add_parser("destroy", help="stop managing a group and destroy its instances")
    x.add_argument("id")
    x.add_argument("--volumes", action="store_true",
                   help="then delete the persistent volumes its logical ids own, and their data")
    x.add_argument("--config", metavar="FILE", help="with --volumes: the serve config whose provider settings "
                   "reach the volumes (default $MOBYKIT_CONFIG)")
    x.add_argument("--volume-timeout", type=float, default=300.0,
                   help="with --volumes: seconds to wait for the instances to release them")
    x.set_defaults(func=cmd_destroy)

    di = sub.add_parser("destroy-instances", help="destroy these members and shrink the group by as many")
    di.add_argument("id")
    di.add_argument("instances", nargs="+", metavar="INSTANCE")
    di.set_defaults(func=cmd_destroy_instances)

    s = sub.add_parser("size", help="print the target size")
    s.add_argument("id")
    s.set_defaults(func=cmd_size)

    ss = sub.add_parser("set-size", help="change the target size")
    ss.add_argument("id")
    ss.add_argument("size", type=int)
    ss.set_defaults(func=cmd_set_size)

    h = sub.add_parser("hash", help="print the config hash instances of SPEC are tagged with (offline)")
    h.add_argument("spec")
    h.set_defaults(func=cmd_hash)


def _group(args):
    from mobykit.rpc.client import connect

    return connect(args.server).group


def cmd_hash(args) -> int:
    from mobykit.group.spec import load

    print(load(args.spec).hash)
    return 0


def cmd_commit(args) -> int:
    from mobykit.group.spec import load

    cfg = load(args.spec)  # checked locally first: errors name file:line: field
    group = _group(args)
    print(group.commit_group(cfg.spec(), args.pretend))
    watch = args.watch if args.watch is not None else sys.stdout.isatty()
    if args.pretend or not watch:
        return 0
    return _watch(group, cfg.id, cfg.hash, args.timeout)


def summarise(desc, current_hash: str, target: int) -> dict:
    """Counts a progress view shows, from DescribeGroup alone (so it works with any server)."""
    by_config: dict[str, int] = {}
    for d in desc.instances:
        tags = d.tags or {}
        h = tags.get("infrakit.config.hash") or tags.get("infrakit.config_sha") or "?"
        by_config[h] = by_config.get(h, 0) + 1
    new = by_config.get(current_hash, 0)
    old = sum(n for h, n in by_config.items() if h != current_hash)
    if desc.converged:
        step = f"converged: {target} instances at {current_hash}"
    elif old:
        step = f"rolling update: {new}/{target} at the new config, {old} to replace"
    elif new < target:
        step = f"scaling up: {new}/{target}"
    elif new > target:
        step = f"scaling down: {new} -> {target}"
    else:
        step = f"waiting for health: {target} instances"
    return {"by_config": by_config, "new": new, "old": old, "step": step, "converged": desc.converged}


def _render(group_id: str, current_hash: str, target: int, summary: dict, desc):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t = Table(title=f"group {group_id}  target {target}", expand=False)
    t.add_column("config")
    t.add_column("instances", justify="right")
    t.add_column("")
    for h, n in sorted(summary["by_config"].items(), key=lambda kv: kv[0] != current_hash):
        t.add_row(h, str(n), "committed" if h == current_hash else "old: to replace")
    ids = Text(" ".join(d.id for d in desc.instances[:20]) + (" ..." if len(desc.instances) > 20 else ""), style="dim")
    style = "green" if summary["converged"] else "yellow"
    return Group(t, Text(summary["step"], style=style), ids)


def _watch(group, group_id: str, current_hash: str, timeout: float) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    deadline = time.monotonic() + timeout if timeout else None
    target = group.size(group_id)
    desc = group.describe_group(group_id)
    summary = summarise(desc, current_hash, target)
    with Live(_render(group_id, current_hash, target, summary, desc), console=console, refresh_per_second=4) as live:
        while not summary["converged"]:
            if deadline is not None and time.monotonic() > deadline:
                console.print(f"still converging after {timeout:g}s; follow with: mobykit group describe {group_id}")
                return 1
            time.sleep(0.5)
            target = group.size(group_id)
            desc = group.describe_group(group_id)
            summary = summarise(desc, current_hash, target)
            live.update(_render(group_id, current_hash, target, summary, desc))
    return 0


def cmd_describe(args) -> int:
    group = _group(args)
    desc = group.describe_group(args.id)
    target = group.size(args.id)
    hashes = {s.id: s for s in group.inspect_groups()}
    current = ""
    if args.id in hashes:
        from mobykit.group.hash import instance_hash

        current = instance_hash(hashes[args.id].properties or {})
    summary = summarise(desc, current, target)
    if sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
        from rich.console import Console

        Console().print(_render(args.id, current, target, summary, desc))
        print(f"server: {describe_server(group, args.id) or server_role(args.server)}")
        for d in desc.instances:
            print(f"{d.id}\t{d.logical_id or '-'}\t{(d.tags or {}).get('infrakit.config.hash', '?')}")
        return 0
    print(f"group {args.id}: target {target}, {len(desc.instances)} instances, "
          f"{'converged' if desc.converged else 'converging'} ({summary['step']})")
    print(f"server: {describe_server(group, args.id) or server_role(args.server)}")
    print("ID\tLOGICAL_ID\tCONFIG\tTAGS")
    for d in desc.instances:
        tags = d.tags or {}
        extra = ",".join(f"{k}={v}" for k, v in sorted(tags.items()) if not k.startswith("infrakit."))
        print(f"{d.id}\t{d.logical_id or '-'}\t{tags.get('infrakit.config.hash', '?')}\t{extra}")
    return 0


def describe_server(group, gid: str) -> str:
    """``leader (term 7, lease 694d..., ttl 10s, name host:pid)``: the answering server's role as
    DescribeGroup reports it; "" when the server reports none (then the health check answers)."""
    r = group.server_role(gid)
    if not r or not r["role"]:
        return ""
    parts = [f"term {r['term']}"] if r["term"] else []
    if r["lease"]:
        parts.append(f"lease {r['lease']}")
    if r["ttl"]:
        parts.append(f"ttl {r['ttl']:g}s")
    if r["role"] != "leader":
        parts.append(f"leader {r['leader'] or 'none elected'}")
    parts.append(f"name {r['name']}")
    return f"{r['role']} ({', '.join(parts)})"


def server_role(address: str | None) -> str:
    """``leader`` or ``follower`` (gRPC health service ``mobykit.leader``), ``unknown`` if the
    server does not say (an older server, or a Group plugin that is not mobykit's)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from mobykit.rpc.client import connect

    with connect(address) as clients:
        try:
            r = health_pb2_grpc.HealthStub(clients.channel).Check(
                health_pb2.HealthCheckRequest(service="mobykit.leader"), timeout=10)
        except grpc.RpcError:
            return "unknown"
    return "leader" if r.status == health_pb2.HealthCheckResponse.SERVING else "follower"


def cmd_ls(args) -> int:
    from mobykit.group.hash import instance_hash

    specs = _group(args).inspect_groups()
    print("ID\tCONFIG\tSIZE")
    for s in specs:
        props = s.properties or {}
        alloc = props.get("Allocation") or {}
        size = len(alloc.get("LogicalIDs") or []) or alloc.get("Size", 0)
        print(f"{s.id}\t{instance_hash(props)}\t{size}")
    return 0


def cmd_inspect(args) -> int:
    import json

    specs = _group(args).inspect_groups()
    print(json.dumps([{"ID": s.id, "Properties": s.properties} for s in specs], indent=2, sort_keys=True))
    return 0


def cmd_free(args) -> int:
    _group(args).free_group(args.id)
    print(f"group {args.id} freed (its instances keep running)")
    return 0


def cmd_destroy(args) -> int:
    """With ``--volumes`` the group's spec is read first (which volumes it owns, on which provider),
    the group destroyed, then each volume removed once its instance has released it."""
    group = _group(args)
    owned = None
    if args.volumes:
        from mobykit.cli.volume import group_volumes
        from mobykit.core import config as cfg
        from mobykit.errors import NotFound

        config = cfg.load(args.config)
        spec = next((s for s in group.inspect_groups() if s.id == args.id), None)
        if spec is None:
            raise NotFound(f"group {args.id!r} not found (nothing destroyed)")
        owned = group_volumes(args.id, spec.properties, config)
    group.destroy_group(args.id)
    print(f"group {args.id} destroyed")
    if owned is not None:
        from mobykit.cli.volume import remove_volumes

        for name in remove_volumes(config, *owned, timeout=args.volume_timeout):
            print(f"volume {name} removed")
    return 0


def cmd_destroy_instances(args) -> int:
    _group(args).destroy_instances(args.id, list(args.instances))
    print(f"destroyed {len(args.instances)} instance(s) of group {args.id}")
    return 0


def cmd_size(args) -> int:
    print(_group(args).size(args.id))
    return 0


def cmd_set_size(args) -> int:
    if args.size < 0:
        from mobykit.errors import InvalidArgument

        raise InvalidArgument(f"size: must be a count >= 0, got {args.size}")
    _group(args).set_size(args.id, args.size)
    print(f"group {args.id}: target size {args.size}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser (tests, ``python -m mobykit.cli.group``)."""
    p = argparse.ArgumentParser(prog="mobykit")
    register(p.add_subparsers(dest="command"))
    return p
