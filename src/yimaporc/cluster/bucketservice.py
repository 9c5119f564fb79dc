"""Keeps a node's copy of the cluster's bucket map (Porcupine's user map) current.

The TRM coordinator computes the new map in the commit (via the node's commit
attachment hook) and every member installs it from the commit it receives, so
all members of a view hold the same map (seed §3.2).  The map is soft state but
it is cached in the data dir, so a restarted coordinator still moves few buckets.
Subscribers hear, after each change, which buckets are fresh (seed §3.3).

The commit also names the coordinator's previous view (epoch, coordinator).  A
member whose own previous view differs was *away* (it rebooted, sat in another
partition, or installed a commit that coordinator never saw): what it and the
others know about each other may differ although no bucket moved, so
:attr:`BucketMapService.away` tells subscribers to resend and re-ask (the
mail simulator, ``mailsim`` (now the bench's mail cost model, ``bench/mailmodel``), found lost soft state
without this).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

from twisted.logger import Logger
from zope.interface import implementer

from .buckets import DEFAULT_BUCKETS, BucketMap, MalformedMap
from .interfaces import IBucketMap
from .membership import View
from .node import ClusterNode, IMembershipListener
from .wire import Member

FreshListener = Callable[[BucketMap, BucketMap, set[int]], None]

_MAGIC = b"BKC1"


def pack_commit(previous: View, new_map: BucketMap) -> bytes:
    """The commit attachment: ``BKC1``, the coordinator's previous view (epoch u64,
    coordinator str8), then the map (:meth:`BucketMap.serialize`)."""
    name = previous.coordinator.encode("utf-8")[:255]
    head = _MAGIC + struct.pack("!QB", previous.epoch, len(name)) + name
    return head + new_map.serialize()


def unpack_commit(data: bytes) -> tuple[tuple[int, str] | None, BucketMap]:
    """Inverse of :func:`pack_commit` (a bare map: previous view unknown, None);
    :class:`MalformedMap` on bad bytes."""
    if not data.startswith(_MAGIC):
        return None, BucketMap.parse(data)
    try:
        epoch, n = struct.unpack_from("!QB", data, 4)
        name = data[13 : 13 + n]
        if len(name) != n:
            raise ValueError("short coordinator name")
        previous = (int(epoch), name.decode("utf-8"))
    except (struct.error, ValueError) as e:
        raise MalformedMap(f"bad commit head: {e}") from e
    return previous, BucketMap.parse(data[13 + n :])


@implementer(IMembershipListener, IBucketMap)
class BucketMapService:
    """The bucket map as this node knows it, updated on every committed view."""

    log = Logger()

    def __init__(self, node: ClusterNode, n_buckets: int = DEFAULT_BUCKETS) -> None:
        self.node = node
        self.path: Path = node.config.data_dir / "bucketmap.bin"
        self.map = self._load(n_buckets)
        # A cache (a lost write costs a few bucket moves): atomic, not fsynced, off the reactor.
        self.file = node.state_file_for("bucketmap", self.path, durable=False)
        self._listeners: list[FreshListener] = []
        #: True while the last installed view says this node was away (see the module
        #: docstring); a boot's group of one counts as away.
        self.away = False
        self.away_installs = 0
        node.set_commit_attachment(self._compute)
        node.subscribe(self)

    def subscribe(self, listener: FreshListener) -> None:
        """Call ``listener(old_map, new_map, fresh_buckets)`` after each change."""
        self._listeners.append(listener)

    def was_away(self) -> bool:
        """See :class:`IBucketMap`: :attr:`away`."""
        return self.away

    def owner(self, bucket: int) -> str:
        """The node managing ``bucket`` ("" if none)."""
        return self.map.owners[bucket]

    def status(self) -> dict[str, object]:
        """``buckets``: node id -> number of buckets it manages."""
        return {"buckets": self.map.counts()}

    def owners(self, body: dict[str, object], query: dict[str, str]) -> dict[str, object]:
        """``GET /api/buckets``: ``{"owners": [node id of bucket 0, 1, ...]}`` as this node
        knows the map (a bench or an operator finds which node manages a user)."""
        return {"owners": list(self.map.owners)}

    def _compute(self, old: View, members: tuple[Member, ...], epoch: int) -> bytes:
        return pack_commit(old, self.map.reassign([m.node_id for m in members], epoch))

    def membership_changed(self, old: View, new: View) -> None:
        """Install the map shipped with the commit (or compute it for a group of one)."""
        if new.attachment:
            try:
                previous, new_map = unpack_commit(new.attachment)
            except MalformedMap as e:
                self.log.error("bucket map in commit {epoch} unreadable: {e}", epoch=new.epoch, e=e)
                return
            away = previous is not None and previous != (old.epoch, old.coordinator)
        else:
            new_map = self.map.reassign(new.node_ids, new.epoch)
            away = True  # booted: a group of one
        if len(new_map) != len(self.map):
            self.log.error(
                "bucket map of {n} buckets, this node uses {m}: check every node's configuration",
                n=len(new_map),
                m=len(self.map),
            )
            return
        old_map, self.map = self.map, new_map
        self._log_moves(old_map, new_map, new.epoch)
        self.away = away
        self.away_installs += away
        self._save()
        fresh = new_map.fresh(old_map)
        for listener in list(self._listeners):
            try:
                listener(old_map, new_map, fresh)
            except Exception:
                self.log.failure("bucket map listener {l!r} failed", l=listener)

    def _log_moves(self, old_map: BucketMap, new_map: BucketMap, epoch: int) -> None:
        """One line when buckets changed manager: how many, and between whom."""
        pairs: dict[tuple[str, str], int] = {}
        for before, after in zip(old_map.owners, new_map.owners, strict=True):
            if before != after:
                key = (before or "(none)", after or "(none)")
                pairs[key] = pairs.get(key, 0) + 1
        if not pairs:
            return
        ranked = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        moves = ", ".join(f"{a}->{b} {n}" for (a, b), n in ranked[:8])
        if len(ranked) > 8:
            moves += f", {len(ranked) - 8} more pairs"
        self.log.info(
            "buckets: epoch {epoch}: {n} of {total} buckets moved ({moves})",
            epoch=epoch,
            n=sum(pairs.values()),
            total=len(new_map),
            moves=moves,
            event="buckets_moved",
        )

    def _load(self, n: int) -> BucketMap:
        try:
            m = BucketMap.parse(self.path.read_bytes())
            return m if len(m) == n else BucketMap.empty(n)
        except (OSError, MalformedMap):
            return BucketMap.empty(n)

    def _save(self) -> None:
        self.file.save(self.map.serialize)  # the map is immutable: serialised in the pool
