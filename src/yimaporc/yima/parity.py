"""XOR parity groups and parity-aware placement of a file's blocks (pure).

Blocks ``g*G .. g*G+G-1`` of a file form parity group ``g``; its parity block is
their XOR (shorter blocks count as zero-padded).  Any one lost member is the XOR
of the parity and the others.

Placement is computed, never stored.  Candidate ``c`` for data block ``i`` is
SCADDAR stream ``c`` of the file (``placement.disk_of(seed, i, h, stream=c)``);
candidate ``c`` for the parity of group ``g`` is stream ``PARITY_STREAM + c``
at index ``g``.  A member takes its first candidate whose node is new to the
group (members before it, then the parity after all members); when every node
is already used, its first candidate on a new physical disk; when even that is
impossible, candidate 0.  After :data:`MAX_TRIES` failed candidates (CRUSH-like
bounded retries) it takes a hashed pick among all acceptable logical disks, so
distinct domains are guaranteed whenever they exist.  Without conflicts a data
block sits exactly where plain SCADDAR puts it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs

from .placement import LogicalDisk, ScalingHistory, disk_of, disks_of, word

PARITY_STREAM = 1 << 16
MAX_TRIES = 8
DEFAULT_GROUP_SIZE = 4


class ParityError(ValueError):
    """Parity inputs are inconsistent."""


def xor_blocks(blocks: Iterable[bytes]) -> bytes:
    """XOR of ``blocks``, as long as the longest (shorter ones are zero-padded)."""
    acc = 0
    size = 0
    for b in blocks:
        acc ^= int.from_bytes(b, "little")
        size = max(size, len(b))
    return acc.to_bytes(size, "little")


def make_parity(blocks: Sequence[bytes]) -> bytes:
    """The parity block of one group's data blocks."""
    if not blocks:
        raise ParityError("a parity group needs at least one block")
    return xor_blocks(blocks)


def reconstruct(
    missing_index: int,
    other_blocks: Mapping[int, bytes],
    parity: bytes,
    length: int | None = None,
) -> bytes:
    """Block ``missing_index`` from its group's other blocks and the parity.

    ``length`` is the missing block's size (default: the parity's size, right
    for every block but a short last one).
    """
    if missing_index in other_blocks:
        raise ParityError(f"block {missing_index} is not missing")
    size = len(parity) if length is None else length
    if size > len(parity):
        raise ParityError("missing block longer than its parity")
    return xor_blocks([parity, *other_blocks.values()])[:size]


def default_group_size(n_domains: int, cap: int = DEFAULT_GROUP_SIZE) -> int:
    """Largest G (at most ``cap``) so a group and its parity fit on distinct domains; 0: no parity."""
    return max(0, min(cap, n_domains - 1))


