"""``mobykit serve``: run the Instance/Flavor/Group/Images plugin over gRPC and Infrakit's JSON-RPC.

Why both transports in one process: gRPC (with reflection, health, TLS client certificates) is
what our own CLI and grpcurl users speak; the JSON-RPC socket is what an unmodified Infrakit
finds in its plugins directory. Both serve the same plugin objects, so a group committed through
one is seen through the other. Nothing heavy is imported until the command runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from mobykit.errors import InvalidArgument
from mobykit.rpc.plugins import DEFAULT_ADDRESS as DEFAULT_LISTEN  # light: imports no grpc

log = logging.getLogger("mobykit.serve")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the Infrakit instance/flavor/group plugin (gRPC + Infrakit JSON-RPC)",
        description="Serve mobykit's Instance, Flavor, Group and Images APIs over gRPC, and Infrakit's "
        "JSON-RPC plugin protocol on a unix socket.",
    )
    p.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help=f"unix:PATH or tcp://HOST:PORT; repeatable (default {DEFAULT_LISTEN})",
    )
    p.add_argument("--tls-cert", type=Path, metavar="FILE", help="server certificate (PEM) for TCP listeners")
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path, metavar="FILE", help="CA that signs the client certificates")
    p.add_argument("--insecure", action="store_true", help="allow TCP listeners without TLS (do not use off-host)")
    p.add_argument("--config", type=Path, metavar="FILE", help="config file (YAML; default $MOBYKIT_CONFIG)")
    p.add_argument("--allow-path", action="append", metavar="DIR", default=[],
                   help="a directory whose files requests may make the server read (specs, files: sources, "
                   "@pkg: recipes, Kernel/Initrd); repeatable, with the config's allow_paths "
                   "(default: the config file's directory, else the working directory)")
    p.add_argument(
        "--infrakit-socket",
        type=Path,
        metavar="PATH",
        help="Infrakit JSON-RPC socket (default $INFRAKIT_PLUGINS_DIR/mobykit, else $INFRAKIT_HOME/plugins/mobykit, "
        "else ~/.infrakit/plugins/mobykit)",
    )
    p.add_argument("--no-infrakit", action="store_true", help="do not serve Infrakit's JSON-RPC socket")
    p.add_argument("--grace", type=float, default=30.0, metavar="SECONDS", help="how long calls in progress may take to finish on SIGTERM")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics (groups, provisions, update progress) on http://HOST:PORT/metrics")
    p.add_argument("--store", metavar="URL",
                   help="where committed groups outlive the server: file:DIR (one server; default "
                   "file:~/.mobykit/state) or etcd://HOST:PORT[,HOST:PORT...] (several replicas, one leader); "
                   "config store:")
    p.add_argument("--lease-ttl", type=float, metavar="SECONDS",
                   help="etcd leader lease TTL: how long the replicas wait for a dead leader (default 10)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every call")
    p.set_defaults(func=run)


def _optional(module: str, attr: str):
    """A component by name, or None when its module is not installed (the server still serves
    the rest). An import error inside a present module is a bug and is raised."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return None
        raise
    return getattr(mod, attr, None)


# The config file's ``group:`` section -> the controller's Options (CamelCase, as Infrakit writes).
GROUP_OPTIONS = {
    "PollInterval": "poll_interval", "MaxParallel": "max_parallel", "SelfLogicalID": "self_logical_id",
    "SelfID": "self_id", "BackoffInitial": "backoff_initial", "BackoffMax": "backoff_max",
    "MaxFailures": "max_failures", "IdlePollInterval": "idle_poll_interval",
}


def group_options(config: dict[str, Any]):
    """Controller options from ``group:`` in the config; unknown keys are named."""
    from mobykit.group.controller import Options

    section = config.get("group") or {}
    if not isinstance(section, dict):
        raise InvalidArgument("config: group: must be a mapping")
    unknown = sorted(set(section) - set(GROUP_OPTIONS))
    if unknown:
        raise InvalidArgument(f"config: group: unknown key(s) {', '.join(unknown)} (known: {', '.join(GROUP_OPTIONS)})")
    return Options(**{GROUP_OPTIONS[k]: v for k, v in section.items()})


