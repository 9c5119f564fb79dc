"""Online reorganisation (``disks add`` / ``disks remove``) as an explicit, persisted phase table.

A reorganisation this node coordinates goes through the phases of :data:`TRANSITIONS`
and nothing else::

    IDLE -> CLAIMING -> COPYING -> COMMITTING -> CLEANING -> IDLE
               |           `-> ABANDONING -> IDLE      (a block could not be copied)
               `-> IDLE                                 (another node claimed first)

CLAIMING puts the new history in the catalog's ``pending`` record (readers then try
the new place first, then the old); COPYING copies every moved block to its new
place, throttled; COMMITTING makes the new history the committed one; CLEANING
deletes the old copies and detaches a removed disk.  From COPYING on, the phase,
the old and new histories and the removed disk are written to
``DATA_DIR/reorganisation.json`` (fsynced, off the reactor) before the phase's work
starts, so a coordinator that crashes resumes on restart (:meth:`Reorganiser.resume`):
before COMMITTING it abandons (drops ``pending``; the old copies were never touched),
from COMMITTING on it finishes (commits if not yet committed: every copy was made,
then cleans).
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Callable, Collection, Generator, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from ...cluster.routes import ApiError
from ..disks import DiskError, PhysicalDisk, add_physical, remove_physical
from ..media import MediaInfo
from ..placement import ScalingHistory
from ..reorg import Move, MoveThrottle
from ..rpc import DetachDisk
from ..store import BlockMissing, expected_length
from ._blocks import BlockRouter
from ._catalog import TOPOLOGY, no_topology
from ._context import StorageContext
from ._placing import Placements
from ._work import bounded

__all__ = [
    "DEFAULT_MOVE_RATE",
    "MOVES_IN_FLIGHT",
    "TRANSITIONS",
    "Phase",
    "PhaseError",
    "Reorganiser",
]

#: Default pace of reorganisation copies (bytes/s) and moves in flight.
DEFAULT_MOVE_RATE = 64 << 20
MOVES_IN_FLIGHT = 4
#: Old copies deleted at once after a commit.
DELETES_IN_FLIGHT = 8
STATE_FILE = "reorganisation.json"


class Phase(enum.Enum):
    """Where this node's reorganisation is."""

    IDLE = "idle"
    CLAIMING = "claiming"
    COPYING = "copying"
    ABANDONING = "abandoning"
    COMMITTING = "committing"
    CLEANING = "cleaning"


#: Every phase change allowed; any other is a :class:`PhaseError` (a bug, never input).
TRANSITIONS: Mapping[Phase, frozenset[Phase]] = {
    Phase.IDLE: frozenset({Phase.CLAIMING, Phase.ABANDONING, Phase.COMMITTING, Phase.CLEANING}),
    Phase.CLAIMING: frozenset({Phase.COPYING, Phase.IDLE}),
    Phase.COPYING: frozenset({Phase.COMMITTING, Phase.ABANDONING, Phase.IDLE}),
    Phase.ABANDONING: frozenset({Phase.IDLE}),
    Phase.COMMITTING: frozenset({Phase.CLEANING, Phase.IDLE}),
    Phase.CLEANING: frozenset({Phase.IDLE}),
}
# IDLE -> ABANDONING/COMMITTING/CLEANING: resume() after a crash (in COPYING: abandon).
# COPYING/COMMITTING -> IDLE: an unexpected error; the record stays for resume().

#: Phases written to the state file (before them, a crash leaves nothing to resume).
PERSISTED = frozenset({Phase.COPYING, Phase.ABANDONING, Phase.COMMITTING, Phase.CLEANING})


class PhaseError(RuntimeError):
    """A phase change the table does not allow."""


