"""Where the group controller's memory outlives the server: what was committed, and what only the
controller knew (halts, give-ups, the previous spec for ``Rollback: auto``, first-healthy times).

Instances stay the truth about what runs; the store is the truth about what was asked. ``open_store``
turns the ``--store`` URL into a backend: ``file:DIR`` (one server, flock'd) or
``etcd://HOST:PORT[,...]`` (any number of replicas, one leader; see ``mobykit.group.leader``).
"""

from mobykit.group.store.base import (
    FORMAT_VERSION,
    Event,
    GroupRecord,
    NotLeader,
    Store,
    StoreError,
    open_store,
)

__all__ = ["FORMAT_VERSION", "Event", "GroupRecord", "NotLeader", "Store", "StoreError", "open_store"]
