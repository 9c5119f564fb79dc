"""The failure detector of the membership core, fed datagrams and times by hand."""

from __future__ import annotations

import random
import socket

from yimaporc.cluster.membership import Membership, Send, TrmConfig, View
from yimaporc.cluster.node import grow_receive_buffer
from yimaporc.cluster.wire import (
    Ack,
    Commit,
    Header,
    IndirectAck,
    Member,
    NewGroup,
    Ping,
    PingReq,
    Probe,
    Reply,
)

A = Member("a", "10.0.0.1:7946", 1)
B = Member("b", "10.0.0.2:7946", 1)
C = Member("c", "10.0.0.3:7946", 1)


def hdr(m: Member, seq: int = 1) -> Header:
    return Header(m.node_id, m.address, m.incarnation, seq, 100)


def in_view(me: Member, epoch: int = 5) -> Membership:
    """``me`` in a committed view {a, b, c} at time 0."""
    core = Membership(me, rng=random.Random(1))
    core.start(0.0)
    coord = A if me != A else B
    core.receive(hdr(coord), Commit(epoch, (A, B, C)), 0.0)
    assert core.view == View(epoch, (A, B, C), coord.node_id)
    return core


def sends(actions: list[object], body_type: type) -> list[Send]:
    return [a for a in actions if isinstance(a, Send) and isinstance(a.body, body_type)]


def run(core: Membership, until: float, step: float = 0.05) -> list[object]:
    """Tick every ``step`` s (a punctual reactor) until ``until``."""
    out: list[object] = []
    t = core._last_input
    while t < until:
        t = round(t + step, 6)
        out += core.tick(t)
    return out


def test_relay_pings_target_and_forwards_the_answer() -> None:
    """A PingReq makes a member ping the target and forward its ack as IndirectAck ok."""
    c = in_view(C)
    out = c.receive(hdr(A), PingReq(7, "b", B.address), 1.0)
    (ping,) = sends(out, Ping)
    assert ping.address == B.address
    assert isinstance(ping.body, Ping)
    out = c.receive(hdr(B, 2), Ack(5, ping.body.nonce, True), 1.01)
    (fwd,) = sends(out, IndirectAck)
    assert (fwd.address, fwd.body) == (A.address, IndirectAck(7, "b", True, 5))


def test_relay_sends_a_nack_when_the_target_is_silent() -> None:
    """A relay whose ping goes unanswered says so after relay_timeout (a nack)."""
    c = in_view(C)
    c.receive(hdr(A), PingReq(7, "b", B.address), 1.0)
    out = c.tick(1.0 + c.config.relay_timeout)
    (nack,) = sends(out, IndirectAck)
    assert (nack.address, nack.body) == (A.address, IndirectAck(7, "b", False, 0))


def drive(a: Membership, until: float) -> list[object]:
    """Tick ``a`` every 50 ms; b never answers, c nacks every PingReq at once."""
    out: list[object] = []
    t = a._last_input
    seq = 100
    while t < until:
        t = round(t + 0.05, 6)
        acts = a.tick(t)
        out += acts
        for req in sends(acts, PingReq):
            seq += 1
            assert isinstance(req.body, PingReq) and req.address == C.address
            a.receive(hdr(C, seq), IndirectAck(req.body.nonce, "b", False, 0), t)
    return out


def test_silent_target_is_suspected_probed_indirectly_then_left_out() -> None:
    """No answer from b: a asks c to probe it, and starts a round without b only once b
    has been silent suspect_timeout after the first unanswered ping."""
    a = in_view(A)
    out = drive(a, 0.5)
    assert [s.address for s in sends(out, Ping)] == [B.address, C.address]  # target, monitor
    out = drive(a, 1.0)
    assert a.detector["suspected"] == 1 and len(sends(out, PingReq)) == 1
    drive(a, 2.95)
    assert a.detector["accused"] == 0 and not a.in_round
    drive(a, 3.0)  # first unanswered ping at 0.5, + 2.5 s
    assert a.detector["accused"] == 1 and a.in_round
    assert a.health == 0 and a.detector["indirect_nack"] == 4  # c answered: our links work


