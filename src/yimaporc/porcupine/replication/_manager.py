"""The replication manager of one node: a sans-IO core (seed §4).

Events go in (:meth:`~ReplicationManager.submit`, :meth:`~ReplicationManager.receive`,
:meth:`~ReplicationManager.set_live`, :meth:`~ReplicationManager.tick`), each with the
node's local ``now`` in seconds; a list of actions comes out.  The shell performs
the actions **strictly in order**, and a durable action (:class:`PersistLog`,
:class:`Apply`) must be on stable storage before the next one starts.  That one
rule gives the durability ordering of seed §4.3: the log entry is written before
the update is applied, the agent's :class:`Acknowledge` and a participant's
:class:`Ack` only leave once both are durable.

The core keeps in memory exactly what the log holds (plus retry timers); after
a crash :meth:`ReplicationManager.recover` rebuilds it from the log alone.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable

import attrs

from ._values import (
    Acknowledge,
    Action,
    Apply,
    DropLog,
    LogEntry,
    MarkAlive,
    NodeId,
    PersistLog,
    PurgeTombstones,
    SendMessage,
    Timestamp,
    Update,
    WipeRequired,
)
from ._wire import Ack, Message, Push, Retire

WEEK = 7 * 86400.0


def _us(now: float) -> int:
    return round(now * 1e6)


@attrs.frozen
class ReplicationConfig:
    """Tunables of the replication manager (seconds unless said otherwise)."""

    #: Log entries older than this are dropped; a node away longer must be wiped.
    retention: float = WEEK
    #: First retry delay of a push; doubles per attempt (with jitter) up to ``push_max``.
    push_initial: float = 1.0
    push_max: float = 60.0
    #: A participant takes over an entry whose live coordinator has been silent this long.
    stall_timeout: float = 300.0
    #: How often the node records "I am up" (the wipe rule compares against it).
    alive_interval: float = 60.0
    #: Durable copies (coordinator included) before the agent gets ``Acknowledge``.
    #: 1 is seed §4.3 (coordinator's log + store); 2 survives losing the coordinator's disk.
    acks_before_reply: int = 1
    #: How long (and how many) retired updates a node remembers, to answer late pushes.
    retired_memory: float = 600.0
    retired_memory_entries: int = 100_000
    #: Tombstones older than this may be purged (default: the retention, see docs).
    tombstone_ttl: float | None = None

    def __attrs_post_init__(self) -> None:
        if self.retention <= 0 or self.push_initial <= 0 or self.push_max < self.push_initial:
            raise ValueError("retention and push delays must be positive, push_max >= initial")
        if self.acks_before_reply < 1:
            raise ValueError("acks_before_reply must be at least 1")
        if self.stall_timeout <= self.push_max:
            raise ValueError(
                "stall_timeout must exceed push_max, or participants race the coordinator"
            )


@attrs.frozen
class ReplicationStatus:
    """What the status API shows for one node (issue 8, item 6)."""

    log_length: int
    oldest_pending: Timestamp | None
    awaiting: dict[NodeId, int]


@attrs.define
class _Slot:
    """A log entry and its in-memory push state."""

    entry: LogEntry
    since: float
    remaining: set[NodeId]
    next_push: dict[NodeId, float] = attrs.field(factory=dict)
    attempts: dict[NodeId, int] = attrs.field(factory=dict)
    copies: int = 1
    tokens: list[int] = attrs.field(factory=list)
    gen: int = 0
    #: durable copies before the tokens are acknowledged (0: the config's)
    need: int = 0

    @property
    def timestamp(self) -> Timestamp:
        return self.entry.timestamp


class ReplicationManager:
    """Optimistic, lock-free replication of total-object updates, newest timestamp wins."""

    def __init__(
        self,
        node_id: NodeId,
        rng: random.Random,
        config: ReplicationConfig | None = None,
    ) -> None:
        self.node_id = node_id
        self.rng = rng
        self.config = config or ReplicationConfig()
        self._slots: dict[str, _Slot] = {}
        self._live: frozenset[NodeId] | None = None
        self._retired: dict[str, tuple[Timestamp, float]] = {}
        self._next_token = 1
        self._last_issued = 0
        self._next_alive = 0.0
        # one timer per slot, lazily invalidated by the slot's generation
        self._timers: list[tuple[float, int, str, int]] = []
        self._timer_seq = 0

    # --- construction ------------------------------------------------------------

    @classmethod
    def recover(
        cls,
        node_id: NodeId,
        entries: Iterable[LogEntry],
        last_alive: int | None,
        now: float,
        rng: random.Random,
        config: ReplicationConfig | None = None,
    ) -> tuple[ReplicationManager, list[Action]]:
        """Rebuild the core from its log after a (re)start.

        Raises :class:`WipeRequired` if the node was last up longer ago than the
        retention.  The actions re-apply every logged update (the crash may have
        fallen between ``PersistLog`` and ``Apply``; the store discards what it
        already has) and resume pushing.
        """
        mgr = cls(node_id, rng, config)
        now_us = _us(now)
        retention = _us(mgr.config.retention)
        if last_alive is not None and now_us - last_alive > retention:
            raise WipeRequired(node_id, last_alive, now_us, retention)
        actions: list[Action] = []
        for entry in entries:
            slot = _Slot(entry, now, set(entry.remaining))
            mgr._slots[entry.object_id] = slot
            mgr._arm(slot, now)
            if entry.coordinator == node_id:
                mgr._last_issued = max(mgr._last_issued, entry.timestamp.wallclock)
            actions.append(Apply(entry.update))
        actions.extend(mgr.tick(now))
        return mgr, actions

    # --- events ------------------------------------------------------------------

    def submit(
        self,
        object_id: str,
        body: bytes | None,
        targets: Iterable[NodeId],
        now: float,
        current: Timestamp | None = None,
        acks: int | None = None,
    ) -> tuple[int, list[Action]]:
        """An agent's total-object update (``body`` None deletes); this node coordinates.

        ``targets`` are the object's replicas and must include this node.
        ``current`` is the version the agent read, if any: the new timestamp is
        made newer than it and than anything this node logged for the object, so
        a read-modify-write is never discarded because of clock skew.  Returns
        the token that a later :class:`Acknowledge` carries.  ``acks`` overrides
        ``config.acks_before_reply`` for this update (e.g. 1 for a flag change that
        must not wait for a replica that is down).
        """
        target_set = frozenset(targets)
        if self.node_id not in target_set:
            raise ValueError(f"coordinator {self.node_id} must be one of the targets")
        if len(target_set) > 255:
            raise ValueError("at most 255 replicas")
        wall = max(_us(now), self._last_issued + 1)
        old = self._slots.get(object_id)
        if old is not None:
            wall = max(wall, old.timestamp.wallclock + 1)
        if current is not None:
            wall = max(wall, current.wallclock + 1)
        self._last_issued = wall
        update = Update(object_id, Timestamp(wall, self.node_id), body)
        token = self._next_token
        self._next_token += 1
        entry = LogEntry(update, self.node_id, target_set, target_set - {self.node_id})
        actions: list[Action] = []
        if not entry.remaining:
            # a single replica: nothing to push, the store write is the whole update
            if old is not None:
                actions.append(DropLog(object_id, old.timestamp))
                self._supersede(old, actions)
                del self._slots[object_id]
            actions.append(Apply(update))
            actions.append(Acknowledge(token, update.timestamp))
            return token, actions
        slot = _Slot(entry, now, set(entry.remaining), tokens=[token], need=acks or 0)
        actions.append(PersistLog(entry))
        actions.append(Apply(update))
        if old is not None:
            self._supersede(old, actions)
        self._slots[object_id] = slot
        self._check_tokens(slot, actions)
        self._push_due(slot, now, actions)
        self._arm(slot, now)
        return token, actions

    def receive(self, sender: NodeId, message: Message, now: float) -> list[Action]:
        """A message from peer ``sender`` (the transport authenticates who sent it)."""
        actions: list[Action] = []
        if isinstance(message, Push):
            self._on_push(sender, message, now, actions)
        elif isinstance(message, Ack):
            self._on_ack(sender, message, now, actions)
        elif isinstance(message, Retire):
            self._on_retire(message, now, actions)
        else:  # pragma: no cover - the union is closed
            raise TypeError(f"not a replication message: {message!r}")
        return actions

    def set_live(self, live: Iterable[NodeId], now: float) -> list[Action]:
        """The membership service's current view: who is up and reachable.

        Pushes go only to live peers; a peer that comes back is pushed to at once;
        entries whose coordinator left are taken over by this node.
        """
        new = frozenset(live)
        old = self._live
        self._live = new
        back = new if old is None else new - old
        for slot in self._slots.values():
            for node in back:
                slot.next_push.pop(node, None)
                slot.attempts.pop(node, None)
            self._arm(slot, now)
        return self.tick(now)

    def tick(self, now: float) -> list[Action]:
        """Timers: retries, takeovers, retention, alive marks."""
        actions: list[Action] = []
        now_us = _us(now)
        if now >= self._next_alive:
            self._next_alive = now + self.config.alive_interval
            actions.append(MarkAlive(now_us))
            ttl = self.config.tombstone_ttl
            ttl = self.config.retention if ttl is None else ttl
            actions.append(PurgeTombstones(now_us - _us(ttl)))
        horizon = now_us - _us(self.config.retention)
        timers = self._timers
        due: list[_Slot] = []
        while timers and timers[0][0] <= now:
            _, _, object_id, gen = heapq.heappop(timers)
            slot = self._slots.get(object_id)
            if slot is not None and slot.gen == gen:
                due.append(slot)
        for slot in due:
            object_id = slot.entry.object_id
            if slot.timestamp.wallclock < horizon:
                del self._slots[object_id]
                actions.append(DropLog(object_id, slot.timestamp))
                continue
            if self._pushing(slot, now):
                if not slot.remaining:
                    self._retire(slot, now, actions)
                    continue
                self._push_due(slot, now, actions)
            self._arm(slot, now)
        retired = self._retired
        while retired:
            object_id = next(iter(retired))
            if retired[object_id][1] > now:
                break
            del retired[object_id]
        return actions

    def next_deadline(self) -> float | None:
        """When :meth:`tick` has work next (local time), or None."""
        timers = self._timers
        while timers:
            _, _, object_id, gen = timers[0]
            slot = self._slots.get(object_id)
            if slot is not None and slot.gen == gen:
                return min(self._next_alive, timers[0][0])
            heapq.heappop(timers)
        return self._next_alive

    # --- queries -----------------------------------------------------------------

    def entries(self) -> list[LogEntry]:
        """The log as this core knows it (what is, or is about to be, on disk)."""
        return [s.entry for s in self._slots.values()]

    def __len__(self) -> int:
        return len(self._slots)

    def status(self) -> ReplicationStatus:
        """Log length, oldest pending entry, and objects awaiting each peer."""
        awaiting: dict[NodeId, int] = {}
        for slot in self._slots.values():
            for node in slot.remaining:
                awaiting[node] = awaiting.get(node, 0) + 1
        oldest = min((s.timestamp for s in self._slots.values()), default=None)
        return ReplicationStatus(len(self._slots), oldest, awaiting)

    # --- internals ---------------------------------------------------------------

    def _is_live(self, node: NodeId) -> bool:
        return self._live is None or node in self._live

    def _due(self, slot: _Slot, now: float) -> float:
        """When ``slot`` next needs the timer: a push, a takeover, retirement or expiry."""
        best = (slot.timestamp.wallclock + _us(self.config.retention) + 1) / 1e6
        start = 0.0
        coordinator = slot.entry.coordinator
        if coordinator != self.node_id and self._is_live(coordinator):
            # a participant of a live coordinator only pushes once the entry stalls
            start = slot.since + self.config.stall_timeout
        if not slot.remaining:
            return min(best, start)
        if start > now:
            best = min(best, start)
        for node in slot.remaining:
            if self._is_live(node):
                best = min(best, max(start, slot.next_push.get(node, 0.0)))
        return best

    def _arm(self, slot: _Slot, now: float) -> None:
        """(Re)set the slot's timer; older timers of the slot become stale."""
        self._timer_seq += 1
        slot.gen = self._timer_seq
        heapq.heappush(
            self._timers, (self._due(slot, now), self._timer_seq, slot.entry.object_id, slot.gen)
        )
        if len(self._timers) > 4 * len(self._slots) + 64:
            self._timers = [t for t in self._timers if self._current(t)]
            heapq.heapify(self._timers)

    def _current(self, timer: tuple[float, int, str, int]) -> bool:
        slot = self._slots.get(timer[2])
        return slot is not None and slot.gen == timer[3]

    def _pushing(self, slot: _Slot, now: float) -> bool:
        """Does this node drive ``slot``: its own, orphaned, or stalled?"""
        coordinator = slot.entry.coordinator
        return (
            coordinator == self.node_id
            or not self._is_live(coordinator)
            or now >= slot.since + self.config.stall_timeout
        )

    def _push_due(self, slot: _Slot, now: float, actions: list[Action]) -> None:
        cfg = self.config
        push = Push(slot.entry.update, slot.entry.coordinator, slot.entry.targets)
        for node in sorted(slot.remaining):
            if not self._is_live(node) or slot.next_push.get(node, 0.0) > now:
                continue
            n = slot.attempts.get(node, 0)
            delay = min(cfg.push_max, cfg.push_initial * (2**n))
            slot.attempts[node] = n + 1
            slot.next_push[node] = now + delay * self.rng.uniform(0.75, 1.25)
            actions.append(SendMessage(node, push))

    def _supersede(self, old: _Slot, actions: list[Action]) -> None:
        """A newer update replaced ``old``: its agents may have their answer."""
        for token in old.tokens:
            actions.append(Acknowledge(token, old.timestamp))
        old.tokens.clear()

    def _check_tokens(self, slot: _Slot, actions: list[Action]) -> None:
        need = min(slot.need or self.config.acks_before_reply, len(slot.entry.targets))
        if slot.tokens and slot.copies >= need:
            for token in slot.tokens:
                actions.append(Acknowledge(token, slot.timestamp))
            slot.tokens.clear()

    def _retire(self, slot: _Slot, now: float, actions: list[Action]) -> None:
        """Every target holds the update: drop it here and tell the others to."""
        entry = slot.entry
        del self._slots[entry.object_id]
        actions.append(DropLog(entry.object_id, entry.timestamp))
        slot.copies = len(entry.targets)
        self._check_tokens(slot, actions)
        for node in sorted(entry.targets - {self.node_id}):
            actions.append(SendMessage(node, Retire(entry.object_id, entry.timestamp)))
        self._remember(entry.object_id, entry.timestamp, now)

    def _remember(self, object_id: str, ts: Timestamp, now: float) -> None:
        retired = self._retired
        known = retired.pop(object_id, None)
        if known is not None and known[0] > ts:
            ts = known[0]
        retired[object_id] = (ts, now + self.config.retired_memory)  # kept in expiry order
        if len(retired) > self.config.retired_memory_entries:
            del retired[next(iter(retired))]

    def _on_push(self, sender: NodeId, msg: Push, now: float, actions: list[Action]) -> None:
        update = msg.update
        ts = update.timestamp
        ack = SendMessage(sender, Ack(update.object_id, ts))
        if ts.wallclock < _us(now) - _us(self.config.retention):
            actions.append(ack)  # older than any log may hold: never applied
            return
        retired = self._retired.get(update.object_id)
        if retired is not None and ts <= retired[0]:
            if ts == retired[0]:
                actions.append(SendMessage(sender, Retire(update.object_id, ts)))
            else:
                actions.append(ack)
            return
        old = self._slots.get(update.object_id)
        if old is not None and old.timestamp >= ts:
            actions.append(ack)  # a duplicate, or we already hold something newer
            return
        remaining = msg.targets - {self.node_id, msg.coordinator, sender}
        entry = LogEntry(update, msg.coordinator, msg.targets, remaining)
        actions.append(PersistLog(entry))
        actions.append(Apply(update))
        if old is not None:
            self._supersede(old, actions)
        slot = _Slot(entry, now, set(remaining))
        self._slots[update.object_id] = slot
        self._arm(slot, now)
        actions.append(ack)

    def _on_ack(self, sender: NodeId, msg: Ack, now: float, actions: list[Action]) -> None:
        slot = self._slots.get(msg.object_id)
        if slot is None or slot.timestamp != msg.timestamp or sender not in slot.remaining:
            return
        slot.remaining.discard(sender)
        slot.next_push.pop(sender, None)
        slot.copies += 1
        self._check_tokens(slot, actions)
        if not slot.remaining and self._pushing(slot, now):
            self._retire(slot, now, actions)
        else:
            self._arm(slot, now)

    def _on_retire(self, msg: Retire, now: float, actions: list[Action]) -> None:
        self._remember(msg.object_id, msg.timestamp, now)
        slot = self._slots.get(msg.object_id)
        if slot is None or slot.timestamp > msg.timestamp:
            return
        del self._slots[msg.object_id]
        actions.append(DropLog(msg.object_id, slot.timestamp))
        if slot.timestamp == msg.timestamp:
            slot.copies = len(slot.entry.targets)
            self._check_tokens(slot, actions)
        else:
            self._supersede(slot, actions)
