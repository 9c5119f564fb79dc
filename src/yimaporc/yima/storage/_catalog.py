"""The ``yima-storage`` catalog: one replicated document, parsed into :class:`Catalog`.

Cluster-wide storage metadata lives in one
:class:`~yimaporc.cluster.catalog.ReplicatedDocument` named ``yima-storage``::

    {"policy":  MergePolicy,            fixed for the cluster's life
     "disks":   [PhysicalDisk, ...],    the committed physical disks
     "history": ScalingHistory | null,  SCADDAR history over their logical disks
     "pending": null | {"history": ..., "disks": [...]},   during a reorganisation
     "media":   {name: MediaInfo},      every stored file (seed, size, digest of its
                                        time index; the index is in yima/timeindex.py)
     "retired": [{"node_id", "path", "disk_id"}],          removed disks, not re-added
     "removed": {name: seed}}           tombstones of `media rm`

It travels as records (:func:`split_catalog`): the topology in one, each file in its own.
"""

from __future__ import annotations

from typing import Any

import attrs

from ..disks import MergePolicy, PhysicalDisk
from ..media import MediaInfo
from ..placement import ScalingHistory

__all__ = [
    "DOCUMENT",
    "MEDIA",
    "TOPOLOGY",
    "Catalog",
    "empty_document",
    "join_catalog",
    "no_topology",
    "split_catalog",
]

DOCUMENT = "yima-storage"


def empty_document(policy: MergePolicy | None = None) -> dict[str, Any]:
    """The catalog of a cluster with no disks and no media."""
    return {
        "policy": (policy or MergePolicy()).to_json(),
        "disks": [],
        "history": None,
        "pending": None,
        "media": {},
        "retired": [],
    }


#: The record holding everything but the media; each file is in ``media/NAME``.
TOPOLOGY = "topology"
MEDIA = "media/"


def split_catalog(doc: dict[str, Any]) -> dict[str, Any]:
    """The catalog's replicated records: one for the topology (policy, disks, history,
    pending, retired) and one per media file (``media/NAME``)."""
    out: dict[str, Any] = {TOPOLOGY: {k: v for k, v in doc.items() if k != "media"}}
    out.update({MEDIA + n: m for n, m in doc.get("media", {}).items()})
    return out


def join_catalog(records: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`split_catalog` (record values are shared, not copied)."""
    topology = records.get(TOPOLOGY)
    if topology is None:
        topology = {k: v for k, v in empty_document().items() if k != "media"}
    media = {k[len(MEDIA) :]: v for k, v in records.items() if k.startswith(MEDIA)}
    return {**topology, "media": media}


@attrs.frozen
class Catalog:
    """A parsed snapshot of the ``yima-storage`` document."""

    policy: MergePolicy
    disks: tuple[PhysicalDisk, ...]
    history: ScalingHistory | None
    pending: ScalingHistory | None
    pending_disks: tuple[PhysicalDisk, ...]
    media: dict[str, MediaInfo]
    retired: tuple[tuple[str, str], ...]
    #: Records written before the time index left the catalog: name -> entry with it.
    legacy: dict[str, MediaInfo] = attrs.field(factory=dict)

    @classmethod
    def parse(
        cls, doc: dict[str, Any], known: dict[str, tuple[Any, MediaInfo]] | None = None
    ) -> Catalog:
        """Parse the document (raises ValueError on a malformed one).

        ``known`` maps names to ``(raw entry, MediaInfo)`` parsed before: an entry
        that is the very same object (an unchanged record) is not parsed again,
        so a catalog change costs the records it changed.  Entries hold no time
        index (its digest only); a record that still carries one (written before
        the index left the catalog) is listed in :attr:`legacy` with it, when
        first parsed.
        """
        history = doc.get("history")
        pending = doc.get("pending") or None
        media: dict[str, MediaInfo] = {}
        legacy: dict[str, MediaInfo] = {}
        for name, raw in doc.get("media", {}).items():
            hit = None if known is None else known.get(name)
            if hit is not None and hit[0] is raw:
                media[name] = hit[1]
                continue
            full = MediaInfo.from_json(raw)
            media[name] = full.bare()
            if full.block_times:
                legacy[name] = full
        if known is not None:
            known.clear()
            known.update({n: (doc["media"][n], m) for n, m in media.items()})
        return cls(
            MergePolicy.from_json(doc.get("policy") or MergePolicy().to_json()),
            tuple(PhysicalDisk.from_json(d) for d in doc.get("disks", [])),
            None if history is None else ScalingHistory.from_json(history),
            None if pending is None else ScalingHistory.from_json(pending["history"]),
            () if pending is None else tuple(PhysicalDisk.from_json(d) for d in pending["disks"]),
            media,
            tuple((r["node_id"], r["path"]) for r in doc.get("retired", [])),
            legacy,
        )

    def all_disks(self) -> tuple[PhysicalDisk, ...]:
        """Committed disks plus those a reorganisation is adding."""
        seen = {d.disk_id for d in self.disks}
        return self.disks + tuple(d for d in self.pending_disks if d.disk_id not in seen)


def no_topology() -> dict[str, Any]:
    """The topology record of a cluster with no disks."""
    return split_catalog(empty_document())[TOPOLOGY]  # type: ignore[no-any-return]
