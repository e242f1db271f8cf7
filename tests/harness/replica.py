"""``python -m harness.replica serve ...``: the real ``mobykit serve``, with the provider
``memory`` served by the test's shared cloud (``harness.sharedcloud``) and the extra flavor
``mobykit/echo`` (``harness.mobykit_server.EchoFlavor``: health from the tag ``health``)."""

from __future__ import annotations

import sys

from mobykit import providers
from mobykit.cli import serve
from mobykit.group import leader

ELECTION = None  # this server's leadership, for the cloud's term records


def _patch() -> None:
    providers._REGISTRY["memory"] = "harness.sharedcloud:RemoteMemory"
    election_for = leader.election_for

    def recording_election_for(*args, **kwargs):
        global ELECTION
        ELECTION = election_for(*args, **kwargs)
        return ELECTION

    leader.election_for = recording_election_for
    compose = serve.compose

    def compose_with_echo(*args, **kwargs):
        from harness.mobykit_server import EchoFlavor

        plugins = compose(*args, **kwargs)
        plugins.flavors["echo"] = EchoFlavor()
        return plugins

    serve.compose = compose_with_echo


if __name__ == "__main__":
    sys.modules["harness.replica"] = sys.modules[__name__]  # one ELECTION, whichever name imports it
    _patch()
    from mobykit.cli.main import main

    sys.exit(main(sys.argv[1:]))