def test_any_datagram_from_the_target_refutes() -> None:
    """A heartbeat ping from the suspect clears the suspicion: no accusation at 3.0 s."""
    a = in_view(A)
    drive(a, 2.0)
    assert a.detector["suspected"] == 1
    a.receive(hdr(B, 9), Ping(5, 0), 2.2)
    drive(a, 3.5)
    assert a.detector["accused"] == 0 and not a.in_round
    drive(a, 5.5)  # silent again from the 2.5 s ping on: accused at 5.0
    assert a.detector["accused"] == 1


def test_own_stall_is_not_the_targets_silence() -> None:
    """a's timer runs 2 s late (a was stopped): it neither accuses b on waking, nor
    later once b's answers (queued in its buffer) are read."""
    a = in_view(A)
    out = run(a, 0.5)
    (ping,) = [s for s in sends(out, Ping) if s.address == B.address]
    out = a.tick(3.0)  # due at 1.0, ran at 3.0
    assert a.detector["stalls"] == 1 and a.health == 1
    assert a.detector["accused"] == 0 and not a.in_round
    a.receive(hdr(B, 2), Ack(5, ping.body.nonce, True), 3.0)  # type: ignore[union-attr]
    run(a, 3.5)
    assert a.detector["accused"] == 0 and not a.in_round


def test_missing_nacks_raise_local_health_and_stretch_the_timeout() -> None:
    """When no relay answers at all, a's own receive path is suspect: health rises and
    the silence needed to accuse grows with it (Lifeguard)."""
    a = in_view(A)
    run(a, 3.0)
    assert a.health >= 2 and a.detector["accused"] == 0


def test_receive_buffer_grows_best_effort() -> None:
    """The cluster UDP socket asks for a 4 MiB receive buffer and reports what it got."""

    class Port:
        socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    try:
        got = grow_receive_buffer(Port(), 4 * 1024 * 1024)
        assert got >= 212992  # at least the usual default; more where the kernel allows
    finally:
        Port.socket.close()
    assert grow_receive_buffer(object(), 1024) == 0


def test_accusation_round_commits_without_waiting_for_the_dead() -> None:
    """The round that leaves b out does not ask b again when c still lists it: it commits
    as soon as c answers, so detection costs no round timeout."""
    a = in_view(A)
    out = drive(a, 3.0)
    (ng,) = [s for s in sends(out, NewGroup) if s.address == C.address]
    assert not [s for s in sends(out, NewGroup) if s.address == B.address]
    assert isinstance(ng.body, NewGroup)
    out = a.receive(hdr(C, 500), Reply(ng.body.proposal, "a", 5, (A, B, C)), 3.001)
    assert not sends(out, NewGroup)
    assert a.view.node_ids == ("a", "c") and a.view.epoch > 5


def test_silent_candidate_gets_newgroup_twice() -> None:
    """A round resends NewGroup once, at half the round timeout, to candidates that have
    not answered: one lost datagram does not cost a member its place."""
    a = in_view(A)
    out = a.receive(hdr(C, 600), Probe(9, (C,)), 1.0)  # another epoch: a starts a round
    assert sorted(s.address for s in sends(out, NewGroup)) == [B.address, C.address]
    assert not sends(a.tick(1.0 + a.config.round_timeout / 4), NewGroup)
    out = a.tick(1.0 + a.config.round_timeout / 2)
    assert sorted(s.address for s in sends(out, NewGroup)) == [B.address, C.address]
    assert not sends(a.tick(1.0 + a.config.round_timeout * 0.75), NewGroup)


