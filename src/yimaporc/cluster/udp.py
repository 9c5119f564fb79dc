"""The Twisted shell around the TRM core: datagrams in, actions out, one timer."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from . import wire
from .membership import Action, Membership, Send, View, ViewChanged


class MembershipProtocol(DatagramProtocol):
    """Runs a :class:`Membership` core on a UDP port.

    Malformed, unauthenticated and replayed datagrams, and datagrams of another
    cluster or node kind (``scope``), are dropped, counted in ``stats`` and
    logged (rate-limited), never raised.
    """

    log = Logger()

    def __init__(
        self,
        core: Membership,
        key: bytes,
        clock: IReactorTime,
        on_view: Callable[[View, View], None],
        *,
        scope: wire.Scope,
        start_when: Deferred[None] | None = None,
    ) -> None:
        """``start_when``: boot the core only once it fires (the node's new incarnation
        is on disk); datagrams before that are dropped as ``starting``."""
        self.core = core
        self.start_when = start_when
        #: True until ``start_when`` fired and the core booted.
        self.held = start_when is not None
        self.key = key
        self.scope = scope
        self.clock = clock
        self.on_view = on_view
        self.guard = wire.ReplayGuard()
        self.stats: Counter[str] = Counter()
        self._seq = 0
        self._timer: IDelayedCall | None = None
        self._deadline = 0.0
        self._last_warning = -1e9
        self._accused = self._stalls = 0
        #: Local time of the last timer tick, and how late it ran after its deadline.
        self.last_tick: float | None = None
        self.last_tick_late = 0.0
        #: The latest any tick ran (a starved process shows it here).
        self.max_tick_late = 0.0

    def startProtocol(self) -> None:
        """Boot the core as soon as the port is bound (and ``start_when`` fired)."""
        if self.start_when is None:
            self._perform(self.core.start(self.clock.seconds()))
            return
        # A failed start_when is reported by whoever made it (the node's when_ready).
        self.start_when.addCallbacks(lambda _: self._boot(), lambda _: None)

    def _boot(self) -> None:
        if not self.held or self.transport is None:
            return
        self.held = False
        self._perform(self.core.start(self.clock.seconds()))

    def stopProtocol(self) -> None:
        """Stop the timer."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        """Verify, de-duplicate and hand one datagram to the core."""
        self.stats["received"] += 1
        if self.held:
            # Expected for a moment at each start: counted, not logged.
            self.stats["dropped_starting"] += 1
            return
        try:
            dgram = wire.parse(self.key, self.scope, data)
        except wire.WrongScope:
            self._drop("wrong_scope", addr)
            return
        except wire.BadMac:
            self._drop("bad_mac", addr)
            return
        except wire.MalformedPacket:
            self._drop("malformed", addr)
            return
        if not self.guard.check(dgram.header):
            self._drop("replayed", addr)
            return
        self.stats["accepted"] += 1
        self._perform(self.core.receive(dgram.header, dgram.body, self.clock.seconds()))

    def _drop(self, why: str, addr: Any) -> None:
        self.stats["dropped_" + why] += 1
        now = self.clock.seconds()
        if now - self._last_warning >= 5.0:
            self._last_warning = now
            self.log.warn(
                "membership: dropped {why} datagram from {addr} ({count} so far)",
                why=why,
                addr=addr,
                count=self.stats["dropped_" + why],
            )

    def _tick(self) -> None:
        self._timer = None
        # never tick before the deadline because of float rounding
        now = max(self.clock.seconds(), self._deadline)
        self.last_tick = now
        self.last_tick_late = now - self._deadline
        self.max_tick_late = max(self.max_tick_late, self.last_tick_late)
        self._perform(self.core.tick(now))

    def status(self) -> dict[str, Any]:
        """Datagram counters, the core's round state and the timer's punctuality."""
        now = self.clock.seconds()
        last = self.last_tick
        return {
            **self.stats,
            **self.core.status(now),
            "held": self.held,
            "last_tick_ago": None if last is None else round(now - last, 3),
            "last_tick_late": round(self.last_tick_late, 3),
            "max_tick_late": round(self.max_tick_late, 3),
            "next_tick_in": (
                round(self._deadline - now, 3)
                if self._timer is not None and self._timer.active()
                else None
            ),
        }

    def perform(self, actions: list[Action]) -> None:
        """Carry out actions the core returned outside a datagram or tick (an RPC
        timeout fed to the detector)."""
        if not self.held:
            self._perform(actions)

    def _perform(self, actions: list[Action]) -> None:
        detector = self.core.detector
        if detector["accused"] != self._accused or detector["stalls"] != self._stalls:
            self._accused, self._stalls = detector["accused"], detector["stalls"]
            self.log.info(
                "membership: failure detector: {accused} accusation(s), {stalls} local stall(s),"
                " local health {health}",
                accused=self._accused,
                stalls=self._stalls,
                health=self.core.health,
            )
        for act in actions:
            if isinstance(act, Send):
                self._send(act)
            elif isinstance(act, ViewChanged):
                self.on_view(act.old, act.new)
        self._reschedule()

    def _send(self, act: Send) -> None:
        if self.transport is None:
            return
        self._seq += 1
        me = self.core.me
        header = wire.Header(me.node_id, me.address, me.incarnation, self._seq, self.core.lamport)
        data = wire.serialize(self.key, self.scope, header, act.body)
        host, _, port = act.address.rpartition(":")
        try:
            self.transport.write(data, (host, int(port)))
            self.stats["sent"] += 1
        except (OSError, ValueError) as e:
            self.stats["send_errors"] += 1
            self.log.debug("membership: cannot send to {a}: {e}", a=act.address, e=e)

    def _reschedule(self) -> None:
        deadline = self.core.next_deadline()
        timer = self._timer
        if timer is not None and timer.active():
            if deadline == self._deadline and self.transport is not None:
                # Already set for that instant: most datagrams move no deadline, and a
                # new DelayedCall per datagram is what the reactor would pay for it.
                return
            timer.cancel()
        self._timer = None
        if deadline is not None and self.transport is not None:
            self._deadline = deadline
            delay = max(0.0, deadline - self.clock.seconds())
            self._timer = self.clock.callLater(delay, self._tick)
