"""A bucket map: a fixed number of buckets, each managed by one live node (pure).

Porcupine's user map (seed §3.2) is one: users hash to buckets; the TRM
coordinator recomputes the map on every membership change and ships it in the
commit.  :meth:`BucketMap.reassign` moves as few buckets as possible (only those
of departed nodes, plus what a newcomer needs to reach its share) and spreads
them by weight; each bucket remembers the epoch it was last reassigned in, so
every node can tell which buckets are *fresh* (seed §3.3).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import attrs
import construct as c

DEFAULT_BUCKETS = 256

_Wire = c.Struct(
    "magic" / c.Const(b"BKM1"),
    "nodes" / c.PrefixedArray(c.Int16ub, c.PascalString(c.Int8ub, "utf8")),
    "buckets" / c.PrefixedArray(c.Int16ub, c.Struct("owner" / c.Int16ub, "epoch" / c.Int64ub)),
    c.Terminated,
)


class MalformedMap(Exception):
    """Bytes that are not a bucket map."""


@attrs.frozen
class BucketMap:
    """``owners[b]`` manages bucket ``b`` since epoch ``epochs[b]`` ("" = nobody)."""

    owners: tuple[str, ...]
    epochs: tuple[int, ...]

    @classmethod
    def empty(cls, n: int = DEFAULT_BUCKETS) -> BucketMap:
        """A map in which nobody manages anything."""
        return cls(("",) * n, (0,) * n)

    def __len__(self) -> int:
        return len(self.owners)

    def counts(self) -> dict[str, int]:
        """Buckets per node."""
        out: dict[str, int] = {}
        for o in self.owners:
            if o:
                out[o] = out.get(o, 0) + 1
        return out

    def buckets_of(self, node_id: str) -> list[int]:
        """The buckets ``node_id`` manages."""
        return [b for b, o in enumerate(self.owners) if o == node_id]

    def fresh(self, old: BucketMap) -> set[int]:
        """Buckets reassigned since ``old`` (epoch or owner differs, seed §3.3).

        The owner counts too: two partitions can commit the same epoch number
        with different owners for a bucket.
        """
        if len(old) != len(self):
            return set(range(len(self)))
        return {
            b
            for b in range(len(self))
            if self.epochs[b] != old.epochs[b] or self.owners[b] != old.owners[b]
        }

    def without(self, nodes: Iterable[str]) -> BucketMap:
        """This map with the buckets of ``nodes`` unassigned (for :meth:`reassign` to hand
        out again with a new epoch, e.g. because those nodes rebooted and lost their soft
        state)."""
        gone = set(nodes)
        if not gone:
            return self
        return BucketMap(tuple("" if o in gone else o for o in self.owners), self.epochs)

    def reassign(
        self, live: Iterable[str], epoch: int, weights: Mapping[str, float] | None = None
    ) -> BucketMap:
        """The map for the new membership ``live``, with moved buckets stamped ``epoch``."""
        nodes = sorted(set(live))
        if not nodes:
            return BucketMap.empty(len(self))
        quota = _quotas(len(self), nodes, weights or {})
        owners = list(self.owners)
        counts = {n: 0 for n in nodes}
        free: list[int] = []
        for b, o in enumerate(owners):
            if o in counts:
                counts[o] += 1
            else:
                free.append(b)
        # Nodes above their share give up their highest-numbered buckets.
        for n in nodes:
            excess = counts[n] - quota[n]
            if excess > 0:
                mine = [b for b in range(len(owners) - 1, -1, -1) if owners[b] == n]
                free.extend(mine[:excess])
                counts[n] -= excess
        free.sort()
        epochs = list(self.epochs)
        needy = [n for n in nodes if counts[n] < quota[n]]
        i = 0
        for b in free:
            while counts[needy[i]] >= quota[needy[i]]:
                i += 1
            owners[b] = needy[i]
            counts[needy[i]] += 1
            epochs[b] = epoch
        return BucketMap(tuple(owners), tuple(epochs))

    def serialize(self) -> bytes:
        """Compact bytes (rides in the TRM commit)."""
        names = sorted({o for o in self.owners})
        index = {n: i for i, n in enumerate(names)}
        return bytes(
            _Wire.build(
                {
                    "nodes": names,
                    "buckets": [
                        {"owner": index[o], "epoch": e}
                        for o, e in zip(self.owners, self.epochs, strict=True)
                    ],
                }
            )
        )

    @classmethod
    def parse(cls, data: bytes) -> BucketMap:
        """Inverse of :meth:`serialize`; :class:`MalformedMap` on bad bytes."""
        try:
            obj = _Wire.parse(data)
            owners = tuple(obj.nodes[b.owner] for b in obj.buckets)
        except (c.ConstructError, IndexError, UnicodeDecodeError) as e:
            raise MalformedMap(str(e).splitlines()[0] if str(e) else "bad map") from e
        return cls(owners, tuple(b.epoch for b in obj.buckets))


def _quotas(n: int, nodes: Sequence[str], weights: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder shares of ``n`` buckets by weight (default 1 each)."""
    w = {node: max(0.0, float(weights.get(node, 1.0))) for node in nodes}
    total = sum(w.values()) or float(len(nodes))
    if not sum(w.values()):
        w = dict.fromkeys(nodes, 1.0)
    exact = {node: n * w[node] / total for node in nodes}
    quota = {node: math.floor(x) for node, x in exact.items()}
    rest = n - sum(quota.values())
    for node in sorted(nodes, key=lambda x: (-(exact[x] - quota[x]), x))[:rest]:
        quota[node] += 1
    return quota