@attrs.frozen
class Record:
    """What a crashed coordinator needs to resume: the phase and both histories."""

    phase: Phase
    old: ScalingHistory
    new: ScalingHistory
    disks: tuple[PhysicalDisk, ...]
    removed: PhysicalDisk | None = None

    def to_json(self) -> dict[str, Any]:
        """The state file's content."""
        return {
            "phase": self.phase.value,
            "old": self.old.to_json(),
            "new": self.new.to_json(),
            "disks": [d.to_json() for d in self.disks],
            "removed": None if self.removed is None else self.removed.to_json(),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Record:
        """Parse the state file (ValueError/KeyError/TypeError when malformed)."""
        removed = raw.get("removed")
        return cls(
            Phase(raw["phase"]),
            ScalingHistory.from_json(raw["old"]),
            ScalingHistory.from_json(raw["new"]),
            tuple(PhysicalDisk.from_json(d) for d in raw["disks"]),
            None if removed is None else PhysicalDisk.from_json(removed),
        )


def _write_file(path: Path, data: bytes | None) -> None:
    """Replace ``path`` with ``data`` durably (None: remove it)."""
    if data is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


class Reorganiser:
    """SCADDAR add/remove of a disk, coordinated by this node, one at a time."""

    def __init__(
        self,
        ctx: StorageContext,
        router: BlockRouter,
        placements: Placements,
        *,
        move_rate: float,
        ingesting: Collection[str],
        detach: Callable[[str], bool],
        refresh_stored: Callable[[], object],
        after: Callable[[], object],
    ) -> None:
        self.ctx = ctx
        self.router = router
        self.placements = placements
        self.move_rate = move_rate
        self.ingesting = ingesting
        self._detach = detach
        self._refresh_stored = refresh_stored
        self._after = after
        self.path = ctx.node.config.data_dir / STATE_FILE
        self._phase = Phase.IDLE
        #: Progress of the last disk add/remove this node ran (``storage.reorganisation``).
        self.progress = {"blocks_to_move": 0, "blocks_moved": 0, "blocks_moved_total": 0}

    # --- the phase table ------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        """The current phase (IDLE when this node coordinates nothing)."""
        return self._phase

    @property
    def busy(self) -> bool:
        """Whether this node is coordinating a reorganisation."""
        return self._phase is not Phase.IDLE

    def enter(self, phase: Phase, record: Record | None = None) -> Deferred[None]:
        """Change phase per :data:`TRANSITIONS`; fires once ``record`` (for a persisted
        phase) or the end (IDLE: the state file removed) is on disk."""
        if phase not in TRANSITIONS[self._phase]:
            raise PhaseError(f"reorganisation: {self._phase.value} -> {phase.value} not allowed")
        self._phase = phase
        if phase in PERSISTED:
            assert record is not None and record.phase is phase
            data: bytes | None = json.dumps(record.to_json()).encode()
        elif phase is Phase.IDLE:
            data = None
        else:
            return succeed(None)
        d: Deferred[None] = self.ctx.in_pool(_write_file, self.path, data)
        return d

    def _give_up(self) -> None:
        """An unexpected error: back to IDLE in memory (the state file stays for resume)."""
        self._phase = Phase.IDLE

    # --- operations ------------------------------------------------------------------

    def add(self, disk: PhysicalDisk, rate: float | None = None) -> Deferred[dict[str, Any]]:
        """SCADDAR-add ``disk`` and move blocks onto it; fires with the move summary."""
        cat = self.ctx.catalog
        if any(d.disk_id == disk.disk_id for d in cat.all_disks()):
            raise ApiError(f"disk {disk.disk_id} is already in use", 409)
        if any(d.node_id == disk.node_id and d.path == disk.path for d in cat.all_disks()):
            raise ApiError(f"{disk.path} on node {disk.node_id} is already a disk", 409)
        if cat.history is None:
            raise ApiError("no disks are registered yet", 503)
        try:
            new = add_physical(cat.history, disk, cat.policy)
        except DiskError as e:
            raise ApiError(str(e)) from e
        return self._scale(new, (*cat.disks, disk), None, rate)

    def remove(self, disk_id: str, rate: float | None = None) -> Deferred[dict[str, Any]]:
        """SCADDAR-remove ``disk_id``, moving its blocks away first."""
        cat = self.ctx.catalog
        gone = next((d for d in cat.disks if d.disk_id == disk_id), None)
        if gone is None or cat.history is None:
            raise ApiError(f"no such disk: {disk_id}", 404)
        try:
            new = remove_physical(cat.history, disk_id)
        except DiskError as e:
            raise ApiError(str(e)) from e
        return self._scale(new, tuple(d for d in cat.disks if d.disk_id != disk_id), gone, rate)

    @inlineCallbacks
    def _scale(
        self,
        new: ScalingHistory,
        disks: tuple[PhysicalDisk, ...],
        removed: PhysicalDisk | None,
        rate: float | None,
    ) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        ctx = self.ctx
        if ctx.catalog.pending is not None or self.busy or self.ingesting:
            raise ApiError("another ingest or reorganisation is under way", 409)
        old = ctx.catalog.history
        assert old is not None
        record = Record(Phase.COPYING, old, new, disks, removed)
        self.progress.update(blocks_to_move=0, blocks_moved=0)
        started = ctx.now()
        yield self.enter(Phase.CLAIMING)
        try:
            pending = {"history": new.to_json(), "disks": [d.to_json() for d in disks]}

            def claim(t: dict[str, Any] | None) -> dict[str, Any]:
                t = t or no_topology()
                return {**t, "pending": t.get("pending") or pending}

            won = yield ctx.doc.claim_record(TOPOLOGY, claim)
            if not won or ctx.catalog.pending != new:
                # Another node started a reorganisation (or changed the catalog) at
                # the same moment; its version replaces ours everywhere.
                yield self.enter(Phase.IDLE)
                raise ApiError("another ingest or reorganisation is under way", 409)
            yield self.enter(Phase.COPYING, record)
            moved = total = nbytes = 0
            done: list[tuple[MediaInfo, Move]] = []
            for info in sorted(ctx.catalog.media.values(), key=lambda m: m.name):
                plan = yield self.placements.plan(info, old, new)
                total += plan.total
                self.progress["blocks_to_move"] += len(plan.moves)
                throttle = yield self.run_moves(info, plan.moves, rate or self.move_rate)
                if throttle.failures:
                    yield self.enter(Phase.ABANDONING, attrs.evolve(record, phase=Phase.ABANDONING))
                    yield self._abandon()
                    yield self.enter(Phase.IDLE)
                    raise ApiError(
                        f"reorganisation abandoned: {len(throttle.failures)} block(s) of "
                        f"{info.name} could not be moved (is a node down?); nothing changed",
                        503,
                    )
                moved += len(plan.moves)
                nbytes += sum(m.size for m in plan.moves)
                done.extend((info, m) for m in plan.moves)
            copied = ctx.now()
            yield self.enter(Phase.COMMITTING, attrs.evolve(record, phase=Phase.COMMITTING))
            yield self._commit(record)
            yield self.enter(Phase.CLEANING, attrs.evolve(record, phase=Phase.CLEANING))
            yield self._clean(record, done)
            yield self.enter(Phase.IDLE)
            now = ctx.now()
            return {
                "moved": moved,
                "total": total,
                "bytes": nbytes,
                "copy_seconds": round(copied - started, 3),
                "seconds": round(now - started, 3),
                "summary": f"moved {moved} of {total} blocks",
            }
        finally:
            if self.busy:
                self._give_up()
            ctx.reactor.callLater(0, self._after)

    def _abandon(self) -> Deferred[int]:
        return self.ctx.doc.update_record(
            TOPOLOGY, lambda t: {**(t or no_topology()), "pending": None}
        )

    def _commit(self, record: Record) -> Deferred[int]:
        removed = record.removed

        def commit(v: dict[str, Any] | None) -> dict[str, Any]:
            v = v or no_topology()
            out = {
                **v,
                "history": record.new.to_json(),
                "disks": [d.to_json() for d in record.disks],
                "pending": None,
            }
            if removed is not None:
                entry = {"node_id": removed.node_id, "path": removed.path,
                         "disk_id": removed.disk_id}  # fmt: skip
                out["retired"] = [*v.get("retired", []), entry]
            return out

        return self.ctx.doc.update_record(TOPOLOGY, commit)

    @inlineCallbacks
    def _clean(
        self, record: Record, done: list[tuple[MediaInfo, Move]] | None = None
    ) -> Generator[Deferred[Any], Any, None]:
        """Delete the old copies of every moved block (``done``, else planned again);
        detach a removed disk."""
        ctx = self.ctx
        if done is None:
            done = []
            for info in sorted(ctx.catalog.media.values(), key=lambda m: m.name):
                plan = yield self.placements.plan(info, record.old, record.new)
                done.extend((info, m) for m in plan.moves)
        yield self.delete_old(done)
        yield self.placements.refresh_placed()
        removed = record.removed
        if removed is not None:
            yield self.router.at(
                removed.node_id,
                lambda: succeed(self._detach(removed.disk_id)),
                DetachDisk,
                disk_id=removed.disk_id,
            ).addErrback(ctx.log_failure, f"detaching {removed.disk_id}")
        self._refresh_stored()

    @inlineCallbacks
    def resume(self) -> Generator[Deferred[Any], Any, Phase | None]:
        """Finish or abandon the reorganisation a crash interrupted (per the state file).

        Fires with the phase it was in (None: there was none).
        """
        ctx = self.ctx
        raw = yield ctx.in_pool(_read_file, self.path)
        if raw is None or self.busy:
            return None
        try:
            record = Record.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError) as e:
            ctx.log.warn("storage: {path} unreadable ({e}); ignored", path=self.path, e=e)
            yield ctx.in_pool(_write_file, self.path, None)
            return None
        cat = ctx.catalog
        ctx.log.info(
            "storage: resuming the reorganisation interrupted while {phase}",
            phase=record.phase.value,
        )
        try:
            if record.phase in (Phase.COPYING, Phase.ABANDONING):
                if cat.pending == record.new and cat.history == record.old:
                    yield self.enter(Phase.ABANDONING, attrs.evolve(record, phase=Phase.ABANDONING))
                    yield self._abandon()
            elif cat.history == record.new or (
                cat.pending == record.new and cat.history == record.old
            ):
                if cat.history != record.new:  # every copy was made before COMMITTING
                    yield self.enter(Phase.COMMITTING, attrs.evolve(record, phase=Phase.COMMITTING))
                    yield self._commit(record)
                yield self.enter(Phase.CLEANING, attrs.evolve(record, phase=Phase.CLEANING))
                yield self._clean(record)
            if self.busy:
                yield self.enter(Phase.IDLE)
            else:
                yield ctx.in_pool(_write_file, self.path, None)
        finally:
            if self.busy:
                self._give_up()
            ctx.reactor.callLater(0, self._after)
        return record.phase

    # --- block moves -------------------------------------------------------------------

    def _move(self, info: MediaInfo, move: Move, staged: bool) -> Deferred[Any]:
        d = self.router.read_at(move.src_disk, info.name, move.key)

        def check(data: bytes) -> bytes:
            if len(data) != expected_length(info, move.key):
                raise BlockMissing(f"{info.name} {move.key.filename}: damaged at its old place")
            return data

        d.addCallback(check)
        if not staged:
            # Old copy gone or its node down: rebuild it from the block's group.
            d.addErrback(lambda _: self.router.read(info.name, move.key))
        return d.addCallback(
            lambda data: self.router.write_at(move.dst_disk, info.name, move.key, data)
        )

    def run_moves(
        self,
        info: MediaInfo,
        moves: Iterable[Move],
        rate: float,
        staged: ScalingHistory | None = None,
    ) -> Deferred[MoveThrottle]:
        """Copy ``moves`` at ``rate`` bytes/s; ``staged``: a file not yet in the catalog."""
        clock = self.ctx.reactor
        rate = min(rate, 1e15)
        throttle = MoveThrottle(
            list(moves), rate, float(clock.seconds()), max_in_flight=MOVES_IN_FLIGHT
        )
        finished: Deferred[MoveThrottle] = Deferred()
        timer: list[IDelayedCall] = []

        def ok(_: object, move: Move) -> None:
            throttle.finished(move, float(clock.seconds()))
            if self.busy:
                self.progress["blocks_moved"] += 1
                self.progress["blocks_moved_total"] += 1
            clock.callLater(0, pump)

        def bad(f: Failure, move: Move) -> None:
            self.ctx.log.warn(
                "storage: move of {name} {key} failed: {e}",
                name=info.name,
                key=move.key.filename,
                e=f.getErrorMessage(),
            )
            throttle.failed(move, float(clock.seconds()))
            clock.callLater(0, pump)

        def pump() -> None:
            if finished.called:
                return
            if timer and timer[0].active():
                timer.pop().cancel()
            timer.clear()
            now = float(clock.seconds())
            for move in throttle.start(now):
                d = self._move(info, move, staged is not None)
                d.addCallbacks(ok, bad, callbackArgs=(move,), errbackArgs=(move,))
            if throttle.complete:
                finished.callback(throttle)
                return
            wake = throttle.next_wakeup(now)
            if wake is not None:
                timer.append(clock.callLater(max(0.0, wake - now), pump))

        pump()
        return finished

    def delete_old(self, done: list[tuple[MediaInfo, Move]]) -> Deferred[Any]:
        """Delete the old copy of every move in ``done`` (best effort, logged)."""

        def one(info: MediaInfo, move: Move) -> Deferred[Any]:
            d = self.router.delete_at(move.src_disk, info.name, move.key)
            return d.addErrback(
                lambda f: self.ctx.log.warn(
                    "storage: old copy of {name} {key} on {disk} not deleted: {e}",
                    name=info.name,
                    key=move.key.filename,
                    disk=move.src_disk.physical,
                    e=f.getErrorMessage(),
                )
            )

        return bounded(DELETES_IN_FLIGHT, (partial(one, info, m) for info, m in done))
