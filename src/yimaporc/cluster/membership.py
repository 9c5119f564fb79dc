"""Three-Round Membership (TRM), as Porcupine uses it (seed §3.1), sans-IO.

The core never touches a socket or a clock: the shell feeds it authenticated
datagrams and timer ticks with the local time ``now`` and performs the actions
it returns (:class:`Send`, :class:`ViewChanged`).

Rounds:

1. a node that notices a change becomes *coordinator* and sends ``NewGroup``
   with a proposal drawn from its Lamport clock;
2. members answer ``Reply`` with their epoch and view;
3. after everybody answered (or ``round_timeout``) the coordinator ``Commit``\\ s
   the members that replied, with an epoch greater than every epoch it heard.

Changes are noticed three ways: the coordinator's periodic ``Probe`` to known
nodes outside the group (a probe from a non-member starts a round that merges
both groups); the failure detector below; and a ping answer whose epoch or
membership differs from ours.  Concurrent rounds are ordered by
``(proposal, node_id)``: a node follows the highest round it has seen.  A
node's epoch never goes back: commits with an epoch not above ours are ignored.

Failure detection (SWIM with Lifeguard's refinements, on the TRM ring): every
``ping_interval`` a node pings its next-highest neighbour (the *target*).  A ping
unanswered by the next interval makes the target *suspect*: the node also asks
``indirect_probes`` other members to ping it (``PingReq``; they answer
``IndirectAck``, positive, or negative when the target kept silent, so the asker
learns its own links work).  Any authenticated datagram from the target, or a
positive indirect answer, refutes the suspicion.  Only a target silent for
``suspect_timeout * (1 + health)`` since the first unanswered ping is left out
of a new round.  ``health`` is the node's own trouble score (Lifeguard's local
health multiplier, 0..``max_health``): up when its own timer ran more than
``late_tolerance`` late (a stall: it then also forgets the suspicion, since the
answers are still in its socket buffer) or when no relay answered its
``PingReq`` (its own receive path is losing datagrams); down by one per
answered ping.  Every node also pings its predecessor (its monitor) each
interval, so a node whose receive path is flooded, which loses its monitor's
pings, still shows it is alive.  Its methods live in :mod:`._detector` (a mixin).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable

import attrs

from ._detector import FailureDetection, _Relay
from .timesync import ClockSync
from .view import (
    EMPTY_VIEW,
    Action,
    AttachmentFor,
    IMembershipListener,
    Send,
    TrmConfig,
    View,
    ViewChanged,
)
from .wire import (
    Ack,
    Body,
    Commit,
    Header,
    IndirectAck,
    Member,
    NewGroup,
    Ping,
    PingReq,
    Probe,
    Reply,
    TimeReq,
    TimeResp,
)

__all__ = [
    "EMPTY_VIEW",
    "Action",
    "AttachmentFor",
    "IMembershipListener",
    "Membership",
    "Send",
    "TrmConfig",
    "View",
    "ViewChanged",
]


@attrs.define
class _CoordinatorRound:
    key: tuple[int, str]
    candidates: dict[str, Member]
    replies: dict[str, tuple[Member, int]]
    deadline: float
    excluded: Member | None = None
    resend_at: float | None = None
    #: the deadline was pushed back once for a local stall (never twice: see _stalled)
    extended: bool = False
    started: float = 0.0
    #: a reply showed another epoch or view: the round must commit even if the members
    #: it ends with are those of the current view
    changed: bool = False


@attrs.define
class _Waiting:
    key: tuple[int, str]
    deadline: float
    extended: bool = False


def _sorted(members: Iterable[Member]) -> tuple[Member, ...]:
    return tuple(sorted(members, key=lambda m: m.sort_key))


class Membership(FailureDetection):
    """One node's TRM state machine."""

    def __init__(
        self,
        me: Member,
        *,
        seeds: Iterable[str] = (),
        rng: random.Random,
        config: TrmConfig | None = None,
        epoch: int = 0,
        lamport: int = 0,
        known: Iterable[str] = (),
        attachment_for: AttachmentFor | None = None,
    ) -> None:
        self.me = me
        self.config = config or TrmConfig()
        self.rng = rng
        self.view = EMPTY_VIEW
        self.lamport = max(lamport, epoch)
        self._initial_epoch = epoch
        self.seeds = frozenset(s for s in seeds if s != me.address)
        self._known: dict[str, float] = {a: 0.0 for a in known if a != me.address}
        self.attachment_for = attachment_for
        self.clock_sync = ClockSync(me.node_id)
        self._round: _CoordinatorRound | None = None
        self._waiting: _Waiting | None = None
        self._pending: dict[str, Member] | None = None
        self._next_trigger = 0.0
        self._next_probe = 0.0
        self._next_ping = 0.0
        self._ping_target: Member | None = None
        self._ping_nonce = 0
        self._ping_outstanding = False
        self._ping_sent_at = 0.0
        self._suspect_since: float | None = None
        self._suspect_nonce = 0
        self._indirect_asked = False
        self._relay_answered = False
        self._relays: dict[int, _Relay] = {}
        self._relay_cycle: list[Member] = []
        self._relay_next = 0
        self._good_relay: tuple[str, str] = ("", "")  # (target id, relay id)
        self._ahead_seen = False
        self.health = 0
        self._last_input = 0.0
        self.sent: Counter[str] = Counter()
        #: Authenticated datagrams handed to :meth:`receive`, by type.
        self.received: Counter[str] = Counter()
        self.detector: Counter[str] = Counter()
        #: The last member this node accused of not answering (why it left the view).
        self.last_accused: str | None = None
        self.rounds_started = 0
        #: Rounds that ended with the current view (a candidate did not answer in time)
        #: and so committed nothing (see _commit).
        self.rounds_unchanged = 0
        #: Views this node committed or installed.
        self.views_installed = 0
        #: Start times of this node's recent rounds, to time late replies.
        self._round_starts: dict[tuple[int, str], float] = {}
        #: node id -> how long its last reply to one of our rounds took.
        self._reply_delay: dict[str, float] = {}
        #: node id -> (rounds it missed in a row, until when its probes start none, the
        #: incarnation that missed them: a restarted node is not shy).
        self._shy: dict[str, tuple[int, float, int]] = {}

    # --- inputs ---------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Boot: become coordinator of a group of one and start probing."""
        out: list[Action] = []
        self._last_input = now
        self._install(View(self._initial_epoch + 1, (self.me,), self.me.node_id), now, out)
        self._next_probe = now
        return out

    def receive(self, header: Header, body: Body, now: float) -> list[Action]:
        """An authenticated, fresh datagram from ``header.sender``."""
        out: list[Action] = []
        if header.sender == self.me.node_id:
            return out
        self.received[type(body).__name__] += 1
        self._last_input = max(self._last_input, now)
        self.lamport = max(self.lamport, header.lamport) + 1
        self._known[header.address] = now
        sender = Member(header.sender, header.address, header.incarnation)
        if sender == self._ping_target:
            self._alive()  # any fresh datagram from the target refutes a suspicion
        if isinstance(body, Probe):
            self._on_probe(sender, body, now, out)
        elif isinstance(body, NewGroup):
            self._on_new_group(sender, body, now, out)
        elif isinstance(body, Reply):
            self._on_reply(sender, body, now, out)
        elif isinstance(body, Commit):
            self._on_commit(sender, body, now, out)
        elif isinstance(body, Ping):
            member = self.view.member(sender.node_id) == sender
            self._send(out, sender.address, Ack(self.view.epoch, body.nonce, member))
        elif isinstance(body, Ack):
            self._on_ack(sender, body, now, out)
        elif isinstance(body, TimeReq):
            self._send(out, sender.address, self.clock_sync.answer(body, now))
        elif isinstance(body, TimeResp):
            self.clock_sync.on_response(sender.node_id, body, now)
        elif isinstance(body, PingReq):
            self._on_ping_req(sender, body, now, out)
        elif isinstance(body, IndirectAck):
            self._on_indirect_ack(sender, body, now, out)
        return out

    def rpc_timeout(self, address: str, now: float) -> list[Action]:
        """An RPC to the member at ``address`` timed out: evidence for the detector.

        If it is the member this node monitors (its ping target), the suspicion
        starts now, as after an unanswered ping: it is pinged at once with indirect
        probes, and accused after ``suspect_timeout * (1 + health)`` unless any sign
        of life refutes it (an overloaded but alive peer answers its pings).  For
        another member (monitored by its own neighbour) it is only counted.
        """
        out: list[Action] = []
        target = self._ping_target
        member = next((m for m in self.view.members if m.address == address), None)
        if member is None or member.node_id == self.me.node_id:
            return out
        self.detector["rpc_timeouts"] += 1
        if target is None or member.node_id != target.node_id:
            return out
        if self._suspect_since is None:
            self._suspect_since = now
            self._suspect_nonce = self._ping_nonce
            self.detector["suspected"] += 1
            self.detector["suspected_by_rpc"] += 1
            self._ping_outstanding = True
            self._next_ping = min(self._next_ping, now)
            self._ping(now, out)
        return out

    def tick(self, now: float) -> list[Action]:
        """Run whatever timers are due at ``now``."""
        out: list[Action] = []
        cfg = self.config
        # After each input the shell set its timer for next_deadline() (at once if that
        # was already past), so the timer was due at the later of the two.
        planned = self.next_deadline()
        due = max(now if planned is None else planned, self._last_input)
        self._last_input = max(self._last_input, now)
        if now - due > cfg.late_tolerance:
            self._stalled(now, now - due)
        rnd = self._round
        if rnd is not None and rnd.resend_at is not None and now >= rnd.resend_at:
            # one more NewGroup to the silent candidates: one lost datagram should not
            # cost a member its place (and the group another round to take it back)
            rnd.resend_at = None
            for m in rnd.candidates.values():
                if m.node_id not in rnd.replies:
                    self._send(out, m.address, NewGroup(rnd.key[0]))
        if self._round is not None and now >= self._round.deadline:
            self._commit(now, out)
        if self._waiting is not None and now >= self._waiting.deadline:
            self._waiting = None
        if self._pending is not None and self._idle and now >= self._next_trigger:
            extra, self._pending = self._pending, None
            self._start_round(now, extra, out)
        if self._idle and now >= self._next_probe:
            self._probe(now, out)
            # Coordinators probe every interval; members every few, so a group
            # whose coordinator knows nobody outside still finds the others.
            every = cfg.probe_interval * (1 if self._is_coordinator else cfg.member_probe_factor)
            self._next_probe = now + every * (0.9 + 0.2 * self.rng.random())
        if self._ping_target is not None and now >= self._next_ping:
            self._ping(now, out)
        for address, req in self.clock_sync.tick(now):
            self._send(out, address, req)
        for nonce, relay in list(self._relays.items()):
            if now >= relay.deadline:
                del self._relays[nonce]
                self._send(out, relay.requester, IndirectAck(relay.nonce, relay.target, False, 0))
        return out

    def next_deadline(self) -> float | None:
        """The earliest local time at which :meth:`tick` has work."""
        times = [self.clock_sync.next_deadline()]
        if self._round is not None:
            times.append(self._round.deadline)
            if self._round.resend_at is not None:
                times.append(self._round.resend_at)
        if self._waiting is not None:
            times.append(self._waiting.deadline)
        if self._idle and self._pending is not None:
            times.append(self._next_trigger)
        if self._idle:
            times.append(self._next_probe)
        if self._ping_target is not None:
            times.append(self._next_ping)
        times.extend(r.deadline for r in self._relays.values())
        return min((t for t in times if t is not None), default=None)

    # --- derived state ----------------------------------------------------------

    @property
    def _idle(self) -> bool:
        return self._round is None and self._waiting is None

    @property
    def _is_coordinator(self) -> bool:
        return self.view.coordinator == self.me.node_id

    @property
    def in_round(self) -> bool:
        """True while a round this node coordinates or takes part in is open."""
        return not self._idle

    def status(self, now: float) -> dict[str, object]:
        """The core's state for ``/api/status`` (docs/operations.md): the open round,
        if any, with its deadline relative to ``now``, and the round counters."""
        rnd = self._round
        open_ = rnd or self._waiting
        current: dict[str, object] | None = None
        if open_ is not None:
            current = {
                "role": "coordinator" if rnd is not None else "waiting",
                "proposal": open_.key[0],
                "coordinator": open_.key[1],
                "deadline_in": round(open_.deadline - now, 3),
                "extended": open_.extended,
            }
            if rnd is not None:
                current.update(asked=len(rnd.candidates), answered=len(rnd.replies))
        return {
            "round": current,
            "rounds_started": self.rounds_started,
            "rounds_unchanged": self.rounds_unchanged,
            "views_installed": self.views_installed,
            "deferring_probes_of": sorted(n for n, (_, t, _) in self._shy.items() if now < t),
            "lamport": self.lamport,
            "sent_by_type": dict(self.sent),
            "received_by_type": dict(self.received),
        }

    def known_addresses(self) -> list[str]:
        """Addresses this node would probe (seeds and nodes heard from recently)."""
        return sorted(self.seeds | set(self._known))

    # --- handlers ---------------------------------------------------------------

    def _on_probe(self, sender: Member, probe: Probe, now: float, out: list[Action]) -> None:
        if self.view.member(sender.node_id) == sender and probe.epoch == self.view.epoch:
            return
        shy = self._shy.get(sender.node_id)
        if (
            shy is not None
            and now < shy[1]
            and sender.incarnation <= shy[2]
            and self.view.member(sender.node_id) is None
        ):
            # It missed our last rounds (too slow to answer, e.g. starved of CPU): a
            # round for it now would only be another round without it.
            self.detector["probes_deferred"] += 1
            return
        self._trigger(now, (sender, *probe.members), out)

    def _on_new_group(self, sender: Member, msg: NewGroup, now: float, out: list[Action]) -> None:
        key = (msg.proposal, sender.node_id)
        if self._round is not None and self._round.key > key:
            self._ask(now, [sender], out)
            return
        if self._waiting is not None and self._waiting.key > key:
            return
        known = {m.node_id: m for m in self.view.members}
        if self._round is not None:
            known.update(self._round.candidates)  # hand over whom we were asking
        self._round = None
        self._waiting = _Waiting(key, now + self.config.commit_timeout)
        reply = Reply(msg.proposal, sender.node_id, self.view.epoch, _sorted(known.values()))
        self._send(out, sender.address, reply)

    def _on_reply(self, sender: Member, msg: Reply, now: float, out: list[Action]) -> None:
        rnd = self._round
        key = (msg.proposal, msg.coordinator)
        started = self._round_starts.get(key)
        if started is not None and msg.coordinator == self.me.node_id:
            self._reply_delay[sender.node_id] = now - started
        if rnd is None or key != rnd.key:
            if started is not None:
                self.detector["late_replies"] += 1
            return
        if msg.epoch != self.view.epoch or not set(self.view.members) <= set(msg.members):
            # (Members it names beyond ours are asked: they change the view by answering.)
            rnd.changed = True
        rnd.candidates[sender.node_id] = sender
        rnd.replies[sender.node_id] = (sender, msg.epoch)
        # the member we found dead is still in the others' views: do not wait for it
        self._ask(now, (m for m in msg.members if m != rnd.excluded), out)
        if set(rnd.replies) >= set(rnd.candidates):
            self._commit(now, out)

    def _on_commit(self, sender: Member, msg: Commit, now: float, out: list[Action]) -> None:
        if msg.epoch <= self.view.epoch:
            waiting = self._waiting
            if (
                waiting is not None
                and waiting.key[1] == sender.node_id
                and (msg.epoch, msg.members) == (self.view.epoch, self.view.members)
            ):
                self._waiting = None  # the round ended with our view: nothing to install
            return
        if self.me not in msg.members:
            self._trigger(now, msg.members, out)
            return
        self._round = None
        self._waiting = None
        self.lamport = max(self.lamport, msg.epoch)
        self._install(
            View(msg.epoch, _sorted(msg.members), sender.node_id, msg.attachment), now, out
        )
        self._next_trigger = now + self.config.trigger_backoff

    def _on_ack(self, sender: Member, msg: Ack, now: float, out: list[Action]) -> None:
        relay = self._relays.get(msg.nonce)
        if relay is not None and relay.target == sender.node_id:
            del self._relays[msg.nonce]
            self._send(
                out, relay.requester, IndirectAck(relay.nonce, relay.target, True, msg.epoch)
            )
            return
        target = self._ping_target
        if target is None or sender.node_id != target.node_id or msg.nonce != self._ping_nonce:
            return
        self._alive()
        if msg.epoch == self.view.epoch and msg.member and sender == target:
            self._ahead_seen = False
            return
        # A newer view that still has us: its commit may be on its way; look again at
        # the next answer before disturbing anyone.
        ahead = msg.epoch > self.view.epoch and msg.member and sender == target
        if self._idle and (not ahead or self._ahead_seen):
            # Let the neighbour coordinate the merge (a probe from a non-member or with
            # another epoch starts its round): it answered us, and it may reach members
            # we cannot (a bridge), where our own round would take it from its group.
            self._send(out, sender.address, Probe(self.view.epoch, self.view.members))
        self._ahead_seen = ahead

    # --- actions ----------------------------------------------------------------

    def _trigger(self, now: float, extra: Iterable[Member], out: list[Action]) -> None:
        extra = [m for m in extra if m.node_id != self.me.node_id]
        if self._round is not None:
            self._ask(now, extra, out)
        elif self._waiting is not None:
            return
        elif now < self._next_trigger:
            pending = self._pending if self._pending is not None else {}
            for m in extra:
                pending[m.node_id] = _newer(pending.get(m.node_id), m)
            self._pending = pending
        else:
            self._start_round(now, {m.node_id: m for m in extra}, out)

    def _start_round(
        self, now: float, extra: dict[str, Member], out: list[Action], exclude: str = ""
    ) -> None:
        candidates: dict[str, Member] = {}
        for m in (*self.view.members, *extra.values()):
            if m.node_id not in (self.me.node_id, exclude):
                candidates[m.node_id] = _newer(candidates.get(m.node_id), m)
        self.lamport = max(self.lamport + 1, self.view.epoch + 1)
        key = (self.lamport, self.me.node_id)
        self.rounds_started += 1
        timeout = self.config.round_timeout
        self._round = _CoordinatorRound(
            key, {}, {}, now + timeout, resend_at=now + timeout / 2, started=now
        )
        self._round_starts[key] = now
        while len(self._round_starts) > 8:
            del self._round_starts[next(iter(self._round_starts))]
        self._round.excluded = next((m for m in self.view.members if m.node_id == exclude), None)
        self._ask(now, candidates.values(), out)
        if not candidates:
            self._commit(now, out)

    def _ask(self, now: float, members: Iterable[Member], out: list[Action]) -> None:
        rnd = self._round
        if rnd is None:
            return
        for m in members:
            if m.node_id == self.me.node_id:
                continue
            known = rnd.candidates.get(m.node_id)
            if known is not None and known.address == m.address:
                continue
            rnd.candidates[m.node_id] = m
            self._send(out, m.address, NewGroup(rnd.key[0]))
            delay = self._reply_delay.get(m.node_id)
            if delay is not None and delay > self.config.round_timeout / 2:
                # It answered our last round late: give it that long and half again,
                # within the time members wait for the commit.
                patience = min(1.5 * delay, 0.75 * self.config.commit_timeout)
                rnd.deadline = max(rnd.deadline, rnd.started + patience)

    def _commit(self, now: float, out: list[Action]) -> None:
        rnd = self._round
        assert rnd is not None
        self._round = None
        members = _sorted([self.me, *(m for m, _ in rnd.replies.values())])
        self._count_missed(rnd, now)
        if not rnd.changed and members == self.view.members:
            # Every member answered with this very view and nobody else did in time
            # (a node outside too slow to answer): a commit would only raise the epoch.
            # Release the members' wait with the view they have.
            self.rounds_unchanged += 1
            commit = Commit(self.view.epoch, members, self.view.attachment)
            for m in members:
                if m.node_id != self.me.node_id:
                    self._send(out, m.address, commit)
            self._next_trigger = now + self.config.trigger_backoff * (1 + self.rng.random())
            return
        epoch = max([rnd.key[0], self.view.epoch + 1, *(e + 1 for _, e in rnd.replies.values())])
        self.lamport = max(self.lamport, epoch)
        attachment = b""
        if self.attachment_for is not None:
            attachment = self.attachment_for(self.view, members, epoch)
        commit = Commit(epoch, members, attachment)
        for m in members:
            if m.node_id != self.me.node_id:
                self._send(out, m.address, commit)
        self._install(View(epoch, members, self.me.node_id, attachment), now, out)
        self._next_trigger = now + self.config.trigger_backoff * (1 + self.rng.random())
        self._next_probe = now + self.config.probe_interval * self.rng.random()

    def _count_missed(self, rnd: _CoordinatorRound, now: float) -> None:
        """Candidates that did not answer in time back off: their probes start no
        round of ours for 1, 2, 4 ... 32 s (a starved node's probes otherwise made
        a round without it every second, each a new view: a livelock)."""
        for node_id, m in rnd.candidates.items():
            if node_id in rnd.replies:
                self._shy.pop(node_id, None)
            elif rnd.excluded is None or node_id != rnd.excluded.node_id:
                missed = self._shy.get(node_id, (0, 0.0, 0))[0] + 1
                until = now + min(32.0, 2.0 ** (missed - 1))
                self._shy[node_id] = (missed, until, m.incarnation)
        while len(self._shy) > 1024:
            del self._shy[next(iter(self._shy))]

    def _install(self, view: View, now: float, out: list[Action]) -> None:
        old, self.view = self.view, view
        self.views_installed += 1
        for m in view.members:
            if m.node_id != self.me.node_id:
                self._known[m.address] = now
        self.clock_sync.set_members(view.members, now)
        target = self._neighbour()
        if target != self._ping_target:
            self._ping_target = target
            self._ping_outstanding = False
            self._suspect_since = None
            self._indirect_asked = False
            self._next_ping = now + self.config.ping_interval
        out.append(ViewChanged(old, view))

    def _probe(self, now: float, out: list[Action]) -> None:
        ttl = self.config.known_ttl
        for address, seen in list(self._known.items()):
            if address not in self.seeds and now - seen > ttl:
                del self._known[address]
        inside = {m.address for m in self.view.members}
        probe = Probe(self.view.epoch, self.view.members)
        for address in sorted((self.seeds | set(self._known)) - inside):
            self._send(out, address, probe)

    def _send(self, out: list[Action], address: str, body: Body) -> None:
        self.lamport += 1
        self.sent[type(body).__name__] += 1
        out.append(Send(address, body))


def _newer(a: Member | None, b: Member) -> Member:
    """Of two records of the same node, the later boot."""
    return b if a is None or b.incarnation >= a.incarnation else a