def store_settings(config: dict[str, Any], url: str | None = None, ttl: float | None = None) -> dict[str, Any]:
    """``store:`` from the config (a URL, or {url, lease_ttl, ca, cert, key, name}), overridden by
    ``--store`` / ``--lease-ttl``."""
    from mobykit.group.leader import DEFAULT_TTL
    from mobykit.group.store.base import DEFAULT_URL

    section = config.get("store")
    if section is None or isinstance(section, str):
        section = {"url": section}
    if not isinstance(section, dict):
        raise InvalidArgument("config: store: must be a URL or a mapping {url, lease_ttl, ca, cert, key, name}")
    unknown = sorted(set(section) - {"url", "lease_ttl", "ca", "cert", "key", "name"})
    if unknown:
        raise InvalidArgument(f"config: store: unknown key(s) {', '.join(unknown)} (known: url, lease_ttl, ca, cert, key, name)")
    out = {"url": url or section.get("url") or DEFAULT_URL, "name": section.get("name"),
           "tls": {k: str(section[k]) for k in ("ca", "cert", "key") if section.get(k)}}
    lease = ttl if ttl is not None else section.get("lease_ttl", DEFAULT_TTL)
    if isinstance(lease, bool) or not isinstance(lease, int | float) or lease < 1:
        raise InvalidArgument(f"store lease TTL: must be a number of seconds >= 1, got {lease!r}")
    out["lease_ttl"] = float(lease)
    return out


def open_group_store(settings: dict[str, Any]):
    """The store and the leadership over it (a bad store raises here, before anything is served)."""
    from mobykit.group.leader import election_for
    from mobykit.group.store import open_store

    store = open_store(settings["url"], lease_ttl=settings["lease_ttl"], tls=settings["tls"] or None)
    return store, election_for(store, settings["lease_ttl"], settings.get("name"))


def compose(config: dict[str, Any], registry=None, store=None, leadership=None):
    """The plugin objects the server serves, from what is installed and configured. ``registry``
    (a prometheus CollectorRegistry) receives the group controllers' metrics; ``store`` and
    ``leadership`` (``open_group_store``) make the group plugin remember and elect."""
    from mobykit.core.instance import InstanceCore
    from mobykit.rpc.plugins import Plugins

    instance = InstanceCore(config)
    flavors: dict[str, Any] = {}
    moby = _optional("mobykit.flavor.moby", "MobyFlavor")
    if moby is not None:
        flavors["moby"] = moby(config, instances=instance)  # shares the core's provider connections
    vanilla = _optional("mobykit.flavor.vanilla", "VanillaFlavor")
    if vanilla is not None:
        flavors["vanilla"] = vanilla()
    types = ["libvirt", "aws", "gcp"]
    if "memory" in config.get("providers", {}) or config.get("default_provider") == "memory":
        types.append("memory")  # advertised only when configured: it is a test double
    plugins = Plugins(instance=instance, flavors=flavors, config=config, instance_types=tuple(types))
    group_cls = _optional("mobykit.group.plugin", "GroupPluginImpl")
    if group_cls is not None:
        from mobykit.group.metrics import GroupMetrics

        plugins.group = group_cls(lambda name: resolve_instance(plugins, name), lambda name: resolve_flavor(plugins, name),
                                  options=group_options(config), metrics=GroupMetrics(registry),
                                  store=store, leadership=leadership)
        if registry is not None and leadership is not None:
            from mobykit.group.leader import RoleCollector

            registry.register(RoleCollector(leadership.role))
    return plugins


PLUGIN_LOOKUP = "mobykit"


def resolve_instance(plugins, name: str):
    """The group controller's instance plugin for ``mobykit/<provider>`` (this server's core).
    Other plugins are not proxied: a group naming one is refused with its name."""
    lookup, _, _ = name.partition("/")
    if lookup != PLUGIN_LOOKUP or plugins.instance is None:
        raise LookupError(f"only {PLUGIN_LOOKUP}/<provider> instance plugins are served here")
    return plugins.instance


