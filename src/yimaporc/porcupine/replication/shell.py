"""The Twisted shell of the replication manager: log on disk, timers, peers.

:class:`ReplicationService` runs one :class:`ReplicationManager` on the reactor.
It performs the core's actions under the ordering rule of ``docs/replication.md``:

* actions run in the order the core returned them, batches in order, on one
  queue;
* the durable ones (``PersistLog``, ``DropLog``, ``MarkAlive``; ``Apply``,
  ``PurgeTombstones``) of everything queued are written in one *round* on the
  thread pool: first every log write in one SQLite transaction (fsynced), then
  every store write in order;
* only once a round's writes are durable do its ``SendMessage`` and
  ``Acknowledge`` actions run (in order), so no ack and no SMTP 250 ever leaves
  before the log entry and the store write it depends on.

Moving a later log write ahead of an earlier store write (group commit) is what
the rule allows; log writes keep their order among themselves and store writes
theirs.  Frames go out through an injected ``send(node_id, frame)`` (AMP in a
node, see :mod:`.amp`); the membership view drives ``set_live``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ..._reactor import IClockThreads
from ...cluster.view import IMembershipListener, View
from ._manager import ReplicationConfig, ReplicationManager
from ._values import (
    Acknowledge,
    Action,
    Apply,
    DropLog,
    MarkAlive,
    NodeId,
    PersistLog,
    PurgeTombstones,
    SendMessage,
    Timestamp,
    Update,
    WipeRequired,
)
from ._wire import Message, Retire, from_bytes
from .interfaces import ILogStore, IObjectStore

T = TypeVar("T")

#: ``send(node_id, frames)``: best effort, in order; a failure only means "retry later".
Send = Callable[[NodeId, list[bytes]], Deferred[Any]]
#: ``run(f, *args)``: run blocking ``f`` off the reactor thread.
Runner = Callable[..., Deferred[Any]]

LogOp = PersistLog | DropLog | MarkAlive
StoreOp = Apply | PurgeTombstones

#: Frames that arrive before the log is loaded are kept, up to this many.
MAX_EARLY = 10_000
#: At most this many frames per send call.
MAX_BATCH = 512
#: A Retire whose send failed is sent again after 1, 2, 4, 8, 16 s.
RETIRE_RETRIES = 5


class ReplicationRefused(Exception):
    """This node must be wiped before it replicates again (see ``WipeRequired``)."""


class ReplicationStopped(Exception):
    """The service stopped before the update was acknowledged."""


def write_log_ops(log: ILogStore, ops: Sequence[LogOp]) -> None:
    """Perform log writes in order, as one transaction (``write_many``)."""
    log.write_many(ops)


@implementer(IMembershipListener)
class ReplicationService(Service):
    """Runs the replication core on the reactor; see the module docstring."""

    log = Logger()

    def __init__(
        self,
        reactor: IClockThreads,
        node_id: NodeId,
        log_store: ILogStore,
        object_store: IObjectStore,
        send: Send,
        *,
        threadpool: ThreadPool | None = None,
        run: Runner | None = None,
        now: Callable[[], float] | None = None,
        config: ReplicationConfig | None = None,
        rng: random.Random | None = None,
        on_applied: Callable[[Update], None] | None = None,
    ) -> None:
        if run is None:
            if threadpool is None:
                raise ValueError("give a threadpool or a run function")
            pool = threadpool

            def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
                return deferToThreadPool(reactor, pool, f, *args)

        self.reactor = reactor
        self.node_id = node_id
        self.log_store = log_store
        self.object_store = object_store
        self.send = send
        self.run = run
        self.now = now or reactor.seconds
        self.config = config or ReplicationConfig()
        self.rng = rng or random.Random()
        self.on_applied = on_applied
        self.core: ReplicationManager | None = None
        #: Set (with the operator's message) when the node must be wiped first.
        self.wipe_required: str | None = None
        self._queue: list[Action] = []
        self._busy = False
        self._waiting: dict[int, Deferred[Timestamp]] = {}
        self._timer: IDelayedCall | None = None
        self._timer_at: float | None = None
        self._live: tuple[str, ...] | None = None
        self._early: list[tuple[NodeId, bytes]] = []
        self._before_ready: list[Callable[[], None]] = []
        self._idle: list[Deferred[None]] = []
        self.rounds = 0
        self.sent = 0
        self.calls = 0
        self.send_failures = 0

    # --- life cycle -------------------------------------------------------------------

    def startService(self) -> None:
        """Load the log on the pool, rebuild the core, resume pushing."""
        super().startService()

        def load() -> tuple[list[Any], int | None]:
            return self.log_store.load(), self.log_store.last_alive()

        d = self.run(load)
        d.addCallback(self._recovered)
        d.addErrback(self._start_failed)

    def _recovered(self, loaded: tuple[list[Any], int | None]) -> None:
        if not self.running:
            return
        entries, alive = loaded
        try:
            core, actions = ReplicationManager.recover(
                self.node_id, entries, alive, self.now(), self.rng, self.config
            )
        except WipeRequired as e:
            self.wipe_required = str(e)
            self.log.critical("replication: REFUSING to rejoin: {msg}", msg=str(e))
            for waiting in self._before_ready:
                waiting()
            self._before_ready.clear()
            self._early.clear()
            return
        self.core = core
        self.log.info(
            "replication: {node} recovered {n} log entries", node=self.node_id, n=len(entries)
        )
        self._perform(actions)
        if self._live is not None:
            self._perform(core.set_live(self._live, self.now()))
        for waiting in self._before_ready:
            waiting()
        self._before_ready.clear()
        early, self._early = self._early, []
        for sender, frame in early:
            self.receive(sender, frame)

    def _start_failed(self, f: Failure) -> None:
        if not self.running:
            return  # stopped while loading (a node that could not listen): the store is closed
        self.wipe_required = f"cannot load the replication log: {f.getErrorMessage()}"
        self.log.failure("replication: cannot start", f)

    def stopService(self) -> Deferred[None]:
        """Stop the timer; fire once the write round in progress (if any) is done."""
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waiting, self._waiting = self._waiting, {}
        for d in waiting.values():
            d.errback(ReplicationStopped("replication stopped"))
        if not self._busy:
            return succeed(None)
        idle: Deferred[None] = Deferred()
        self._idle.append(idle)
        return idle

    # --- events -----------------------------------------------------------------------

    def submit(
        self,
        object_id: str,
        body: bytes | None,
        targets: Sequence[NodeId],
        current: Timestamp | None = None,
        acks: int | None = None,
    ) -> Deferred[Timestamp]:
        """Replicate a total-object update coordinated here.

        Fires with its timestamp once the core acknowledges it: the update is
        durable in this node's log and object store (and on ``acks - 1``, by
        default ``config.acks_before_reply - 1``, more replicas).
        """
        if self.wipe_required is not None:
            return fail(ReplicationRefused(self.wipe_required))
        if not self.running:
            return fail(ReplicationStopped("replication is not running"))
        if self.core is None:
            d: Deferred[Timestamp] = Deferred()

            def later() -> None:
                self.submit(object_id, body, targets, current, acks).chainDeferred(d)

            self._before_ready.append(later)
            return d
        token, actions = self.core.submit(
            object_id, body, targets, self.now(), current=current, acks=acks
        )
        d = Deferred()
        self._waiting[token] = d
        self._perform(actions)
        return d

    def receive(self, sender: NodeId, frame: bytes) -> None:
        """A frame from authenticated peer ``sender``; raises ``MalformedMessage``."""
        message = from_bytes(frame)
        if self.wipe_required is not None:
            raise ReplicationRefused(self.wipe_required)
        if self.core is None:
            if len(self._early) < MAX_EARLY:
                self._early.append((sender, frame))
            return
        self._perform(self.core.receive(sender, message, self.now()))

    def set_live(self, node_ids: Sequence[str]) -> None:
        """The membership service's current view (who is up)."""
        self._live = tuple(node_ids)
        if self.core is not None:
            self._perform(self.core.set_live(self._live, self.now()))

    def membership_changed(self, old: View, new: View) -> None:
        """``IMembershipListener``: pass the committed view's members to the core.

        A member whose incarnation changed restarted in between: it is passed as
        gone and back, so the core pushes to it at once instead of after backoff.
        """
        before = {m.node_id: m.incarnation for m in old.members}
        restarted = {
            m.node_id
            for m in new.members
            if m.node_id in before and before[m.node_id] != m.incarnation
        }
        if restarted:
            self.set_live([n for n in new.node_ids if n not in restarted])
        self.set_live(new.node_ids)

    def _tick(self) -> None:
        self._timer = None
        self._timer_at = None
        if self.core is not None and self.running:
            self._perform(self.core.tick(self.now()))

    # --- performing actions -----------------------------------------------------------

    def _perform(self, actions: list[Action]) -> None:
        self._queue.extend(actions)
        self._pump()
        self._reschedule()

    def _reschedule(self) -> None:
        if self.core is None or not self.running:
            return
        deadline = self.core.next_deadline()
        if deadline is None:
            return
        if self._timer is not None and self._timer.active():
            if self._timer_at is not None and self._timer_at <= deadline:
                return
            self._timer.cancel()
        delay = max(0.0, deadline - self.now())
        self._timer_at = deadline
        self._timer = self.reactor.callLater(delay, self._tick)

    def _pump(self) -> None:
        """Start a round with everything queued, unless one is running (or the service
        stopped: its databases close once the last round is done)."""
        if self._busy or not self._queue or not self.running:
            return
        batch, self._queue = self._queue, []
        log_ops: list[LogOp] = []
        store_ops: list[StoreOp] = []
        after: list[SendMessage | Acknowledge] = []
        for action in batch:
            if isinstance(action, PersistLog | DropLog | MarkAlive):
                log_ops.append(action)
            elif isinstance(action, Apply | PurgeTombstones):
                store_ops.append(action)
            else:
                after.append(action)
        if not log_ops and not store_ops:
            self._after(after)
            return
        self._busy = True
        self.rounds += 1
        d = self.run(self._write, log_ops, store_ops)
        d.addCallbacks(
            self._written, self._write_failed, callbackArgs=(after,), errbackArgs=(after,)
        )

    def _write(self, log_ops: list[LogOp], store_ops: list[StoreOp]) -> list[Update]:
        """In a worker thread: the log writes (one commit), then the store writes."""
        if log_ops:
            write_log_ops(self.log_store, log_ops)
        applied: list[Update] = []
        many = self.object_store.apply_many
        run: list[Update] = []  # consecutive Applies go to apply_many together
        for op in [*store_ops, None]:
            if isinstance(op, Apply):
                run.append(op.update)
                continue
            if run:
                applied.extend(u for u, ok in zip(run, many(run), strict=True) if ok)
                run = []
            if op is not None:
                self.object_store.purge_tombstones(op.before)
        return applied

    def _written(self, applied: list[Update], after: list[SendMessage | Acknowledge]) -> None:
        self._busy = False
        if self.on_applied is not None:
            for update in applied:
                try:
                    self.on_applied(update)
                except Exception:
                    self.log.failure("replication: on_applied hook failed")
        self._after(after)
        self._continue()

    def _write_failed(self, f: Failure, after: list[SendMessage | Acknowledge]) -> None:
        """A disk error: nothing that depended on the round may leave."""
        self._busy = False
        self.log.failure("replication: durable write failed; acks withheld", f)
        for action in after:
            if isinstance(action, Acknowledge):
                d = self._waiting.pop(action.token, None)
                if d is not None:
                    d.errback(f)
        self._continue()

    def _continue(self) -> None:
        if self._queue and self.running:
            self._pump()
            self._reschedule()
        if not self._busy:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def _after(self, actions: list[SendMessage | Acknowledge]) -> None:
        """Answers in order; frames go out per peer, batched (order kept per peer)."""
        batches: dict[NodeId, list[Message]] = {}
        for action in actions:
            if isinstance(action, Acknowledge):
                d = self._waiting.pop(action.token, None)
                if d is not None:
                    d.callback(action.timestamp)
            else:
                batches.setdefault(action.to, []).append(action.message)
        for to, messages in batches.items():
            for i in range(0, len(messages), MAX_BATCH):
                self._send(to, messages[i : i + MAX_BATCH], 0)

    def _send(self, to: NodeId, messages: list[Message], attempt: int) -> None:
        if not self.running:
            return
        self.sent += len(messages)
        self.calls += 1
        frames = [m.to_bytes() for m in messages]
        try:
            d = self.send(to, frames)
        except Exception:
            self.send_failures += len(messages)
            self.log.failure("replication: send to {to} failed", to=to)
            return

        def failed(f: Failure) -> None:
            # Best effort: the core retries pushes (and a lost ack is answered by the
            # next push). A lost Retire would cost the participants a stall_timeout,
            # so retires are sent again a few times.
            self.send_failures += len(messages)
            self.log.debug(
                "replication: {n} frames to {to} failed: {err}",
                n=len(messages),
                to=to,
                err=f.getErrorMessage(),
            )
            retires = [m for m in messages if isinstance(m, Retire)]
            if retires and attempt < RETIRE_RETRIES and self.running:
                self.reactor.callLater(2.0**attempt, self._send, to, retires, attempt + 1)

        d.addErrback(failed)

    # --- status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``{"replication": {...}}`` for ``GET /api/status`` (issue 8, item 6)."""
        doc: dict[str, Any] = {
            "node": self.node_id,
            "wipe_required": self.wipe_required,
            "queued_actions": len(self._queue),
            "waiting_agents": len(self._waiting),
            "messages_sent": self.sent,
            "send_calls": self.calls,
            "send_failures": self.send_failures,
            "write_rounds": self.rounds,
        }
        if self.core is None:
            doc["state"] = "refused" if self.wipe_required else "starting"
            return {"replication": doc}
        st = self.core.status()
        doc["state"] = "running"
        doc["log_length"] = st.log_length
        doc["oldest_pending"] = (
            None
            if st.oldest_pending is None
            else {
                "age": round(self.now() - st.oldest_pending.wallclock / 1e6, 3),
                "coordinator": st.oldest_pending.node_id,
            }
        )
        doc["awaiting"] = dict(sorted(st.awaiting.items()))
        return {"replication": doc}
