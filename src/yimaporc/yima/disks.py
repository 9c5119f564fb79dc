"""Physical disks and disk merging into uniform logical disks (pure).

Disk merging (R. Zimmermann, S. Ghandeharizadeh, "Continuous Display Using
Heterogeneous Disk-Subsystems", ACM Multimedia 1997; used by Yima for its
heterogeneous, parity-protected storage) presents physical disks of different
sizes and speeds as logical disks that are all alike, so placement can treat
every logical disk the same.  Here a logical disk is one *unit* of capacity
(and, when bandwidths are known, one unit of bandwidth): a physical disk hosts
``min(capacity // unit, bandwidth // unit_bandwidth)`` logical disks, at least
one.  Placement is uniform over logical disks, so each physical disk receives
blocks in proportion to its capacity.  Logical disk ``k`` of physical disk
``P`` has the stable id ``"P#k"``.  Any remainder below one unit is left unused
and reported by :func:`merge_report`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from .placement import LogicalDisk, ScalingHistory

SEPARATOR = "#"
# A physical disk given without a capacity counts as exactly one unit.
DEFAULT_UNIT = 1 << 30


class DiskError(ValueError):
    """A disk description or disk operation is invalid (message is user-facing)."""


def _check_id(value: str) -> None:
    if not value or SEPARATOR in value or "/" in value or value.strip() != value:
        raise DiskError(f"bad disk id {value!r}: non-empty, no '/', '#' or surrounding spaces")


@attrs.frozen
class PhysicalDisk:
    """A directory on one node that stores blocks."""

    disk_id: str
    node_id: str
    path: str
    capacity: int | None = None
    bandwidth: int | None = None

    def __attrs_post_init__(self) -> None:
        _check_id(self.disk_id)
        if self.capacity is not None and self.capacity <= 0:
            raise DiskError(f"disk {self.disk_id}: capacity must be positive")
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise DiskError(f"disk {self.disk_id}: bandwidth must be positive")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> PhysicalDisk:
        """Inverse of :meth:`to_json`."""
        unknown = set(obj) - {f.name for f in attrs.fields(cls)}
        if unknown:
            raise DiskError(f"unknown disk field(s): {', '.join(sorted(unknown))}")
        try:
            return cls(**obj)
        except TypeError as e:
            raise DiskError(f"malformed disk: {e}") from e


@attrs.frozen
class MergePolicy:
    """The uniform size of a logical disk; fixed for the life of a cluster."""

    unit: int = DEFAULT_UNIT
    unit_bandwidth: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.unit <= 0 or (self.unit_bandwidth is not None and self.unit_bandwidth <= 0):
            raise DiskError("logical disk unit must be positive")

    def logical_count(self, disk: PhysicalDisk) -> int:
        """How many logical disks ``disk`` hosts."""
        count = 1 if disk.capacity is None else disk.capacity // self.unit
        if self.unit_bandwidth is not None and disk.bandwidth is not None:
            count = min(count, disk.bandwidth // self.unit_bandwidth)
        return max(1, count)

    def logical_disks(self, disk: PhysicalDisk) -> tuple[LogicalDisk, ...]:
        """The logical disks of ``disk``, ids ``disk_id#0 .. disk_id#k-1``."""
        return tuple(
            LogicalDisk(f"{disk.disk_id}{SEPARATOR}{k}", disk.node_id, disk.disk_id)
            for k in range(self.logical_count(disk))
        )

    def merge(self, disks: Iterable[PhysicalDisk]) -> tuple[LogicalDisk, ...]:
        """All logical disks of ``disks``, in order."""
        out: list[LogicalDisk] = []
        seen: set[str] = set()
        for d in disks:
            if d.disk_id in seen:
                raise DiskError(f"duplicate disk id {d.disk_id}")
            seen.add(d.disk_id)
            out.extend(self.logical_disks(d))
        return tuple(out)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"unit": self.unit, "unit_bandwidth": self.unit_bandwidth}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> MergePolicy:
        """Inverse of :meth:`to_json`."""
        return cls(int(obj["unit"]), obj.get("unit_bandwidth"))


def choose_unit(capacities: Sequence[int], max_per_disk: int = 16, max_waste: float = 0.05) -> int:
    """The largest unit that wastes at most ``max_waste`` of the total capacity.

    No disk gets more than ``max_per_disk`` logical disks (so the smallest
    sensible unit is ``max(capacities) / max_per_disk``).  Tried units are the
    smallest disk divided by 1, 2, 3, ...
    """
    if not capacities or min(capacities) <= 0:
        raise DiskError("capacities must be positive")
    total = sum(capacities)
    floor_unit = -(-max(capacities) // max_per_disk)
    best = max(floor_unit, 1)
    for parts in range(1, max_per_disk + 1):
        unit = min(capacities) // parts
        if unit < floor_unit or unit <= 0:
            break
        waste = sum(c % unit for c in capacities)
        if waste <= max_waste * total:
            return unit
        best = unit
    return best


def merge_report(disks: Iterable[PhysicalDisk], policy: MergePolicy) -> list[dict[str, Any]]:
    """Per physical disk: logical disks hosted and capacity left unused."""
    out = []
    for d in disks:
        k = policy.logical_count(d)
        unused = None if d.capacity is None else max(0, d.capacity - k * policy.unit)
        out.append({"disk_id": d.disk_id, "logical": k, "unused": unused})
    return out


def physical_of(logical_id: str) -> str:
    """The physical disk id inside a logical disk id ``P#k``."""
    return logical_id.rsplit(SEPARATOR, 1)[0]


def physical_loads(placed: Iterable[int], history: ScalingHistory) -> Counter[str]:
    """Blocks per physical disk, given their current logical disk indices."""
    table = history.disks
    by_logical = Counter(placed)
    loads: Counter[str] = Counter()
    for index, n in by_logical.items():
        loads[table[index].physical] += n
    return loads


def initial_history(disks: Sequence[PhysicalDisk], policy: MergePolicy) -> ScalingHistory:
    """A fresh scaling history over ``disks``."""
    return ScalingHistory(policy.merge(disks))


def add_physical(
    history: ScalingHistory, disk: PhysicalDisk, policy: MergePolicy
) -> ScalingHistory:
    """``history`` plus one SCADDAR add of ``disk``'s logical disks."""
    if disk.disk_id in {d.physical for d in history.disks}:
        raise DiskError(f"disk {disk.disk_id} is already in use")
    return history.add(policy.logical_disks(disk))


def remove_physical(history: ScalingHistory, disk_id: str) -> ScalingHistory:
    """``history`` plus one SCADDAR remove of every logical disk of ``disk_id``."""
    gone = [i for i, d in enumerate(history.disks) if d.physical == disk_id]
    if not gone:
        raise DiskError(f"no such disk: {disk_id}")
    if len(gone) == history.n_disks:
        raise DiskError(f"cannot remove {disk_id}: it is the last disk")
    return history.remove(gone)
