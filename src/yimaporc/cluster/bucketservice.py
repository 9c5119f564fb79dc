"""Keeps a node's copy of the cluster's bucket map (Porcupine's user map) current.

The TRM coordinator computes the new map in the commit (via the node's commit
attachment hook) and every member installs it from the commit it receives, so
all members of a view hold the same map (seed §3.2).  The map is soft state but
it is cached in the data dir, so a restarted coordinator still moves few buckets.
Subscribers hear, after each change, which buckets are fresh (seed §3.3).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from twisted.logger import Logger
from zope.interface import implementer

from .buckets import DEFAULT_BUCKETS, BucketMap, MalformedMap
from .membership import View
from .node import ClusterNode, IMembershipListener
from .wire import Member

FreshListener = Callable[[BucketMap, BucketMap, set[int]], None]


@implementer(IMembershipListener)
class BucketMapService:
    """The bucket map as this node knows it, updated on every committed view."""

    log = Logger()

    def __init__(self, node: ClusterNode, n_buckets: int = DEFAULT_BUCKETS) -> None:
        self.node = node
        self.path: Path = node.config.data_dir / "bucketmap.bin"
        self.map = self._load(n_buckets)
        self._listeners: list[FreshListener] = []
        node.set_commit_attachment(self._compute)
        node.subscribe(self)

    def subscribe(self, listener: FreshListener) -> None:
        """Call ``listener(old_map, new_map, fresh_buckets)`` after each change."""
        self._listeners.append(listener)

    def owner(self, bucket: int) -> str:
        """The node managing ``bucket`` ("" if none)."""
        return self.map.owners[bucket]

    def status(self) -> dict[str, object]:
        """``buckets``: node id -> number of buckets it manages."""
        return {"buckets": self.map.counts()}

    def _compute(self, old: View, members: tuple[Member, ...], epoch: int) -> bytes:
        return self.map.reassign([m.node_id for m in members], epoch).serialize()

    def membership_changed(self, old: View, new: View) -> None:
        """Install the map shipped with the commit (or compute it for a group of one)."""
        if new.attachment:
            try:
                new_map = BucketMap.parse(new.attachment)
            except MalformedMap as e:
                self.log.error("bucket map in commit {epoch} unreadable: {e}", epoch=new.epoch, e=e)
                return
        else:
            new_map = self.map.reassign(new.node_ids, new.epoch)
        if len(new_map) != len(self.map):
            self.log.error(
                "bucket map of {n} buckets, this node uses {m}: check every node's configuration",
                n=len(new_map),
                m=len(self.map),
            )
            return
        old_map, self.map = self.map, new_map
        self._save()
        fresh = new_map.fresh(old_map)
        for listener in list(self._listeners):
            try:
                listener(old_map, new_map, fresh)
            except Exception:
                self.log.failure("bucket map listener {l!r} failed", l=listener)

    def _load(self, n: int) -> BucketMap:
        try:
            m = BucketMap.parse(self.path.read_bytes())
            return m if len(m) == n else BucketMap.empty(n)
        except (OSError, MalformedMap):
            return BucketMap.empty(n)

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(self.map.serialize())
        os.replace(tmp, self.path)
