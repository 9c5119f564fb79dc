"""The relay of a non-fan-out session: the nodes' packets put in global order,
paced and forwarded to the client (UDP or interleaved), the overdue watch and,
when a node goes silent or leaves, its share taken over from parity here.

A mixin of :class:`~.rtspservice.YimaStreamingService`, typed against
:class:`~._rtsp_host.StreamingHost`.  A read's run of datagrams is pushed in one loop,
a release is rewritten into one buffer (:func:`.relay.rewrite_run`) and sent as one
batch, and every session's releases share one reactor timer (:mod:`._relay_clock`)."""

from __future__ import annotations

import struct
from functools import partial
from typing import TYPE_CHECKING

import attrs
from twisted.internet.error import CannotListenError

from ..cluster.membership import View
from ..rtsp import RtspStatusError
from ..rtsp._machine import send_interleaved_many
from ._rtsp_plan import (
    BYE_GRACE,
    OVERDUE,
    RETRY,
    SILENT,
    SUSPECT_FOR,
    WATCH_INTERVAL,
    WATCH_STALL,
    _big_buffers,
    _Plan,
    _Udp,
)
from .control import StreamAction
from .feedback import RETRANSMISSION_MARK
from .recvpath import listen_udp_batched
from .relay import Reorderer, rewrite, rewrite_run
from .streaming import StreamControl

if TYPE_CHECKING:
    from ._rtsp_host import StreamingHost

_SEQ_SSRC = struct.Struct(">2xH4xI")  # a node packet's sequence number and SSRC

#: Seconds of a relayed session's packets a node sends at once (``--relay-batch-ms``,
#: StreamStart's ``batch``): the relay holds each packet to its due instant anyway (the
#: nodes run RELAY_LEAD ahead of it), so longer runs cost the nodes fewer sends and the
#: relay fewer reads, and change nothing the player sees (docs/benchmarks.md, "The
#: relay's cost per stream").
RELAY_BATCH = 0.1
#: The largest ``--relay-batch-ms``: below SILENT, so a node sending a session's block is
#: heard by its relay more often than the early takeover's silence (a longer batch could
#: take a live node's share over after one lost packet); the relay holds a session's lead
#: plus one batch, and the nodes' runs must fit its socket buffer (_big_buffers).
MAX_RELAY_BATCH = 0.25


