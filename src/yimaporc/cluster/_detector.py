"""Failure detection of :class:`~.membership.Membership` (SWIM with Lifeguard's
refinements, on the TRM ring; the module docstring of :mod:`.membership` describes
it): pinging the neighbour, suspicion, indirect probes through relays, the local
health score.  A mixin: :class:`FailureDetection` holds the methods, the state they
use lives on the :class:`~.membership.Membership` it is mixed into (declared below).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs

from .view import Action, TrmConfig, View
from .wire import Body, IndirectAck, Member, Ping, PingReq

if TYPE_CHECKING:
    from .membership import _CoordinatorRound, _Waiting


@attrs.define
class _Relay:
    requester: str
    nonce: int
    target: str
    deadline: float


class FailureDetection:
    """The failure detector's handlers and actions (mixed into ``Membership``)."""

    # State, set by Membership.__init__.
    me: Member
    config: TrmConfig
    rng: random.Random
    view: View
    detector: Counter[str]
    health: int
    last_accused: str | None
    _round: _CoordinatorRound | None
    _waiting: _Waiting | None
    _next_trigger: float
    _next_ping: float
    _ping_target: Member | None
    _ping_nonce: int
    _ping_outstanding: bool
    _ping_sent_at: float
    _suspect_since: float | None
    _suspect_nonce: int
    _indirect_asked: bool
    _relay_answered: bool
    _relays: dict[int, _Relay]
    _relay_cycle: list[Member]
    _relay_next: int
    _good_relay: tuple[str, str]

    if TYPE_CHECKING:  # Membership's own, used here

        @property
        def _idle(self) -> bool: ...

        def _send(self, out: list[Action], address: str, body: Body) -> None: ...

        def _trigger(self, now: float, extra: Iterable[Member], out: list[Action]) -> None: ...

        def _start_round(
            self, now: float, extra: dict[str, Member], out: list[Action], exclude: str = ""
        ) -> None: ...

    def _on_ping_req(self, sender: Member, msg: PingReq, now: float, out: list[Action]) -> None:
        if msg.target_id == self.me.node_id or len(self._relays) >= 64:
            return
        self._ping_nonce += 1
        deadline = now + self.config.relay_timeout
        self._relays[self._ping_nonce] = _Relay(sender.address, msg.nonce, msg.target_id, deadline)
        self._send(out, msg.target_address, Ping(self.view.epoch, self._ping_nonce))

    def _on_indirect_ack(
        self, sender: Member, msg: IndirectAck, now: float, out: list[Action]
    ) -> None:
        target = self._ping_target
        if target is None or msg.target_id != target.node_id or msg.nonce < self._suspect_nonce:
            return
        self._relay_answered = True
        if msg.ok:
            self.detector["indirect_ok"] += 1
            self._good_relay = (target.node_id, sender.node_id)
            self._alive()
        else:
            self.detector["indirect_nack"] += 1

    def _alive(self) -> None:
        """The target showed a sign of life: the current ping counts as answered."""
        self._ping_outstanding = False
        self._suspect_since = None

    def _stalled(self, now: float, late: float) -> None:
        """Our own timer ran ``late`` s late: that much of the silence we saw is ours."""
        self.detector["stalls"] += 1
        self.health = min(self.config.max_health, self.health + 1)
        self._ping_sent_at += late
        if self._suspect_since is not None:
            self._suspect_since += late
        self._indirect_asked = False
        # Replies may be waiting in the socket buffer: read them before deciding.  Once
        # per round: a node starved of CPU (every timer late, e.g. a cgroup quota) woke
        # up for less than the grace each time, so pushing the deadline at every stall
        # kept it in the round, or waiting for a commit that was never coming (it had
        # been left out), for ever: deaf to every Probe, probing nobody, it never rejoined.
        grace = now + self.config.round_timeout / 4
        rnd, waiting = self._round, self._waiting
        if rnd is not None and not rnd.extended:
            rnd.deadline = max(rnd.deadline, grace)
            rnd.extended = True
        if waiting is not None and not waiting.extended:
            waiting.deadline = max(waiting.deadline, grace)
            waiting.extended = True

    def _neighbour(self) -> Member | None:
        members = self.view.members
        if len(members) < 2:
            return None
        i = members.index(self.me)
        return members[(i + 1) % len(members)]

    def _ping(self, now: float, out: list[Action]) -> None:
        target = self._ping_target
        assert target is not None
        cfg = self.config
        self._next_ping = now + cfg.ping_interval
        if not self._ping_outstanding:
            self.health = max(0, self.health - 1)
        else:
            if self._suspect_since is None:
                self._suspect_since = self._ping_sent_at
                self._suspect_nonce = self._ping_nonce
                self.detector["suspected"] += 1
            if self._indirect_asked and not self._relay_answered:
                # nobody answered our PingReq, not even "no": our own receive path is failing
                self.health = min(cfg.max_health, self.health + 1)
            timeout = cfg.suspect_timeout * (1 + self.health)
            if now - self._suspect_since >= timeout - 1e-6:
                self.detector["accused"] += 1
                self.last_accused = target.node_id
                self._ping_outstanding = False
                self._suspect_since = None
                self._indirect_asked = False
                if self._idle and now >= self._next_trigger:
                    # Leave the silent neighbour out: the round then needs no timeout.
                    self._start_round(now, {}, out, exclude=target.node_id)
                else:
                    self._trigger(now, (), out)
                return
        self._ping_nonce += 1
        self._ping_outstanding = True
        self._ping_sent_at = now
        self._send(out, target.address, Ping(self.view.epoch, self._ping_nonce))
        self._indirect_asked = self._relay_answered = False
        if self._suspect_since is not None:
            self._ask_relays(target, out)
        before = self._predecessor()
        if before is not None and before != target:
            # our monitor hears from us even when its pings are lost in our socket buffer
            self._send(out, before.address, Ping(self.view.epoch, 0))

    def _ask_relays(self, target: Member, out: list[Action]) -> None:
        others = [
            m for m in self.view.members if m.node_id not in (self.me.node_id, target.node_id)
        ]
        # Go round the other members in a shuffled order, so that over a suspicion every
        # one of them is asked (in a bridge only some can reach the target).
        if set(self._relay_cycle) != set(others):
            self._relay_cycle = self.rng.sample(others, len(others))
            self._relay_next = 0
        # The last relay that reached this target comes first (in a bridge, the bridge).
        good_for, good = self._good_relay
        relays = [m for m in others if m.node_id == good and good_for == target.node_id]
        for _ in range(len(others)):
            if len(relays) >= self.config.indirect_probes:
                break
            m = self._relay_cycle[self._relay_next % len(others)]
            self._relay_next += 1
            if m not in relays:
                relays.append(m)
        for relay in relays:
            self._send(
                out, relay.address, PingReq(self._ping_nonce, target.node_id, target.address)
            )
        self._indirect_asked = bool(relays)

    def _predecessor(self) -> Member | None:
        members = self.view.members
        if len(members) < 2:
            return None
        return members[members.index(self.me) - 1]