def n_groups(n_blocks: int, group_size: int) -> int:
    """Number of parity groups of a file (0 without parity)."""
    return 0 if group_size <= 0 else -(-n_blocks // group_size)


def group_of(index: int, group_size: int) -> int:
    """The parity group of data block ``index``."""
    return index // group_size


def group_members(group: int, group_size: int, n_blocks: int) -> range:
    """Data block indices of ``group`` (the last group may be short)."""
    return range(group * group_size, min((group + 1) * group_size, n_blocks))


def _node(d: LogicalDisk) -> str:
    return d.node_id or d.physical


class _Chooser:
    """Domain-avoiding choice among a block's candidates on one history's table."""

    def __init__(self, history: ScalingHistory) -> None:
        self.table = history.disks
        self.n_nodes = len({_node(d) for d in self.table})
        self.n_physical = len({d.physical for d in self.table})

    def choose(
        self,
        first: int,
        candidate: Callable[[int], int],
        pick: Callable[[int], int],
        nodes: set[str],
        physical: set[str],
    ) -> int:
        """First acceptable candidate; else a hashed pick among all acceptable disks."""
        if len(physical) >= self.n_physical:
            return first
        need_node = len(nodes) < self.n_nodes

        def ok(d: int) -> bool:
            disk = self.table[d]
            return _node(disk) not in nodes if need_node else disk.physical not in physical

        for c in range(MAX_TRIES):
            d = first if c == 0 else candidate(c)
            if ok(d):
                return d
        allowed = [d for d in range(len(self.table)) if ok(d)]
        return allowed[pick(len(allowed))]

    def note(self, d: int, nodes: set[str], physical: set[str]) -> None:
        disk = self.table[d]
        nodes.add(_node(disk))
        physical.add(disk.physical)


@attrs.frozen
class Layout:
    """Logical disk of every data block and of every parity block of a file."""

    data: tuple[int, ...]
    parity: tuple[int, ...]


@attrs.frozen
class FilePlacement:
    """Where a file's blocks live under any scaling history."""

    seed: int
    n_blocks: int
    group_size: int = 0

    def __attrs_post_init__(self) -> None:
        if self.n_blocks < 0 or self.group_size < 0:
            raise ParityError("block count and group size must be >= 0")

    @property
    def n_groups(self) -> int:
        """Number of parity groups."""
        return n_groups(self.n_blocks, self.group_size)

    def _choose(
        self,
        chooser: _Chooser,
        first: int,
        index: int,
        stream: int,
        history: ScalingHistory,
        nodes: set[str],
        physical: set[str],
    ) -> int:
        return chooser.choose(
            first,
            lambda c: disk_of(self.seed, index, history, stream=stream + c),
            lambda n: word(self.seed, index, history.steps + 1, stream + MAX_TRIES) % n,
            nodes,
            physical,
        )

    def data_disk(self, index: int, history: ScalingHistory) -> int:
        """Logical disk of data block ``index``."""
        if not 0 <= index < self.n_blocks:
            raise IndexError(f"block {index} out of range 0..{self.n_blocks - 1}")
        if self.group_size == 0:
            return disk_of(self.seed, index, history)
        g = group_of(index, self.group_size)
        first = [disk_of(self.seed, i, history) for i in range(g * self.group_size, index + 1)]
        return self._resolve_group(g, first, history)[-1]

    def parity_disk(self, group: int, history: ScalingHistory) -> int:
        """Logical disk of the parity block of ``group``."""
        if not 0 <= group < self.n_groups:
            raise IndexError(f"parity group {group} out of range 0..{self.n_groups - 1}")
        members = group_members(group, self.group_size, self.n_blocks)
        first = [disk_of(self.seed, i, history) for i in members]
        chooser = _Chooser(history)
        nodes: set[str] = set()
        physical: set[str] = set()
        for d in self._resolve_group(group, first, history, chooser):
            chooser.note(d, nodes, physical)
        p0 = disk_of(self.seed, group, history, stream=PARITY_STREAM)
        return self._choose(chooser, p0, group, PARITY_STREAM, history, nodes, physical)

    def _resolve_group(
        self,
        group: int,
        first: Sequence[int],
        history: ScalingHistory,
        chooser: _Chooser | None = None,
    ) -> list[int]:
        chooser = chooser or _Chooser(history)
        nodes: set[str] = set()
        physical: set[str] = set()
        out = []
        for p, d0 in enumerate(first):
            index = group * self.group_size + p
            d = self._choose(chooser, d0, index, 0, history, nodes, physical)
            chooser.note(d, nodes, physical)
            out.append(d)
        return out

    def layout(self, history: ScalingHistory) -> Layout:
        """Every block's logical disk (batch path, same answers as the single ones)."""
        first = disks_of(self.seed, self.n_blocks, history)
        if self.group_size == 0:
            return Layout(tuple(first), ())
        chooser = _Chooser(history)
        p_first = disks_of(self.seed, self.n_groups, history, stream=PARITY_STREAM)
        data: list[int] = []
        parity: list[int] = []
        gs = self.group_size
        for g in range(self.n_groups):
            nodes: set[str] = set()
            physical: set[str] = set()
            for d in self._resolve_group(g, first[g * gs : (g + 1) * gs], history, chooser):
                chooser.note(d, nodes, physical)
                data.append(d)
            parity.append(
                self._choose(chooser, p_first[g], g, PARITY_STREAM, history, nodes, physical)
            )
        return Layout(tuple(data), tuple(parity))
