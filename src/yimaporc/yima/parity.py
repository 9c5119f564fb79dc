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

Two placement versions (``MediaInfo.placement``):

* ``FIRST_FIT`` (1, files ingested before version 2): the rule above is
  applied afresh to the current history, so a scaling step that creates or
  removes a conflict moves extra blocks.
* ``STICKY`` (2, the default): the rule above gives the layout of step 0 only;
  each later step starts from the previous layout.  Adding disks moves blocks
  only onto the new disks, as many per group as the first-fit rule would put
  there (so the new disks fill like first-fit's), preferring the member
  already on the new disk's node; removing disks moves exactly the removed
  disks' blocks, each to its first acceptable candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from .placement import (
    AddDisks,
    LogicalDisk,
    ScalingHistory,
    disk_of,
    disks_of,
    disks_trace,
    word,
)

PARITY_STREAM = 1 << 16
FIRST_FIT = 1
STICKY = 2
VERSIONS = (FIRST_FIT, STICKY)
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


def group_size_for(history: ScalingHistory, requested: int | None = None) -> tuple[int, str]:
    """The parity group size for a new file on ``history``'s disks, and a warning if any.

    A group and its parity must sit on distinct nodes to survive a node, so G is
    at most the number of nodes less one, however many disks each node has.
    On a single node, groups span its disks (surviving a disk, not the node).
    ``requested`` beyond what the cluster allows raises :class:`ParityError`.
    """
    n_nodes = len({_node(d) for d in history.disks})
    n_physical = len({d.physical for d in history.disks})
    domains, what = (n_nodes, "nodes") if n_nodes > 1 else (n_physical, "disks")
    most = default_group_size(domains)
    if requested is None:
        size = most
    elif not 0 <= requested <= most:
        raise ParityError(
            f"parity_group must be between 0 and {most}: a group of G blocks and its parity "
            f"need G+1 distinct {what}, and there are {domains}"
        )
    else:
        size = requested
    if size == 0:
        return 0, "" if requested == 0 else f"no parity: {domains} {what} cannot hold a group"
    if n_nodes == 1:
        return size, "one node: parity survives the loss of a disk, not of the node"
    return size, ""


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

    def score(self, d: int, nodes: set[str], physical: set[str]) -> int:
        """How well disk ``d`` separates a block from the others: new node 2, new disk 1, else 0."""
        disk = self.table[d]
        if _node(disk) not in nodes:
            return 2
        return 1 if disk.physical not in physical else 0


@attrs.frozen
class Layout:
    """Logical disk of every data block and of every parity block of a file."""

    data: tuple[int, ...]
    parity: tuple[int, ...]


class _Streams:
    """Plain SCADDAR disks of a run of data blocks and parity blocks, for any candidate
    stream, after every step of one history (computed per stream on first use)."""

    def __init__(self, seed: int, history: ScalingHistory, data: range, groups: range) -> None:
        self.seed = seed
        self.history = history
        self.data = data
        self.groups = groups
        self._traces: dict[int, list[list[int]]] = {}

    def disk(self, stream: int, step: int, index: int) -> int:
        """Disk of block (or parity group) ``index`` on candidate ``stream`` after ``step``."""
        trace = self._traces.get(stream)
        run = self.groups if stream >= PARITY_STREAM else self.data
        if trace is None:
            trace = disks_trace(self.seed, len(run), self.history, stream, run.start)
            self._traces[stream] = trace
        return trace[step][index - run.start]