def test_relays_rotate_and_the_one_that_reached_the_target_comes_first() -> None:
    """With members a..d and one relay per round, a's PingReqs about b go round c and d;
    once d has reached b, d is asked every time (in a bridge, the bridge)."""
    d = Member("d", "10.0.0.4:7946", 1)
    a = Membership(A, rng=random.Random(3), config=TrmConfig(indirect_probes=1))
    a.start(0.0)
    a.receive(hdr(B), Commit(5, (A, B, C, d)), 0.0)
    asked: list[str] = []
    t, seq = 0.0, 100
    while t < 8.0:
        t = round(t + 0.05, 6)
        for req in sends(a.tick(t), PingReq):
            asked.append(req.address)
            seq += 1
            assert isinstance(req.body, PingReq)
            ok = req.address == d.address and len(asked) >= 3  # d reaches b from then on
            sender = C if req.address == C.address else d
            a.receive(hdr(sender, seq), IndirectAck(req.body.nonce, "b", ok, 5), t)
    assert set(asked[:2]) == {C.address, d.address}  # round the others
    first_ok = asked.index(d.address, 2)
    assert len(asked) > first_ok + 3 and set(asked[first_ok:]) == {d.address}
    assert a.detector["accused"] == 0


def ping_answer(a: Membership, t: float, epoch: int, member: bool, seq: int) -> list[Send]:
    """Tick ``a`` to its next ping of b at ``t`` and answer it as b would; the probes sent."""
    out = a.tick(t)
    (ping,) = [s for s in sends(out, Ping) if s.address == B.address]
    assert isinstance(ping.body, Ping)
    return sends(a.receive(hdr(B, seq), Ack(epoch, ping.body.nonce, member), t), Probe)


def test_answer_from_another_view_makes_the_neighbour_coordinate() -> None:
    """b answers from a view without a: a probes b (b then runs the merge round) instead of
    starting its own round; a newer view that has a gets one more ping's grace first."""
    a = in_view(A)
    (probe,) = ping_answer(a, 0.5, 9, False, 2)
    assert probe.address == B.address and probe.body == Probe(5, (A, B, C))
    assert not a.in_round
    a = in_view(A)
    assert ping_answer(a, 0.5, 9, True, 2) == []  # its commit to us may be on its way
    assert len(ping_answer(a, 1.0, 9, True, 3)) == 1
    assert ping_answer(a, 1.5, 5, True, 4) == []  # caught up (here: b went back to ours)


def test_rpc_timeout_to_the_target_starts_the_suspicion_at_once() -> None:
    """An RPC to b (a's ping target) times out at 0.2 s, before any ping went
    unanswered: a suspects b now, asks c to probe it, and accuses b at 0.2 + 2.5 s
    instead of 3.0 s."""
    a = in_view(A)
    drive(a, 0.2)
    out = a.rpc_timeout(B.address, 0.2)
    assert a.detector["rpc_timeouts"] == 1 and a.detector["suspected_by_rpc"] == 1
    assert [s.address for s in sends(out, Ping)][:1] == [B.address]
    (req,) = sends(out, PingReq)
    assert req.address == C.address and isinstance(req.body, PingReq)
    a.receive(hdr(C, 50), IndirectAck(req.body.nonce, "b", False, 0), 0.21)  # c: "silent"
    drive(a, 2.65)
    assert a.detector["accused"] == 0
    drive(a, 2.75)
    assert a.detector["accused"] == 1 and a.in_round


def test_rpc_timeout_of_a_live_target_is_refuted_by_its_answer() -> None:
    """b timed out on an RPC but answers the ping that follows: no accusation."""
    a = in_view(A)
    out = a.rpc_timeout(B.address, 0.2)
    (ping,) = [s for s in sends(out, Ping) if s.address == B.address]
    assert isinstance(ping.body, Ping)
    a.receive(hdr(B, 3), Ack(5, ping.body.nonce, True), 0.25)
    for k in range(1, 12):  # b answers every ping from now on
        t = 0.25 + k * 0.5
        for s in sends(a.tick(t), Ping):
            if s.address == B.address and isinstance(s.body, Ping):
                a.receive(hdr(B, 3 + k), Ack(5, s.body.nonce, True), t + 0.01)
    assert a.detector["accused"] == 0 and not a.in_round


