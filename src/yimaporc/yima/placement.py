"""Pseudorandom block placement and SCADDAR remapping (pure).

A file stores only its seed; every node recomputes where block ``i`` lives from
the seed and the cluster's :class:`ScalingHistory` (see docs/storage.md).

SCADDAR (Goel, Shahabi, Yao, Zimmermann, ICDE 2002; US patent 7,096,328): block
``i`` starts with a pseudorandom number ``X0`` and lives on disk ``X0 mod N0``.
Each scaling operation ``j`` maps ``X_{j-1}`` to ``X_j`` with a REMAP function
that uses only ``X_{j-1}``; the block is then on disk ``X_j mod N_j``::

    q, r = divmod(X_{j-1}, N_{j-1})
    add:     X_j = (q // N_j) * N_j + (r if q % N_j < N_{j-1} else q % N_j)
    remove:  X_j = (q // N_j) * N_j + (new(r) if r not in S else q % N_j)

Randomness exhaustion: each operation consumes the digit ``q mod N_j`` of
``X0`` written in the mixed radix ``N0, N1, ...``; a fixed-width ``X0`` runs out
after about ``64 / log2(N)`` operations.  Here ``X0`` is an arbitrary-precision
integer whose mixed-radix digits are drawn independently from a counter-based
hash of ``(seed, index, operation)``, topped by a 64-bit tail, so every
operation gets a fresh uniform digit and earlier answers never change when the
history grows.  :func:`disk_of` applies the REMAP formulas literally to that
integer; :func:`disks_of` computes the same thing digit-wise for many blocks.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

import attrs

MASK64 = (1 << 64) - 1
# One blake2b-512 digest gives eight 64-bit words: blocks 8k..8k+7 share a call.
LANES = 8
_KEY = struct.Struct("<QQII")
DATA_STREAM = 0


def _digest(seed: int, lane_group: int, step: int, stream: int) -> bytes:
    key = _KEY.pack(seed & MASK64, lane_group & MASK64, step, stream)
    return hashlib.blake2b(key, digest_size=64, person=b"yima-scaddar").digest()


def word(seed: int, index: int, step: int, stream: int = DATA_STREAM) -> int:
    """The 64-bit pseudorandom word for ``(seed, index, step, stream)``."""
    lane_group, lane = divmod(index, LANES)
    (w,) = struct.unpack_from("<Q", _digest(seed, lane_group, step, stream), 8 * lane)
    return int(w)


def words(seed: int, start: int, count: int, step: int, stream: int = DATA_STREAM) -> array[int]:
    """:func:`word` for indices ``start .. start+count-1``, in one pass."""
    first, skip = divmod(start, LANES)
    last = (start + count + LANES - 1) // LANES
    out = array("Q")
    out.frombytes(b"".join(_digest(seed, g, step, stream) for g in range(first, last)))
    if out.itemsize != 8:  # pragma: no cover - every supported platform has 8-byte "Q"
        raise RuntimeError("array('Q') is not 64-bit here")
    if struct.pack("=H", 1) != struct.pack("<H", 1):  # big-endian host
        out.byteswap()
    return out[skip : skip + count]


@attrs.frozen
class LogicalDisk:
    """One logical disk: a stable id plus its failure domains (node, physical disk)."""

    disk_id: str
    node_id: str = ""
    physical_id: str = ""

    @property
    def physical(self) -> str:
        """The physical disk hosting this logical disk (its own id if unset)."""
        return self.physical_id or self.disk_id

    def to_json(self) -> dict[str, str]:
        """JSON-ready dict."""
        return {"disk_id": self.disk_id, "node_id": self.node_id, "physical_id": self.physical_id}

    @classmethod
    def from_json(cls, obj: Any) -> LogicalDisk:
        """Inverse of :meth:`to_json` (a bare string is a disk id)."""
        if isinstance(obj, str):
            return cls(obj)
        return cls(
            str(obj["disk_id"]), str(obj.get("node_id", "")), str(obj.get("physical_id", ""))
        )


def _disks(items: Iterable[LogicalDisk | str]) -> tuple[LogicalDisk, ...]:
    return tuple(d if isinstance(d, LogicalDisk) else LogicalDisk(d) for d in items)


def _sorted_unique(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(sorted(set(values)))


@attrs.frozen
class AddDisks:
    """Scaling operation: append these logical disks (indices N..N+k-1)."""

    disks: tuple[LogicalDisk, ...] = attrs.field(converter=_disks)


@attrs.frozen
class RemoveDisks:
    """Scaling operation: remove these logical indices; survivors are renumbered in order."""

    indices: tuple[int, ...] = attrs.field(converter=_sorted_unique)


Operation = AddDisks | RemoveDisks


class HistoryError(ValueError):
    """A scaling history or operation is inconsistent (message is user-facing)."""


@attrs.frozen(cache_hash=True)
class ScalingHistory:
    """The initial logical disks and every scaling operation since, in order."""

    initial: tuple[LogicalDisk, ...] = attrs.field(converter=_disks)
    ops: tuple[Operation, ...] = ()

    def __attrs_post_init__(self) -> None:
        _compute_tables(self)  # validates

    @property
    def steps(self) -> int:
        """Number of scaling operations."""
        return len(self.ops)

    def counts(self) -> tuple[int, ...]:
        """``(N0, N1, ..., Nm)``: disk counts after each step."""
        return tuple(len(t) for t in _tables(self))

    def table(self, step: int | None = None) -> tuple[LogicalDisk, ...]:
        """Logical disks by index after ``step`` operations (default: all)."""
        tables = _tables(self)
        return tables[-1 if step is None else step]

    @property
    def disks(self) -> tuple[LogicalDisk, ...]:
        """Current logical disks, index ``i`` is logical disk ``i``."""
        return _tables(self)[-1]

    @property
    def disk_ids(self) -> tuple[str, ...]:
        """Current logical disk ids by index."""
        return tuple(d.disk_id for d in self.disks)

    @property
    def n_disks(self) -> int:
        """Current number of logical disks."""
        return len(self.disks)

    def index_of(self, disk_id: str) -> int:
        """Current logical index of ``disk_id``."""
        for i, d in enumerate(self.disks):
            if d.disk_id == disk_id:
                return i
        raise HistoryError(f"no such logical disk: {disk_id}")

    def add(self, disks: Iterable[LogicalDisk | str]) -> ScalingHistory:
        """A new history with these disks added."""
        return attrs.evolve(self, ops=(*self.ops, AddDisks(tuple(disks))))

    def remove(self, indices: Iterable[int]) -> ScalingHistory:
        """A new history with these current logical indices removed."""
        return attrs.evolve(self, ops=(*self.ops, RemoveDisks(tuple(indices))))

    def remove_ids(self, disk_ids: Iterable[str]) -> ScalingHistory:
        """A new history with these logical disk ids removed."""
        return self.remove(self.index_of(d) for d in disk_ids)

    def prefix(self, steps: int) -> ScalingHistory:
        """The history as it was after ``steps`` operations."""
        return attrs.evolve(self, ops=self.ops[:steps])

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (see docs/storage.md)."""
        ops: list[dict[str, Any]] = []
        for op in self.ops:
            if isinstance(op, AddDisks):
                ops.append({"add": [d.to_json() for d in op.disks]})
            else:
                ops.append({"remove": list(op.indices)})
        return {"initial": [d.to_json() for d in self.initial], "ops": ops}

    @classmethod
    def from_json(cls, obj: Any) -> ScalingHistory:
        """Inverse of :meth:`to_json`; raises :class:`HistoryError` on bad input."""
        try:
            ops: list[Operation] = []
            for op in obj["ops"]:
                if set(op) == {"add"}:
                    ops.append(AddDisks(tuple(LogicalDisk.from_json(d) for d in op["add"])))
                elif set(op) == {"remove"}:
                    ops.append(RemoveDisks(tuple(int(i) for i in op["remove"])))
                else:
                    raise HistoryError(f"unknown scaling operation {op!r}")
            return cls(tuple(LogicalDisk.from_json(d) for d in obj["initial"]), tuple(ops))
        except (KeyError, TypeError, AttributeError) as e:
            raise HistoryError(f"malformed scaling history: {e}") from e


