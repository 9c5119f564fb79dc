"""Where blocks are: placement layouts (cached, computed off the reactor) and their counts.

:class:`Placements` answers, from the catalog's committed and pending SCADDAR
histories, where a block may be (:meth:`places`), which blocks a node holds, how many
blocks each disk holds (:meth:`placed_counts`) and what a reorganisation must move
(:meth:`plan`).  Layouts are CPU-bound: a process pool (``layout_runner``) keeps them
from starving the reactor; without one they run in the storage thread pool.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from twisted.internet.defer import Deferred, fail, gatherResults, inlineCallbacks, succeed
from twisted.python.failure import Failure

from ..layouts import LayoutCache, Placed, ProcessRunner, counts_of
from ..media import MediaInfo
from ..parity import FilePlacement
from ..placement import LogicalDisk, ScalingHistory
from ..reorg import Plan, plan_for_layouts
from ..store import BlockKey
from ._context import StorageContext

__all__ = ["Placements"]


class Placements:
    """Layouts of every file under the catalog's histories, and what follows from them."""

    def __init__(
        self, ctx: StorageContext, layouts: LayoutCache, runner: ProcessRunner | None
    ) -> None:
        self.ctx = ctx
        self.layouts = layouts
        self.runner: Callable[..., Deferred[Any]] = runner or ctx.in_pool
        self._placed: dict[str, int] = {}
        self._placed_for: tuple[Any, ...] | None = None
        self._placing = False
        self._placed_waiters: list[Deferred[dict[str, int]]] = []
        self._warm_for: tuple[Any, ...] | None = None

    def histories(self) -> list[tuple[bool, ScalingHistory]]:
        """``(pending?, history)``: the pending history first (during a reorganisation)."""
        cat = self.ctx.catalog
        return [(p, h) for p, h in ((True, cat.pending), (False, cat.history)) if h is not None]

    def state(self) -> tuple[Any, ...]:
        """What every cached layout and count depends on: histories and files."""
        cat = self.ctx.catalog
        files = tuple(sorted((m.name, m.seed, m.blocks) for m in cat.media.values()))
        return (cat.history, cat.pending, files)

    @property
    def counts_pending(self) -> bool:
        """Whether :meth:`placed_counts` still awaits layouts of the current catalog."""
        return self._placed_for != self.state()

    def layout_of(self, info: MediaInfo, pending: bool = False) -> Deferred[Placed | None]:
        """``info``'s layout under the committed (or pending) history, computed off the reactor."""
        cat = self.ctx.catalog
        history = cat.pending if pending else cat.history
        if history is None:
            return succeed(None)
        return self.layouts.fetch(info, history)  # type: ignore[return-value]

    def warm(self) -> None:
        """Compute (or load) every layout the current catalog needs, in the pool, one at a
        time; then the per-disk counts. Nothing is recomputed unless the history changed."""
        state = self.state()
        if state == self._warm_for:
            return
        self._warm_for = state
        cat = self.ctx.catalog
        wanted = [(info, h) for _, h in self.histories() for info in cat.media.values()]

        @inlineCallbacks
        def run() -> Generator[Deferred[Any], Any, None]:
            for info, history in sorted(wanted, key=lambda w: w[0].name):
                if self.state() != state:
                    return  # a newer warm-up is under way
                yield self.layouts.fetch(info, history)
            if self.state() == state:
                yield self.layouts.retain(wanted)
                yield self.refresh_placed()

        run().addErrback(self.ctx.log_failure, "computing placement layouts")

    def places(self, info: MediaInfo, key: BlockKey) -> list[LogicalDisk]:
        """Where ``key`` of ``info`` may be, in read order: new place, then old.

        From the cached layouts; on a miss the one block's place is computed
        alone (its parity group only, cheap) and the whole layout is warmed in
        the pool for the next call.
        """
        out: list[LogicalDisk] = []
        for _, history in self.histories():
            placed = self.layouts.get(info, history)
            if placed is not None:
                disk = placed.disk(key.index, key.parity)
            else:
                self.layouts.fetch(info, history).addErrback(self.ctx.log_failure, "layout")
                placement = FilePlacement.of(info)
                index = (
                    placement.parity_disk(key.index, history)
                    if key.parity
                    else placement.data_disk(key.index, history)
                )
                disk = history.disks[index]
            if all(disk.physical != o.physical for o in out):
                out.append(disk)
        return out

    def blocks_of_node(self, name: str, node_id: str) -> Deferred[list[int]]:
        """Data blocks of ``name`` whose first place (pending history first) is on ``node_id``."""
        info = self.ctx.catalog.media.get(name)
        if info is None:
            return fail(KeyError(name))
        histories = self.histories()
        if not histories:
            return succeed([])
        d = self.layouts.fetch(info, histories[0][1])
        return d.addCallback(lambda placed: list(placed.by_node.get(node_id, ())))

    def placed_counts(self) -> dict[str, int]:
        """Blocks (data + parity) per physical disk under the committed history, as last
        summed from cached layouts (never computed here: see :meth:`refresh_placed`)."""
        if self.counts_pending:
            self.refresh_placed().addErrback(self.ctx.log_failure, "counting placed blocks")
        return self._placed

    def refresh_placed(self) -> Deferred[dict[str, int]]:
        """Sum the committed layouts' per-disk counts (layouts fetched off the reactor);
        fires once the counts match the catalog as it is when they are done."""
        d: Deferred[dict[str, int]] = Deferred()
        self._placed_waiters.append(d)
        if not self._placing:
            self._sum_placed()
        return d

    def _sum_placed(self) -> None:
        self._placing = True
        state = self.state()
        cat = self.ctx.catalog
        history = cat.history
        infos = sorted(cat.media.values(), key=lambda m: m.name)

        @inlineCallbacks
        def run() -> Generator[Deferred[Any], Any, None]:
            placed = []
            if history is not None:
                for info in infos:
                    p = yield self.layouts.fetch(info, history)
                    placed.append(p)
            self._placed = counts_of(placed, (d.disk_id for d in cat.disks))
            self._placed_for = state

        def done(result: object) -> None:
            self._placing = False
            if not isinstance(result, Failure) and state != self.state():
                self._sum_placed()  # the catalog changed meanwhile: sum again
                return
            waiters, self._placed_waiters = self._placed_waiters, []
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(self._placed)

        run().addBoth(done)

    def plan(self, info: MediaInfo, old: ScalingHistory, new: ScalingHistory) -> Deferred[Plan]:
        """:func:`~..reorg.plan_for`, with both layouts cached and the diff off the reactor."""
        d = gatherResults([self.layouts.fetch(info, old), self.layouts.fetch(info, new)])

        def diff(both: list[Placed]) -> Deferred[Plan]:
            return self.runner(plan_for_layouts, info, both[0].layout, both[1].layout, old, new)

        return d.addCallback(diff)