def test_rpc_timeout_to_a_member_not_monitored_here_is_only_counted() -> None:
    """c is monitored by its own neighbour, not by a: the timeout is counted, nothing
    is sent and no suspicion starts; an unknown address changes nothing."""
    a = in_view(A)
    assert a.rpc_timeout(C.address, 0.2) == []
    assert a.rpc_timeout("10.9.9.9:1", 0.2) == []
    assert a.detector["rpc_timeouts"] == 1 and a.detector["suspected"] == 0


D = Member("d", "10.0.0.4:7946", 1)


def starved(core: Membership, start: float, until: float, every: float = 1.0) -> None:
    """Tick ``core`` only every ``every`` s (its process frozen in between): each tick
    runs well past ``late_tolerance`` late, so each one is a stall."""
    t = start
    while t < until:
        t = round(t + every, 6)
        core.tick(t)


def test_a_starved_member_stops_waiting_for_a_commit_that_never_comes() -> None:
    """c answered a's NewGroup, then a committed without it (c answered too late) and
    c's every timer runs late: c waits once the grace of a stall, not for ever, and the
    next Probe from outside its view starts its own round.  Before, every stall pushed
    the wait past the next wake-up: c ignored every Probe and probed nobody (a node
    starved of CPU, as yb3 was in the 0.05 core scaling bench)."""
    c = in_view(C)
    c.receive(hdr(A, 2), NewGroup(50), 1.0)
    assert c.in_round
    starved(c, 1.0, 4.0)
    assert c.detector["stalls"] >= 2
    assert not c.in_round
    out = c.receive(hdr(D), Probe(60, (A, B, D)), 4.0)
    assert D.address in {s.address for s in sends(out, NewGroup)}


def test_a_starved_coordinator_commits_its_round() -> None:
    """A round whose coordinator stalls at every tick commits after one grace."""
    a = in_view(A)
    out = a.receive(hdr(D), Probe(9, (D,)), 1.0)  # a non-member: a starts a round
    assert sends(out, NewGroup) and a.in_round
    starved(a, 1.0, 4.0)
    assert not a.in_round and a.view.epoch > 5


def _round_for_outsider(a: Membership, now: float) -> list[object]:
    """D, outside {a, b, c}, probes a: a starts a round asking b, c and d."""
    out = a.receive(hdr(D, now_seq(now)), Probe(9, (D,)), now)
    assert {s.address for s in sends(out, NewGroup)} == {B.address, C.address, D.address}
    return out


def now_seq(now: float) -> int:
    return int(now * 1000) + 1


def _answer(a: Membership, m: Member, now: float) -> list[object]:
    assert a._round is not None
    proposal = a._round.key[0]
    return a.receive(hdr(m, now_seq(now)), Reply(proposal, "a", a.view.epoch, a.view.members), now)


def test_a_round_that_ends_with_the_current_view_commits_nothing() -> None:
    """Every member answers with the current view, the outsider that probed does not in
    time: no new epoch; the members' wait is released with the view they have."""
    a = in_view(A)
    _round_for_outsider(a, 1.0)
    _answer(a, B, 1.01)
    _answer(a, C, 1.01)
    out = run(a, 2.0)
    assert a.view.epoch == 5 and a.rounds_unchanged == 1 and not a.in_round
    assert {s.address for s in sends(out, Commit)} == {B.address, C.address}
    assert all(s.body == Commit(5, (A, B, C)) for s in sends(out, Commit))
    b = in_view(B)
    b.receive(hdr(A, 3), NewGroup(50), 1.0)
    assert b.in_round
    b.receive(hdr(A, 4), Commit(5, (A, B, C)), 1.5)  # the release
    assert not b.in_round and b.view.epoch == 5


def test_a_round_where_a_member_is_behind_still_commits() -> None:
    """A member that answers with another epoch needs the commit even when nobody new joined."""
    a = in_view(A)
    _round_for_outsider(a, 1.0)
    _answer(a, B, 1.01)
    assert a._round is not None
    a.receive(hdr(C, 2000), Reply(a._round.key[0], "a", 4, (A, B, C)), 1.01)
    run(a, 2.0)
    assert a.view.epoch > 5 and a.rounds_unchanged == 0