@lru_cache(maxsize=256)
def _tables(history: ScalingHistory) -> tuple[tuple[LogicalDisk, ...], ...]:
    return _compute_tables(history)


def _compute_tables(history: ScalingHistory) -> tuple[tuple[LogicalDisk, ...], ...]:
    table = history.initial
    if not table:
        raise HistoryError("a scaling history needs at least one disk")
    tables = [table]
    for op in history.ops:
        if isinstance(op, AddDisks):
            if not op.disks:
                raise HistoryError("adding no disks")
            table = table + op.disks
        else:
            if not op.indices:
                raise HistoryError("removing no disks")
            if op.indices[0] < 0 or op.indices[-1] >= len(table):
                raise HistoryError(f"removed index out of range 0..{len(table) - 1}")
            if len(op.indices) >= len(table):
                raise HistoryError("cannot remove every disk")
            gone = set(op.indices)
            table = tuple(d for i, d in enumerate(table) if i not in gone)
        ids = [d.disk_id for d in table]
        if len(set(ids)) != len(ids):
            raise HistoryError("duplicate logical disk id")
        tables.append(table)
    return tuple(tables)


# -- SCADDAR REMAP functions, literally ---------------------------------------------


def remap_add(x: int, n_old: int, n_new: int) -> int:
    """REMAP for adding ``n_new - n_old`` disks (indices ``n_old..n_new-1``)."""
    q, r = divmod(x, n_old)
    d = q % n_new
    return (q // n_new) * n_new + (r if d < n_old else d)


def remap_remove(x: int, n_old: int, removed: Sequence[int]) -> int:
    """REMAP for removing logical indices ``removed``; survivors keep their order."""
    n_new = n_old - len(removed)
    q, r = divmod(x, n_old)
    if r in removed:
        return (q // n_new) * n_new + q % n_new
    return (q // n_new) * n_new + r - sum(1 for s in removed if s < r)


def x0_of(seed: int, index: int, history: ScalingHistory, stream: int = DATA_STREAM) -> int:
    """Block ``index``'s arbitrary-precision ``X0`` for this history.

    ``X0 = d0 + N0*(g1 + N1*(g2 + ... + N_{m-1}*(g_m + N_m*T)))`` with
    ``d0 = w0 mod N0``, ``g_j = w_j mod N_j`` and tail ``T = w_{m+1}``, where
    ``w_j = word(seed, index, j)``: uniform on ``[0, N0*...*Nm * 2**64)`` up to
    a bias below ``N / 2**64`` per digit.
    """
    counts = history.counts()
    m = len(counts) - 1
    acc = word(seed, index, m + 1, stream)
    for j in range(m, 0, -1):
        acc = word(seed, index, j, stream) % counts[j] + counts[j] * acc
    return word(seed, index, 0, stream) % counts[0] + counts[0] * acc


def disk_of(seed: int, index: int, history: ScalingHistory, stream: int = DATA_STREAM) -> int:
    """Current logical disk of block ``index`` (SCADDAR on the big-integer ``X0``)."""
    counts = history.counts()
    x = x0_of(seed, index, history, stream)
    for j, op in enumerate(history.ops, start=1):
        if isinstance(op, AddDisks):
            x = remap_add(x, counts[j - 1], counts[j])
        else:
            x = remap_remove(x, counts[j - 1], op.indices)
    return x % counts[-1]


def disks_of(
    seed: int,
    n_blocks: int,
    history: ScalingHistory,
    stream: int = DATA_STREAM,
    start: int = 0,
) -> list[int]:
    """Logical disks of blocks ``start .. start+n_blocks-1``, digit-wise (fast path).

    Equal to ``[disk_of(seed, i, history) for i in ...]``: with the mixed-radix
    ``X0`` above, ``q mod N_j`` is exactly the digit ``g_j``.
    """
    return disks_trace(seed, n_blocks, history, stream, start)[-1]


def disks_trace(
    seed: int,
    n_blocks: int,
    history: ScalingHistory,
    stream: int = DATA_STREAM,
    start: int = 0,
) -> list[list[int]]:
    """Logical disks of each block after every step ``0..m`` (for reorganisation)."""
    counts = history.counts()
    n0 = counts[0]
    cur = [w % n0 for w in words(seed, start, n_blocks, 0, stream)]
    trace = [cur]
    for j, op in enumerate(history.ops, start=1):
        n_old, n_new = counts[j - 1], counts[j]
        ws = words(seed, start, n_blocks, j, stream)
        if isinstance(op, AddDisks):
            cur = [g if (g := w % n_new) >= n_old else d for d, w in zip(cur, ws)]
        else:
            gone = set(op.indices)
            new_index = [-1] * n_old
            k = 0
            for i in range(n_old):
                if i not in gone:
                    new_index[i] = k
                    k += 1
            cur = [t if (t := new_index[d]) >= 0 else w % n_new for d, w in zip(cur, ws)]
        trace.append(cur)
    return trace
