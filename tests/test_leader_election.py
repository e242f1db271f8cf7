"""The election itself, in-process against a real etcd cluster: terms grow, a deposed leader's
store writes fail (they compare its term), and a leader cut off from etcd stops acting before its
lease can have expired."""

from __future__ import annotations

import time

import pytest

from harness.etcd import etcd_cluster
from mobykit.group.leader import EtcdElection
from mobykit.group.store import GroupRecord, NotLeader
from mobykit.group.store.etcd import EtcdStore

pytestmark = pytest.mark.slow


def wait_for(cond, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_terms_guard_writes_and_a_leader_without_etcd_stops_acting():
    with etcd_cluster() as etcd:
        store = EtcdStore.open(etcd.url)
        a = EtcdElection(store.client, ttl=2, name="a")
        b = EtcdElection(EtcdStore.open(etcd.url).client, ttl=2, name="b")
        try:
            a.start(lambda: None)
            wait_for(lambda: a.is_leader, "a leads")
            b.start(lambda: None)
            wait_for(lambda: b.role().role == "follower", "b follows")
            assert b.role().leader == "a"
            with pytest.raises(NotLeader, match="b is not the leader"):
                b.check()
            rec = GroupRecord(id="web", spec={"ID": "web"}, commit="c1")
            stale = a.guard()
            assert store.put(rec, guard=stale)
            term_a = a.term
            a.stop()  # steps down: revokes its lease, b takes over at once
            wait_for(lambda: b.is_leader, "b leads")
            assert b.term > term_a
            assert not store.put(GroupRecord(id="web", spec={"ID": "web"}, commit="late"), guard=stale)
            assert store.get("web").commit == "c1"  # the deposed leader's late write did not land
            assert store.put(GroupRecord(id="web", spec={"ID": "web"}, commit="c2"), guard=b.guard())

            # Cut b off from every member: within its lease it stops acting, without being told.
            b.check()
            etcd.stop_all()
            cut = time.monotonic()
            wait_for(lambda: not b.is_leader, "b to stop acting", timeout=10)
            with pytest.raises(NotLeader):
                b.check()
            assert b.term == 0
            # b counted its lease from before it sent its last keep-alive (before the cut), minus a
            # margin: it stopped before etcd could have expired the lease and let a successor in.
            assert b._valid_until <= cut + 2.0 - b.margin
        finally:
            a.stop()
            b._stop.set()
