"""`mobykit serve --metrics`: a real server process, a group committed over gRPC with the vanilla
flavor on the memory provider, and Prometheus' text format scraped over HTTP."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest

from harness.mobykit_server import serve_process
from mobykit.rpc.client import connect
from mobykit.spi.group import GroupSpec

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_report_group_instances_and_provisions():
    port = _free_port()
    config = {"default_provider": "memory", "providers": {"memory": {}}, "group": {"PollInterval": 0.2}}
    with serve_process(["--no-infrakit", "--listen", "unix:sock", "--metrics", f"127.0.0.1:{port}"],
                       config=config, expect=2) as sp:
        address = next(a for a in sp.addresses if a.startswith("unix:"))
        group = connect(address).group
        spec = GroupSpec(id="web", properties={
            "Allocation": {"Size": 2},
            "Instance": {"Plugin": "mobykit/memory", "Properties": {}},
            "Flavor": {"Plugin": "mobykit/vanilla", "Properties": {"Init": ["echo hi"]}},
        })
        group.commit_group(spec, False)
        # The gauges and the counter are updated by different threads: wait until all agree.
        expected = ('group="web",health="healthy"} 2.0', 'mobykit_group_target_size{group="web"} 2.0',
                    'mobykit_group_provisions_total{group="web",result="ok"} 2.0')
        deadline = time.monotonic() + 30
        while True:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            if all(e in text for e in expected):
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        assert "mobykit_group_instances{config=" in text


def test_unknown_group_option_is_named():
    from mobykit.cli.serve import group_options
    from mobykit.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="unknown key.*PollIntervall"):
        group_options({"group": {"PollIntervall": 1}})
    assert group_options({"group": {"SelfLogicalID": "mgr-1"}}).self_logical_id == "mgr-1"
    assert group_options({"group": {"IdlePollInterval": 60}}).idle_poll_interval == 60