def resolve_flavor(plugins, name: str):
    """``mobykit/moby`` -> the moby flavor, ``mobykit/vanilla`` -> vanilla."""
    lookup, _, type = name.partition("/")
    if lookup != PLUGIN_LOOKUP or type not in plugins.flavors:
        raise LookupError(f"flavor plugins served here: {', '.join(f'{PLUGIN_LOOKUP}/{t}' for t in plugins.flavors)}")
    return plugins.flavors[type]


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from mobykit.core import config as configuration
    from mobykit.rpc import server as grpc_server
    from mobykit.rpc.jsonrpc import JsonRpcServer, default_socket_path

    listens = [grpc_server.Listen.parse(a) for a in (args.listen or [DEFAULT_LISTEN])]
    tls_parts = (args.tls_cert, args.tls_key, args.tls_client_ca)
    tls = None
    if any(tls_parts):
        if not all(tls_parts):
            raise InvalidArgument("--tls-cert, --tls-key and --tls-client-ca must be given together")
        tls = grpc_server.TLSFiles(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca)
    if any(lst.kind == "tcp" for lst in listens) and tls is None and not args.insecure:
        raise InvalidArgument("TCP listeners need --tls-cert, --tls-key and --tls-client-ca, or --insecure explicitly")
    for lst in listens:
        if lst.kind == "unix":
            Path(lst.target).parent.mkdir(parents=True, exist_ok=True)

    config = configuration.load(args.config)
    from mobykit.core import paths

    policy = configuration.path_policy(config, args.allow_path, configuration.effective_path(args.config))
    paths.install(policy)  # before anything is served: every request-named path is checked from now on
    log.info("requests may name files under: %s", policy.describe())
    registry = None
    if args.metrics:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()
    settings = store_settings(config, args.store, args.lease_ttl)
    store, leadership = open_group_store(settings)
    log.info("store: %s", store.url)
    try:
        plugins = compose(config, registry, store=store, leadership=leadership)
        if plugins.group is not None:
            plugins.group.start()
    except BaseException:
        store.close()
        raise

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    server, bound = grpc_server.make_server(plugins, listens, tls=tls, insecure=args.insecure)
    if plugins.group is not None and hasattr(plugins.group, "on_role"):
        plugins.group.on_role = _health_role(server)
        plugins.group.on_role(leadership.role())  # from the first call on, not the first role change
    jsonrpc = metrics = None
    try:
        if args.metrics:
            metrics = _serve_metrics(args.metrics, registry)
            bound.append(f"metrics:http://{args.metrics}/metrics")
        if not args.no_infrakit:
            jsonrpc = JsonRpcServer(plugins, args.infrakit_socket or default_socket_path()).start()
            bound.append(f"infrakit:{jsonrpc.path}")
        for b in bound:
            print(f"listening on {b}", flush=True)
        stop.wait()
        log.info("stopping: letting calls in progress finish (up to %.0fs)", args.grace)
    finally:
        for component in (plugins.group, *plugins.flavors.values()):
            close = getattr(component, "close", None)
            if callable(close):
                close()  # stop the group controllers (their instances keep running) and new builds
        threads = [threading.Thread(target=grpc_server.stop, args=(server, args.grace))]
        if jsonrpc is not None:
            threads.append(threading.Thread(target=jsonrpc.stop, args=(args.grace,)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        for lst in listens:
            if lst.kind == "unix":
                Path(lst.target).unlink(missing_ok=True)
    print("stopped", file=sys.stderr, flush=True)
    return 0


LEADER_HEALTH = "mobykit.leader"  # grpc.health.v1 service name: SERVING on the replica that runs the controllers


def _health_role(server):
    """Report the role in gRPC health: ``mobykit.leader`` is SERVING only on the leader (so a
    health check or a load balancer can find it); the server itself stays SERVING on every replica."""
    from grpc_health.v1 import health_pb2

    health = getattr(server, "mobykit_health", None)

    def on_role(role) -> None:
        if health is not None:
            health.set(LEADER_HEALTH, health_pb2.HealthCheckResponse.SERVING if role.role == "leader"
                       else health_pb2.HealthCheckResponse.NOT_SERVING)
    return on_role


def _serve_metrics(address: str, registry):
    """prometheus-client's own HTTP server on HOST:PORT (loopback is the sensible default)."""
    from prometheus_client import start_http_server

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidArgument(f"--metrics {address!r}: expected HOST:PORT")
    server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
    return server