def test_an_outsider_that_missed_a_round_is_not_given_another_at_once() -> None:
    """Its probes start no round for 1 s, then 2 s, ... (a node too starved to answer a
    round made one per probe, each a new view without it: a livelock)."""
    a = in_view(A)
    _round_for_outsider(a, 1.0)
    _answer(a, B, 1.01)
    _answer(a, C, 1.01)
    run(a, 1.5)
    assert not a.in_round
    out = a.receive(hdr(D, 3000), Probe(9, (D,)), 1.6)
    assert not sends(out, NewGroup) and a.detector["probes_deferred"] == 1
    run(a, 2.6)
    _round_for_outsider(a, 2.6)  # after the second: another try
    _answer(a, B, 2.61)
    _answer(a, C, 2.61)
    run(a, 3.5)
    out = a.receive(hdr(D, 4000), Probe(9, (D,)), 4.0)  # missed twice: 2 s now
    assert not sends(out, NewGroup)


def test_an_outsider_that_answered_late_gets_longer_next_round() -> None:
    """D's reply came 0.6 s into a 0.4 s round: the next round waits 1.5 times that for it
    (within the members' commit wait), and D gets in."""
    a = in_view(A)
    _round_for_outsider(a, 1.0)
    assert a._round is not None
    proposal = a._round.key[0]
    _answer(a, B, 1.01)
    _answer(a, C, 1.01)
    run(a, 1.6)
    a.receive(hdr(D, 5000), Reply(proposal, "a", 9, (D,)), 1.6)  # too late
    assert a.detector["late_replies"] == 1 and a.view.epoch == 5
    run(a, 2.6)
    _round_for_outsider(a, 2.6)
    _answer(a, B, 2.61)
    _answer(a, C, 2.61)
    run(a, 3.1)
    assert a.in_round, "still waiting for D past the 0.4 s round"
    assert a._round is not None
    a.receive(hdr(D, 6000), Reply(a._round.key[0], "a", 9, (D,)), 3.2)
    assert a.view.node_ids == ("a", "b", "c", "d")


def test_status_shows_the_open_round_and_its_deadline() -> None:
    """Core status: the round this node coordinates or waits in, its deadline from now,
    and the round counters (docs/operations.md)."""
    a = in_view(A)
    idle = a.status(0.5)
    assert idle["round"] is None and idle["views_installed"] == 2  # boot, then the commit
    _round_for_outsider(a, 1.0)
    _answer(a, B, 1.01)
    _answer(a, C, 1.01)
    st = a.status(1.1)
    assert st["round"] == {
        "role": "coordinator",
        "proposal": a._round.key[0] if a._round else None,
        "coordinator": "a",
        "deadline_in": 0.3,
        "asked": 3,
        "answered": 2,
        "extended": False,
    }
    assert st["rounds_started"] == 1 and st["received_by_type"] == {
        "Commit": 1,
        "Probe": 1,
        "Reply": 2,
    }
    run(a, 2.0)
    st = a.status(2.0)
    assert st["round"] is None and st["rounds_unchanged"] == 1
    assert st["deferring_probes_of"] == ["d"]
    b = in_view(B)
    b.receive(hdr(A, 3), NewGroup(50), 1.0)
    assert b.status(1.5)["round"] == {
        "role": "waiting",
        "proposal": 50,
        "coordinator": "a",
        "deadline_in": 1.0,
        "extended": False,
    }


def test_a_restarted_outsider_is_not_shy() -> None:
    """The node that missed a round restarted (a new incarnation): its probes start a
    round at once, as a new node's do."""
    a = in_view(A)
    _round_for_outsider(a, 1.0)
    _answer(a, B, 1.01)
    _answer(a, C, 1.01)
    run(a, 1.5)
    reborn = Member("d", D.address, 2)
    out = a.receive(hdr(reborn, 3000), Probe(1, (reborn,)), 2.0)  # D shy until 2.4
    assert D.address in {s.address for s in sends(out, NewGroup)}