@attrs.frozen
class FilePlacement:
    """Where a file's blocks live under any scaling history."""

    seed: int
    n_blocks: int
    group_size: int = 0
    version: int = STICKY

    def __attrs_post_init__(self) -> None:
        if self.n_blocks < 0 or self.group_size < 0:
            raise ParityError("block count and group size must be >= 0")
        if self.version not in VERSIONS:
            raise ParityError(f"unknown placement version {self.version}")

    @classmethod
    def of(cls, info: Any) -> FilePlacement:
        """The placement of a stored file (a ``MediaInfo``)."""
        return cls(info.seed, info.blocks, info.parity_group, info.placement)

    @property
    def n_groups(self) -> int:
        """Number of parity groups."""
        return n_groups(self.n_blocks, self.group_size)

    def data_disk(self, index: int, history: ScalingHistory) -> int:
        """Logical disk of data block ``index``."""
        if not 0 <= index < self.n_blocks:
            raise IndexError(f"block {index} out of range 0..{self.n_blocks - 1}")
        if self.group_size == 0:
            return disk_of(self.seed, index, history)
        g = group_of(index, self.group_size)
        return self._group(g, history)[index - g * self.group_size]

    def parity_disk(self, group: int, history: ScalingHistory) -> int:
        """Logical disk of the parity block of ``group``."""
        if not 0 <= group < self.n_groups:
            raise IndexError(f"parity group {group} out of range 0..{self.n_groups - 1}")
        return self._group(group, history)[-1]

    def layout(self, history: ScalingHistory) -> Layout:
        """Every block's logical disk (batch path, same answers as the single ones)."""
        if self.group_size == 0:
            return Layout(tuple(disks_of(self.seed, self.n_blocks, history)), ())
        streams = _Streams(self.seed, history, range(self.n_blocks), range(self.n_groups))
        choosers = self._choosers(history)
        data: list[int] = []
        parity: list[int] = []
        for g in range(self.n_groups):
            pos = self._resolve(g, streams, choosers)
            data.extend(pos[:-1])
            parity.append(pos[-1])
        return Layout(tuple(data), tuple(parity))

    def _group(self, group: int, history: ScalingHistory) -> list[int]:
        members = group_members(group, self.group_size, self.n_blocks)
        streams = _Streams(self.seed, history, members, range(group, group + 1))
        return self._resolve(group, streams, self._choosers(history))

    def _choosers(self, history: ScalingHistory) -> list[_Chooser]:
        if self.version == FIRST_FIT:
            return [_Chooser(history)]
        return [_Chooser(history.prefix(j)) for j in range(history.steps + 1)]

    def _resolve(self, group: int, streams: _Streams, choosers: Sequence[_Chooser]) -> list[int]:
        """The group's data disks, then its parity disk."""
        if self.version == FIRST_FIT:
            return self._first_fit(group, streams, streams.history.steps, choosers[0])
        return self._sticky(group, streams, choosers)

    def _choose(
        self,
        chooser: _Chooser,
        streams: _Streams,
        step: int,
        index: int,
        stream: int,
        nodes: set[str],
        physical: set[str],
    ) -> int:
        return chooser.choose(
            streams.disk(stream, step, index),
            lambda c: streams.disk(stream + c, step, index),
            lambda n: word(self.seed, index, step + 1, stream + MAX_TRIES) % n,
            nodes,
            physical,
        )

    def _first_fit(self, group: int, streams: _Streams, step: int, chooser: _Chooser) -> list[int]:
        """First-fit on the history after ``step``: each member (data, then parity) takes its
        first candidate on a node (else a physical disk) that the members before it do not use."""
        nodes: set[str] = set()
        physical: set[str] = set()
        out = []
        for i in group_members(group, self.group_size, self.n_blocks):
            d = self._choose(chooser, streams, step, i, 0, nodes, physical)
            chooser.note(d, nodes, physical)
            out.append(d)
        out.append(self._choose(chooser, streams, step, group, PARITY_STREAM, nodes, physical))
        return out

    def _sticky(self, group: int, streams: _Streams, choosers: Sequence[_Chooser]) -> list[int]:
        """First-fit at step 0, then each step changes only what it must (module docstring)."""
        pos = self._first_fit(group, streams, 0, choosers[0])
        history = streams.history
        first_index = group * self.group_size
        last = len(pos) - 1
        for j, op in enumerate(history.ops, start=1):
            chooser = choosers[j]
            if isinstance(op, AddDisks):
                n_old = len(choosers[j - 1].table)
                self._fill_new_disks(group, pos, streams, j, n_old, chooser)
                continue
            gone = set(op.indices)
            renumber: dict[int, int] = {}
            for i in range(len(choosers[j - 1].table)):
                if i not in gone:
                    renumber[i] = len(renumber)
            forced = [m for m, d in enumerate(pos) if d in gone]
            pos = [renumber.get(d, -1) for d in pos]
            for m in forced:
                nodes, physical = self._others(chooser, pos, m)
                stream, index = (PARITY_STREAM, group) if m == last else (0, first_index + m)
                pos[m] = self._choose(chooser, streams, j, index, stream, nodes, physical)
        return pos

    def _fill_new_disks(
        self,
        group: int,
        pos: list[int],
        streams: _Streams,
        step: int,
        n_old: int,
        chooser: _Chooser,
    ) -> None:
        """Move members onto the disks just added, as many as first-fit would put there.

        First-fit on the new history says which new disks the group should
        use.  Each such disk takes the member already on its node if there is
        one (a move within the node keeps the group's domains), else the
        member first-fit put there; a move that would weaken the group's
        fault domains is skipped.  Nothing moves between old disks.
        """
        target = self._first_fit(group, streams, step, chooser)
        table = chooser.table
        moved: set[int] = set()
        for designated, t in enumerate(target):
            if t < n_old:
                continue
            node = _node(table[t])
            here = [k for k, d in enumerate(pos) if k not in moved and _node(table[d]) == node]
            m = here[0] if here else designated
            if m in moved:
                continue
            nodes, physical = self._others(chooser, pos, m)
            if chooser.score(t, nodes, physical) >= chooser.score(pos[m], nodes, physical):
                pos[m] = t
                moved.add(m)

    @staticmethod
    def _others(chooser: _Chooser, pos: Sequence[int], m: int) -> tuple[set[str], set[str]]:
        """Nodes and physical disks of every placed member but ``m``."""
        nodes: set[str] = set()
        physical: set[str] = set()
        for k, d in enumerate(pos):
            if k != m and d >= 0:
                chooser.note(d, nodes, physical)
        return nodes, physical