class RelayMixin:
    """The relay and share takeover of :class:`~.rtspservice.YimaStreamingService`."""

    def _open_relay(self: StreamingHost, session_id: str, plan: _Plan) -> None:
        proto = _Udp(
            lambda data, addr: self._relayed_read(session_id, data),
            lambda data, size, addr: self._relayed_run(session_id, data, size),
        )
        try:
            # a run of a node's datagrams arrives in one read where the kernel has UDP GRO
            listening = listen_udp_batched(
                self.reactor, proto, interface=self.node.config.cluster_host
            )
        except CannotListenError as exc:
            raise RtspStatusError(503, f"no relay port: {exc}") from None
        plan.relay = Reorderer(first=0, hold=0.3, due=partial(self._relay_due, plan),
                               hold_until=lambda g: plan.hold_gaps_until,
                               due_upto=partial(self._relay_due_upto, plan))  # fmt: skip
        plan.relay_port = listening
        _big_buffers(listening)
        # This node's own packets skip the socket (two syscalls and a copy each).
        plan.relay_addr = (self.node.config.cluster_host, listening.getHost().port)  # type: ignore[attr-defined]
        self.streaming.local[plan.relay_addr] = lambda data: self._relayed(session_id, data)
        self.streaming.local_batch[plan.relay_addr] = lambda view, size: self._relayed_many(
            session_id, view, size
        )

    @staticmethod
    def _destination(plan: _Plan) -> tuple[str, int]:
        """Where the nodes send a session's packets: its relay here, or the client."""
        return plan.relay_addr if plan.relay_port is not None else (plan.dest_host, plan.dest_port)

    def relay_stats(self: StreamingHost) -> dict[str, int]:
        """What the relays did (sessions torn down and live): forwarded, given up
        (``skipped``), asked again, shares taken over early, duplicates, late, stale;
        the shared release timer's wake-ups and releases."""
        total = attrs.asdict(self.relay_totals)
        for plan in self.plans.values():
            if plan.relay is not None:
                for k, v in attrs.asdict(plan.relay.stats).items():
                    total[k] += v
        return {"forwarded": total["forwarded"], "skipped": total["gaps_skipped"],
                "overdue_nacked": total["overdue_nacked"],
                "early_takeovers": total["early_takeovers"],
                "duplicates": total["duplicates"], "too_late": total["too_late"],
                "stale": total["stale"], "received": total["received"],
                "receive_reads": total["receive_reads"],
                "watch_stalls": total["watch_stalls"],
                "unplanned_takeovers": total["unplanned_takeovers"],
                # the shared release timer: its wake-ups, and the releases they made
                "clock_wakeups": self.relay_clock.wakeups,
                "releases": self.relay_clock.releases}  # fmt: skip

    @staticmethod
    def _relay_due(plan: _Plan, gseq: int) -> float:
        """Cluster instant at which the relay forwards packet ``gseq`` (inf while paused)."""
        timing = plan.timing
        if timing is None:
            return float("inf")
        if gseq < timing.total:  # timing.gseq_time(gseq), asked for at every release
            block, j = divmod(gseq, timing.packets_per_block)
            t = timing.packet_time(block, j)
        else:
            t = timing.gseq_time(gseq)
        if plan.playing:
            return plan.started_ct + (t - plan.position) / plan.speed
        # Paused (at paused_ct, at media position ``position``): what played before goes.
        return plan.paused_ct + (t - plan.position) if t < plan.position else float("inf")

    @staticmethod
    def _relay_due_upto(plan: _Plan, now: float) -> int:
        """The first gseq :meth:`_relay_due` does not give as due at ``now`` (every one
        before it is: packet times never decrease along gseq): found by bisection over
        the block times, then settled by :meth:`_relay_due` itself, so it agrees with
        asking packet by packet."""
        timing, due = plan.timing, RelayMixin._relay_due
        if timing is None:
            return 0
        if plan.playing:
            horizon = plan.position + (now - plan.started_ct) * plan.speed
        else:
            horizon = min(plan.position, plan.position + now - plan.paused_ct)
        total = timing.total
        if due(plan, total) <= now:
            return 1 << 62  # past the end: every packet (and any beyond) is due
        g = timing.first_gseq_at(horizon)
        while g < total and due(plan, g) <= now:
            g += 1
        while g > 0 and due(plan, g - 1) > now:
            g -= 1
        return g

    def _relayed_read(self: StreamingHost, session_id: str, data: bytes) -> None:
        """One datagram read from the relay socket."""
        plan = self.plans.get(session_id)
        if plan is not None and plan.relay is not None:
            plan.relay.stats.received += 1
            plan.relay.stats.receive_reads += 1
        self._relayed(session_id, data)

    def _relayed_run(self: StreamingHost, session_id: str, data: bytes, size: int) -> None:
        """A run of ``size``-byte datagrams read from the relay socket at once (GRO)."""
        plan = self.plans.get(session_id)
        if plan is not None and plan.relay is not None:
            plan.relay.stats.received += -(-len(data) // size)
            plan.relay.stats.receive_reads += 1
        with memoryview(data) as view:
            self._relayed_many(session_id, view, size)

    def _relayed(self: StreamingHost, session_id: str, data: bytes) -> None:
        plan = self.plans.get(session_id)
        if plan is None or plan.relay is None:
            return
        self._forward(session_id, plan, self._relay_one(plan, data, self.node.cluster_time()))

    def _relayed_many(self: StreamingHost, session_id: str, view: memoryview, size: int) -> None:
        """A run of ``size``-byte datagrams for a relayed session, handed over in one
        call (``size``-byte datagrams, the last may be shorter): each pushed in order as
        :meth:`_relay_one` does, then whatever they release is forwarded as one batch."""
        plan = self.plans.get(session_id)
        if plan is None or plan.relay is None:
            return
        now = self.node.cluster_time()
        released: list[bytes] = []
        n = len(view)
        if size < 24:  # too short to carry the extension: the general path
            for at in range(0, n, size):
                released.extend(self._relay_one(plan, bytes(view[at : at + size]), now))
            self._forward(session_id, plan, released)
            return
        relay, heard, node_ssrc, seq_base = plan.relay, plan.heard, plan.node_ssrc, plan.seq_base
        push, unpack, extend = relay.push, _SEQ_SSRC.unpack_from, released.extend
        settled = False  # after the run's first push, only its next packet releases more
        for at in range(0, n, size):
            data = bytes(view[at : at + size])
            if len(data) < 24:  # the run's last, short one: the general path
                extend(self._relay_one(plan, data, now))
                settled = False
                continue
            seq16, ssrc = unpack(data)
            if ssrc != node_ssrc:
                relay.stats.stale += 1  # sent for the position before a seek
                continue
            if data[12] == 0xBE and data[13] == 0xDE and data[16] == 0x14:
                heard[data[17]] = now  # the node index in the Yima extension
            base = relay.next  # unwrap against what the relay expects next
            gseq = base + ((((seq16 - seq_base) & 0xFFFF) - base + 0x8000) & 0xFFFF) - 0x8000
            if gseq < base and data[22:24] == RETRANSMISSION_MARK:
                self._forward_late(plan, data, gseq)  # a NACKed packet the relay gave up on
                continue
            extend(push(gseq, data, now, settled))
            settled = True
        self._forward(session_id, plan, released)

    def _relay_one(self: StreamingHost, plan: _Plan, data: bytes, now: float) -> list[bytes]:
        """One node packet into the session's relay; the packets it releases."""
        assert plan.relay is not None
        if len(data) < 12:
            return []
        if int.from_bytes(data[8:12], "big") != plan.node_ssrc:
            plan.relay.stats.stale += 1  # sent for the position before a seek
            return []
        if len(data) >= 24 and data[12:14] == b"\xbe\xde" and data[16] == 0x14:
            plan.heard[data[17]] = now  # the node index in the Yima extension
        seq16 = int.from_bytes(data[2:4], "big")
        gseq = (seq16 - plan.seq_base) & 0xFFFF
        # Unwrap against what the relay expects next.
        base = plan.relay.next
        gseq = base + ((gseq - base + 0x8000) & 0xFFFF) - 0x8000
        if gseq < base and data[22:24] == RETRANSMISSION_MARK:
            self._forward_late(plan, data, gseq)  # a NACKed packet the relay gave up on
            return []
        return plan.relay.push(gseq, data, now)

    def _to_client(self: StreamingHost, plan: _Plan, data: bytes) -> bytes:
        """A node's packet as this session's client gets it: its own sequence numbers
        and SSRC; the Yima extension only if it opted in."""
        seq = int.from_bytes(data[2:4], "big") - plan.seq_base + plan.seq_offset
        return rewrite(data, seq, plan.ssrc.to_bytes(4, "big"), plan.extension)

    def _forward_late(self: StreamingHost, plan: _Plan, data: bytes, gseq: int) -> None:
        """A retransmission behind the relay: to a UDP player if its gap was given up
        (its jitter buffer may still place it), once. Never one the player got already
        (a node woken from a stall answers old NACKs), nor over TCP interleaved, which
        the player reads in order (an old packet there is taken as the next one)."""
        assert plan.relay is not None
        if plan.tcp_channel is not None:
            plan.relay.stats.too_late += 1
            return
        if plan.relay.take_skipped(gseq):
            self._send(self._to_client(plan, data), (plan.dest_host, plan.dest_port))

    def _send_run(
        self: StreamingHost, buf: bytearray, lengths: list[int], addr: tuple[str, int]
    ) -> None:
        """Datagrams of ``lengths`` back to back in ``buf`` to ``addr``: one batch of the
        sender (one ``sendmsg`` with GSO) when they are of one size (the last may be
        shorter), else one by one."""
        size = lengths[0]
        if (
            self.sender is not None
            and len(lengths) > 1
            and lengths[-1] <= size
            and lengths.count(size) == len(lengths) - (lengths[-1] != size)
        ):
            self.sender.send_segments(buf, size, addr)
            return
        for data in _split(buf, lengths):
            self._send(data, addr)

    def _forward(self: StreamingHost, session_id: str, plan: _Plan, packets: list[bytes]) -> None:
        if packets:
            # rewritten together into one buffer (relay.rewrite_run), sent as one batch
            buf, lengths, octets = rewrite_run(
                packets, plan.seq_offset - plan.seq_base, plan.ssrc.to_bytes(4, "big"),
                plan.extension,
            )  # fmt: skip
            plan.packets += len(lengths)
            plan.octets += octets
            last = len(buf) - lengths[-1]
            plan.last_rtp_ts = int.from_bytes(buf[last + 4 : last + 8], "big")
            plan.last_sent_at = self.reactor.seconds()
            if plan.tcp_channel is not None:
                if plan.session is not None:  # one transport write for the batch
                    send_interleaved_many(plan.session, plan.tcp_channel, _split(buf, lengths))
            else:
                self._send_run(buf, lengths, (plan.dest_host, plan.dest_port))
        done = plan.relay is not None and plan.total and plan.relay.next >= plan.total
        if done and plan.bye_timer is None and not plan.bye_sent:
            plan.bye_timer = self.reactor.callLater(BYE_GRACE, self._bye, plan)
        if plan.relay is not None:
            deadline = plan.relay.next_deadline()
            active = plan.relay_timer is not None and plan.relay_timer.active()
            if active and deadline is not None and plan.relay_timer_at is not None:
                if plan.relay_timer_at <= deadline:
                    return  # the timer set runs first anyway
            if active:
                plan.relay_timer.cancel()  # type: ignore[union-attr]
            plan.relay_timer = plan.relay_timer_at = None
            if deadline is not None:  # one reactor timer for every relayed session
                plan.relay_timer_at = deadline
                plan.relay_timer = self.relay_clock.arm(session_id, deadline)

    def _relay_tick(self: StreamingHost, session_id: str) -> None:
        plan = self.plans.get(session_id)
        if plan is None or plan.relay is None:
            return
        plan.relay_timer = plan.relay_timer_at = None
        # Packets due within --relay-send-ahead-ms (10 ms) go together (one wake-up and
        # one send, not one per packet).
        ahead = self.relay_send_ahead
        self._forward(session_id, plan, plan.relay.tick(self.node.cluster_time() + ahead))

    def _watch(self: StreamingHost, session_id: str) -> None:
        """Look for overdue packets of a relayed session: ask their owner again at once;
        an owner still silent after that has its share served here, from parity, before
        the membership notices it is gone (and it is told to stop, should it wake up)."""
        plan = self.plans.get(session_id)
        if plan is None or plan.relay is None or plan.bye_sent:
            return
        plan.watch_timer = self.reactor.callLater(WATCH_INTERVAL, self._watch, session_id)
        ran, plan.watch_last = plan.watch_last, self.reactor.seconds()
        stalled = ran is not None and plan.watch_last - ran > WATCH_INTERVAL + WATCH_STALL
        self._look(session_id, plan, stalled)

    def _look_again(self: StreamingHost, session_id: str) -> None:
        """A stalled watch's second look, after one pass of the reactor's I/O has read
        what waited in the sockets (what is still missing then is missing)."""
        plan = self.plans.get(session_id)
        if plan is None or plan.relay is None or plan.bye_sent:
            return
        self._look(session_id, plan, False)

    def _look(self: StreamingHost, session_id: str, plan: _Plan, stalled: bool) -> None:
        """:meth:`_watch`'s look at ``plan``'s overdue packets."""
        now = self.node.cluster_time()
        if plan.relay is None or not plan.playing or plan.timing is None or now < plan.watch_from:
            return
        # Every packet the nodes should have sent more than OVERDUE ago.
        horizon = plan.position + plan.lead + (now - plan.started_ct - OVERDUE) * plan.speed
        upto = min(plan.timing.first_gseq_at(horizon), plan.total)
        missing = plan.relay.missing(upto)
        for g in [g for g in plan.nacked if g < plan.relay.next]:
            del plan.nacked[g]
        if not missing:
            return
        fresh = [g for g in missing if g not in plan.nacked]
        if fresh:
            for g in fresh:
                plan.nacked[g] = now
            plan.relay.stats.overdue_nacked += len(fresh)
            self._nack_owners(session_id, plan, fresh)
        if self.mode != "bipartite":
            return
        if stalled:
            # this node ran late: what it misses may be unread in its sockets (as the
            # membership's failure detector, it decides after reading them: a second
            # look once the reactor has read them, not at the next watch, which on a
            # loaded machine is as late and would leave every takeover to the
            # membership)
            plan.relay.stats.watch_stalls += 1
            self.reactor.callLater(0, self._look_again, session_id)
            return
        info = self.storage.media_info(plan.media)
        if not info.parity_group:
            return  # nothing to rebuild from: the membership decides (BYE)
        alive: dict[str, bool] = {}
        for g in missing:
            node_id = self._owner(plan, g)
            if node_id is None or node_id == self.node.node_id or node_id in plan.takeovers:
                continue
            if node_id not in plan.members:
                # Nobody was asked for this share: its node was not in this node's view
                # when the session started (a membership split that has not healed, a
                # node that joined since), so no NACK or silence will bring it: it is
                # served here at once (read from parity when that node is unreachable).
                self.log.warn("rtsp: {n} holds blocks of {s} but is not among its nodes "
                              "({k} packets overdue): serving its share here", n=node_id,
                              s=session_id, k=len(missing))  # fmt: skip
                plan.relay.stats.unplanned_takeovers += 1
                self._take_over(session_id, plan, node_id)
                continue
            if now - plan.nacked[g] < RETRY:
                continue
            if node_id not in alive:
                alive[node_id] = self._heard_lately(node_id, now)
            if alive[node_id]:
                continue  # late on this session, but alive: the lead still covers it
            self.log.warn("rtsp: {n} is silent on {s} ({k} packets overdue): serving its "
                          "share from parity", n=node_id, s=session_id, k=len(missing))  # fmt: skip
            self.suspects[node_id] = now + SUSPECT_FOR
            plan.relay.stats.early_takeovers += 1
            self._take_over(session_id, plan, node_id, early=True)

    def _heard_lately(self: StreamingHost, node_id: str, now: float) -> bool:
        """Whether any relay of this node heard ``node_id`` within :data:`SILENT`.

        A node sends a session's packets a block at a time, so on one session it is
        quiet for most of the time by design; across the sessions it serves, a live node
        is heard all the time.  Asked only when a share is overdue (not per packet).
        """
        for p in self.plans.values():
            if node_id in p.members:
                heard = p.heard.get(p.members.index(node_id))
                if heard is not None and now - heard < SILENT:
                    return True
        return False

    def _share_lost(self: StreamingHost, sid: str, plan: _Plan, node_id: str) -> None:
        """A node left and its blocks have no parity: say so (RTCP BYE with the reason,
        so players end the stream rather than play one with holes) and stop every node."""
        self.lost_sessions += 1
        self.log.warn("rtsp: {n} left and {m} has no parity: ending {s}",
                      n=node_id, m=plan.media, s=sid)  # fmt: skip
        self._bye(plan, f"node {node_id} left; {plan.media} has no parity".encode())
        self._control(sid, StreamAction.STOP, 0.0)

    def membership_changed(self: StreamingHost, old: View, new: View) -> None:
        """Serve the remaining share of every node that left a session this node planned.

        Bipartite mode only (a master reads a lost slave's blocks through parity
        anyway): this node schedules the departed node's blocks from the current
        media position, reading them with parity recovery, under the departed
        node's index.  Packets it would have sent between its death and the new
        view are lost (the player's retransmission cannot reach a dead node).
        """
        gone = {m.node_id for m in old.members} - {m.node_id for m in new.members}
        if not gone:
            return
        for node_id in gone:
            self.suspects.pop(node_id, None)  # gone for good: reads skip it anyway
        # Shares of sessions whose RTSP node left: nobody relays or plans them any more.
        for session, origin in list(self.streaming.origins.items()):
            if origin in gone:
                self.orphans_stopped += 1
                self.log.info("rtsp: {o} left; stopping its session {s} here", o=origin,
                              s=session)  # fmt: skip
                self.streaming.control(session, StreamAction.STOP, 0.0, 0.0)
        for sid, plan in list(self.plans.items()):
            if not plan.played or plan.bye_sent:
                continue
            for node_id in sorted(gone & set(plan.members)):
                if self.mode != "bipartite":
                    # The master reads a lost slave's blocks through parity; without
                    # parity the stream cannot go on whole: the same BYE as bipartite.
                    if not self.storage.media_info(plan.media).parity_group:
                        self._share_lost(sid, plan, node_id)
                        break
                    continue
                if node_id not in plan.takeovers:
                    try:
                        self._take_over(sid, plan, node_id)
                    except Exception:
                        self.log.failure("rtsp: taking over {n}'s share of {s} failed",
                                         n=node_id, s=sid)  # fmt: skip

    def handover(self: StreamingHost, media_ssrc: int, node_index: int, gseq: int) -> None:
        """A fan-out player hears nothing from the node holding global packet ``gseq``
        (node ``node_index``; 0xFFFFFFFF: it does not know) while it is overdue (YIMA
        HANDOVER): serve that node's share here, from parity, from that packet on,
        without waiting for the membership to notice."""
        for sid, plan in list(self.plans.items()):
            if plan.ssrc != media_ssrc or not plan.fanout or not plan.played:
                continue
            if plan.bye_sent or plan.timing is None or not 0 <= gseq < plan.timing.total:
                continue
            node_id = self._owner(plan, gseq)
            if node_id is None and 0 <= node_index < len(plan.members):
                node_id = plan.members[node_index]
            if node_id is None or node_id == self.node.node_id or node_id in plan.takeovers:
                continue
            if self.mode != "bipartite" or not self.storage.media_info(plan.media).parity_group:
                continue
            self.log.warn("rtsp: the player of {s} hears nothing from {n}: serving its share "
                          "from parity", s=sid, n=node_id)  # fmt: skip
            if node_id in plan.members:
                # silent; one not among the session's nodes (outside the view when it
                # started) was never asked for its share: nothing says it is silent
                self.suspects[node_id] = self.node.cluster_time() + SUSPECT_FOR
            self.early_handovers += 1
            self._take_over(sid, plan, node_id, early=True,
                            from_mt=plan.timing.gseq_time(gseq))  # fmt: skip

    def _take_over(
        self: StreamingHost, sid: str, plan: _Plan, node_id: str, early: bool = False,
        from_mt: float | None = None,
    ) -> None:  # fmt: skip
        info = self.storage.media_info(plan.media)
        if info.parity_group == 0:
            self._share_lost(sid, plan, node_id)
            return
        # The taken share gets a node index of its own (past the members' and earlier
        # takeovers'), so its per-node numbering starts afresh for the player.
        plan.takeover_index.setdefault(node_id, len(plan.members) + len(plan.takeover_index))
        plan.takeovers[node_id] = f"{sid}+{node_id}"
        if early:
            # Silent, not (yet) gone: should it wake up, it stops sending this share.
            for m in self.node.view.members:
                if m.node_id == node_id:
                    d = self.node.rpc.call(m.address, StreamControl, session=sid,
                                           action=StreamAction.STOP, at=0.0, value=0.0)  # fmt: skip
                    d.addErrback(lambda f: None)
        # The dead node's blocks, from the cached layout (computed off the reactor on a miss).
        d = self.storage.blocks_of_node(plan.media, node_id)
        d.addCallback(lambda blocks: self._serve_share(sid, plan, node_id, blocks, from_mt))
        d.addErrback(lambda f: self.log.failure("rtsp: taking over {n}'s share of {s} failed",
                                                f, n=node_id, s=sid))  # fmt: skip

    def _serve_share(
        self: StreamingHost, sid: str, plan: _Plan, node_id: str, blocks: list[int],
        from_mt: float | None = None,
    ) -> None:  # fmt: skip
        """Schedule ``node_id``'s blocks here, on the session's own schedule, from the
        first packet the relay (or the fan-out player) still lacks: what is overdue goes
        at once (rebuilt from parity), the rest when due."""
        if self.plans.get(sid) is not plan or plan.bye_sent:
            return  # torn down meanwhile
        now = self.node.cluster_time()
        if from_mt is not None:
            mt = from_mt
        elif plan.relay is not None and plan.timing is not None:
            mt = plan.timing.gseq_time(plan.relay.next)
        else:
            # A fan-out player buffers ahead: resend a little of what was lost.
            mt = max(0.0, self._media_position(plan, now) - (0.5 if plan.fanout else 0.0))
        own = self.streaming.scheduler.sessions.get(sid)
        if own is not None and not own.paused:
            start_ct, speed = own.deadline(mt), own.speed  # this node's live schedule
        else:
            start_ct, speed = plan.started_ct - plan.lead + (mt - plan.position), 1.0
        host, port = self._destination(plan)
        local = f"{sid}+{node_id}"
        plan.takeovers[node_id] = local
        self.streaming.start(session=local, media=plan.media, start_ct=start_ct, start_mt=mt,
                             host=host, port=port, ssrc=plan.node_ssrc, seq_base=plan.seq_base,
                             ts_base=plan.ts_base, node_index=plan.takeover_index[node_id],
                             all_blocks=False, blocks=blocks,
                             batch=self.relay_batch if plan.relay_port is not None else None)  # fmt: skip
        if speed != 1.0:
            self.streaming.control(local, StreamAction.SPEED, now, speed)
        if not plan.playing:
            self.streaming.control(local, StreamAction.PAUSE, 0.0, 0.0)
        self.log.info("rtsp: {me} serves {n}'s {k} blocks of {s} from {mt:.1f} s as node {i}",
                      n=node_id, me=self.node.node_id, k=len(blocks), s=sid, mt=mt,
                      i=plan.takeover_index[node_id])  # fmt: skip


def _split(buf: bytearray, lengths: list[int]) -> list[bytes]:
    """The datagrams of ``lengths`` back to back in ``buf``, each as bytes."""
    out, at = [], 0
    for n in lengths:
        out.append(bytes(buf[at : at + n]))
        at += n
    return out
