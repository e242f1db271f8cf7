"""The server's config file: which settings each provider gets.

YAML, from ``--config FILE`` or ``$MOBYKIT_CONFIG``; absent means defaults. Shape:
``{providers: {libvirt: {...}, aws: {...}, gcp: {...}, memory: {...}}, default_provider: NAME,
cache: DIR, allow_paths: [DIR...], flavors: {moby: {PrepareWait: "10s"}}, store: URL}`` (``store``: see
``mobykit.cli.serve.store_settings``). Each
provider section is handed to that provider unread: only the provider knows its keys, so an
unknown key there is reported by the provider, naming it. Top-level keys are checked here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mobykit.errors import InvalidArgument

TOP_LEVEL_KEYS = ("providers", "default_provider", "cache", "flavors", "group", "allow_paths", "store")
ENV = "MOBYKIT_CONFIG"


def load(path: str | Path | None = None) -> dict[str, Any]:
    """Read and check the config file; ``path`` None means ``$MOBYKIT_CONFIG`` or no file."""
    import yaml

    if path is None:
        path = os.environ.get(ENV) or None
    if path is None:
        return {"providers": {}}
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise InvalidArgument(f"{path}: cannot read config file: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InvalidArgument(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    out = check(data, str(path))
    # Relative allow_paths are the config file's, like every other path an operator writes in it.
    if out.get("allow_paths"):
        out["allow_paths"] = [str(path.parent.absolute() / os.path.expanduser(d)) for d in out["allow_paths"]]
    return out


def effective_path(path: str | Path | None) -> Path | None:
    """The config file ``load`` reads for ``path``: it, else ``$MOBYKIT_CONFIG``, else none."""
    path = path or os.environ.get(ENV) or None
    return Path(path) if path is not None else None


def path_policy(config: dict[str, Any], extra: list[str] | None = None, config_file: Path | None = None):
    """What a server may read on behalf of its clients (``mobykit.core.paths``): ``--allow-path``
    and the config's ``allow_paths``; with neither, the config file's directory, else the working
    directory. The first root is where relative request paths and inline specs are taken from."""
    from mobykit.core.paths import PathPolicy

    dirs = list(extra or []) + list(config.get("allow_paths") or [])
    if not dirs:
        default = str(config_file.parent.absolute()) if config_file is not None else os.getcwd()
        if os.path.realpath(default) == "/":
            # A server started from / (a service manager's default) would otherwise let its clients
            # name any file: the operator must say which directories hold specs.
            raise InvalidArgument("the server would allow requests to read any file (its working directory is /): "
                                  "give --allow-path DIR (or allow_paths in the config) for the specs it serves")
        dirs = [default]
    return PathPolicy.under(dirs)


def check(data: Any, source: str = "config") -> dict[str, Any]:
    """Validate the config's top level; returns it with ``providers`` always present."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidArgument(f"{source}: must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise InvalidArgument(f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(TOP_LEVEL_KEYS)})")
    providers = data.get("providers") or {}
    if not isinstance(providers, dict):
        raise InvalidArgument(f"{source}: providers: must be a mapping of provider name to settings")
    for name, section in providers.items():
        if section is not None and not isinstance(section, dict):
            raise InvalidArgument(f"{source}: providers.{name}: must be a mapping, got {type(section).__name__}")
    allow = data.get("allow_paths")
    if allow is not None and (not isinstance(allow, list) or not all(isinstance(d, str) and d for d in allow)):
        raise InvalidArgument(f"{source}: allow_paths: must be a list of directories")
    out = dict(data)
    out["providers"] = {name: dict(section or {}) for name, section in providers.items()}
    return out


def provider_settings(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The settings section of provider ``name`` (empty when the file has none)."""
    return dict((config.get("providers") or {}).get(name) or {})
