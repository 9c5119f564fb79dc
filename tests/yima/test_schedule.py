"""The per-node delivery scheduler: deadlines, VBR pacing, flow control, retransmission."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from yimaporc.yima.schedule import PAYLOAD, MediaTiming, NodeScheduler

BLOCK = 4 * PAYLOAD


def media(blocks: int = 10, vbr: bool = False, tail: int = 0) -> MediaTiming:
    # Block i lasts 1 s, or (VBR) 0.5 s for even blocks and 1.5 s for odd ones.
    starts, t = [], 0.0
    for i in range(blocks):
        starts.append(t)
        t += (0.5 if i % 2 == 0 else 1.5) if vbr else 1.0
    return MediaTiming("m", blocks * BLOCK - tail, BLOCK, tuple(starts), t)


def drain(s: NodeScheduler, until: float, step: float = 0.01) -> list:  # type: ignore[type-arg]
    out, now = [], 0.0
    while now <= until:
        out.extend(s.tick(now))
        now += step
    return out


def test_nodes_partition_packets_and_global_seqs_interleave() -> None:
    """Three nodes with disjoint blocks together send every global sequence number once."""
    m = media(9)
    seqs = []
    for node in range(3):
        s = NodeScheduler()
        s.add("s", m, [b for b in range(9) if b % 3 == node], start_ct=100.0)
        pkts = []
        now = 100.0
        while not s.finished("s"):
            pkts.extend(s.tick(now))
            now += 0.05
        assert [p.node_seq for p in pkts] == list(range(len(pkts))), "per-node seq is dense"
        seqs.extend(p.gseq for p in pkts)
    assert sorted(seqs) == list(range(9 * 4))


@given(st.floats(0.1, 3.0), st.booleans())
def test_packets_never_leave_before_deadline_and_follow_media_time(speed: float, vbr: bool) -> None:
    """Each packet leaves at or after its deadline, and deadlines follow (VBR) media time."""
    m = media(6, vbr=vbr)
    s = NodeScheduler()
    s.add("s", m, range(6), start_ct=0.0)
    s.set_speed("s", speed, at_ct=0.0)
    now = 0.0
    while not s.finished("s"):
        for p in s.tick(now):
            assert p.deadline <= now + 1e-9
            assert abs(p.deadline - p.media_time / speed) < 1e-6
        now += 0.013
    assert now >= m.packet_time(5, 3) / speed


def test_pause_resume_shifts_schedule() -> None:
    """After a pause, sending continues from the next packet, due at the resume instant."""
    s = NodeScheduler()
    s.add("s", media(4), range(4), start_ct=0.0)
    first = s.tick(1.0)
    s.pause("s")
    assert s.tick(5.0) == [] and s.next_deadline() is None
    s.resume("s", at_ct=10.0)
    nxt = s.tick(10.0)
    assert nxt and nxt[0].gseq == first[-1].gseq + 1 and nxt[0].deadline == 10.0


def test_pause_at_common_instant_keeps_nodes_aligned() -> None:
    """Two nodes paused and resumed at the same cluster instants restart at one media position."""
    nodes = [NodeScheduler(), NodeScheduler()]
    for i, n in enumerate(nodes):
        n.add("s", media(8), [b for b in range(8) if b % 2 == i], start_ct=0.0)
        n.tick(2.6)
        n.pause("s", at_ct=3.1)
    sent = [p for n in nodes for p in n.tick(9.0)]
    assert all(p.media_time < 3.1 for p in sent), "packets before the pause instant still go"
    for n in nodes:
        n.resume("s", at_ct=20.0)
    after = sorted((p for n in nodes for p in n.tick(20.5)), key=lambda p: p.gseq)
    assert after and all(abs(p.deadline - (20.0 + p.media_time - 3.1)) < 1e-9 for p in after)


def test_pause_at_a_named_position_resumes_a_drifted_node_in_step() -> None:
    """A node whose schedule runs slow (speed 0.9 where the others run 1.0) paused at the
    common position stops there, sends what is due before it, and resumes exactly on the
    common schedule; paused at its own position it would resume ~0.3 s behind."""
    slow, common = NodeScheduler(), NodeScheduler()
    for n, speed in ((slow, 0.9), (common, 1.0)):
        n.add("s", media(8), range(8), start_ct=0.0)
        n.set_speed("s", speed, 0.0)
        n.tick(2.9)
    slow.pause("s", at_ct=3.0, at_mt=3.0)
    common.pause("s", at_ct=3.0)
    assert slow.sessions["s"].pause_mt == common.sessions["s"].pause_mt == 3.0
    caught_up = slow.tick(9.0)
    assert caught_up and max(p.media_time for p in caught_up) < 3.0
    for n in (slow, common):
        n.set_speed("s", 1.0, 9.0)
        n.resume("s", at_ct=20.0)
    a, b = slow.tick(20.5), common.tick(20.5)
    assert [(p.gseq, p.deadline) for p in a] == [(p.gseq, p.deadline) for p in b] != []
    drifted = NodeScheduler()
    drifted.add("s", media(8), range(8), start_ct=0.0)
    drifted.set_speed("s", 0.9, 0.0)
    drifted.pause("s", at_ct=3.0)
    assert abs(drifted.sessions["s"].pause_mt - 2.7) < 1e-9


def test_range_start_skips_earlier_packets() -> None:
    """PLAY from npt=2 starts at the packet of media time 2 s."""
    s = NodeScheduler()
    s.add("s", media(4), range(4), start_ct=0.0, start_mt=2.0)
    assert s.tick(0.0)[0].gseq == 8


def test_retransmit_once_and_bounded_buffer() -> None:
    """A NACKed packet is resent once; packets out of the window are not resent."""
    s = NodeScheduler(retransmit_window=5)
    s.add("s", media(4), range(4), start_ct=0.0)
    sent = s.tick(10.0)
    assert len(sent) == 16
    again = s.retransmit("s", [15, 15, 14, 2])
    assert [p.node_seq for p in again] == [15, 14] and all(p.retransmission for p in again)
    assert s.retransmit("s", [15]) == []


def test_last_short_block_and_prefetch() -> None:
    """A short last block yields a short final packet; prefetch asks for blocks due soon."""
    m = media(3, tail=PAYLOAD + 100)
    s = NodeScheduler(prefetch=1.5)
    s.add("s", m, range(3), start_ct=0.0)
    assert s.wanted_blocks(0.0) == [("m", 0), ("m", 1)]
    pkts = s.tick(100.0, ready={("m", 0), ("m", 1), ("m", 2)})
    assert pkts[-1].length == PAYLOAD - 100
    assert sum(p.length for p in pkts) == m.size


def test_unready_block_waits_and_counts_late() -> None:
    """A due packet whose block is not read yet is held back and counted late."""
    s = NodeScheduler()
    sess = s.add("s", media(2), range(2), start_ct=0.0)
    assert s.tick(0.5, ready=set()) == []
    assert sess.late == 1
    assert [p.media_time for p in s.tick(0.5, ready={("m", 0)})] == [0.0, 0.25, 0.5]


def _walk(s: NodeScheduler, now: float, ready: set[tuple[str, int]] | None) -> list[tuple]:  # type: ignore[type-arg]
    """Reference: the packet-by-packet walk (one due packet at a time, per session)."""
    out = []
    for sid, sess in s.sessions.items():
        while (nxt := sess.peek()) is not None:
            block, j, mt = nxt
            if sess.paused and mt >= sess.pause_mt:
                break
            if sess.deadline(mt) > now:
                break
            if ready is not None and (sess.media.name, block) not in ready:
                break
            out.append((sid, block * sess.media.packets_per_block + j, sess.node_seq, block, j))
            sess.node_seq += 1
            sess.cursor_packet += 1
    return out


@given(
    st.lists(
        st.tuples(
            st.floats(0.0, 1.5),
            st.sampled_from(["tick", "pause", "resume", "speed", "unready"]),
            st.floats(0.25, 4.0),
        ),
        max_size=40,
    ),
    st.booleans(),
    st.integers(0, 5 * PAYLOAD - 1),
)
def test_runs_match_a_packet_by_packet_walk(
    steps: list[tuple[float, str, float]], vbr: bool, tail: int
) -> None:
    """Runs computed by arithmetic name exactly the packets a per-packet walk would
    send, under pauses, resumes, speed changes and unread blocks."""
    m = media(6, vbr=vbr, tail=tail % BLOCK)
    a, b = NodeScheduler(), NodeScheduler()
    for sch in (a, b):
        sch.add("x", m, [0, 2, 3, 5], start_ct=0.3, start_mt=0.2)
        sch.add("y", m, [1, 4], start_ct=0.0)
    now = 0.0
    for dt, action, value in steps:
        now += dt
        ready = None
        for sch in (a, b):
            if action == "pause":
                sch.pause("x", now)
            elif action == "resume":
                sch.resume("x", now + 0.1)
            elif action == "speed":
                sch.set_speed("y", value, now)
            elif action == "unready":
                ready = {("m", 0), ("m", 1), ("m", 3)}
        got = [(p.session, p.gseq, p.node_seq, p.block, p.offset // PAYLOAD)
               for p in a.tick(now, ready)]  # fmt: skip
        want = _walk(b, now, ready)
        assert sorted(got) == sorted(want)
        assert a.next_due == a.next_deadline(), "the pass found the next deadline"
        for sid in ("x", "y"):
            sa, sb = a.sessions[sid], b.sessions[sid]
            assert (sa.node_seq, sa.peek()) == (sb.node_seq, sb.peek())
    for n in range(a.sessions["x"].node_seq):
        pkt = a.sessions["x"].sent_packet(n, a.retransmit_window)
        assert pkt is not None and pkt.node_seq == n
        assert pkt.length == min(PAYLOAD, m.block_length(pkt.block) - pkt.offset)


def test_nack_by_global_seq_finds_this_nodes_numbers_within_the_window() -> None:
    """A relayed NACK names global seqs: each maps to the node's own number while it is
    in the retransmission window; others' packets and forgotten ones map to nothing."""
    s = NodeScheduler(retransmit_window=10)
    sess = s.add("s", media(6), [1, 3, 4], start_ct=0.0)
    sent = s.tick(100.0)
    assert len(sent) == 12
    by_gseq = {p.gseq: p.node_seq for p in sent}
    last = sent[-10:]
    assert sess.node_seqs_of([p.gseq for p in last], 10) == [p.node_seq for p in last]
    assert sess.node_seqs_of([sent[0].gseq, sent[1].gseq], 10) == [], "out of the window"
    assert sess.node_seqs_of([0, 1, 8], 10) == [], "block 0 and 2 are another node's"
    again = s.retransmit("s", [by_gseq[p.gseq] for p in last[:2]])
    assert [p.gseq for p in again] == [p.gseq for p in last[:2]]
    assert all(p.retransmission for p in again)


def test_a_tick_visits_only_the_sessions_that_are_due() -> None:
    """With many sessions, a tick looks at the due ones only (a node of an N-node fan-out
    holds every session but sends for ~1/N of them at a time), not at every session."""
    m = media(8)
    s = NodeScheduler()
    for i in range(200):  # each starts 1 s after the previous: one is due at a time
        s.add(f"s{i}", m, [0, 4], start_ct=float(i))
    visited: list[str] = []
    walk = s._due_runs

    def counting(sid, *args):  # type: ignore[no-untyped-def]
        visited.append(sid)
        return walk(sid, *args)

    s._due_runs = counting  # type: ignore[method-assign]
    s.tick_runs(-1.0)  # the first tick finds every session's next deadline
    assert len(visited) == 200 and s.next_due == 0.0
    visited.clear()
    runs = s.tick_runs(10.5)
    assert {r[0] for r in runs} == {f"s{i}" for i in range(11)}
    assert sorted(set(visited)) == sorted(f"s{i}" for i in range(11))
    visited.clear()
    s.tick_runs(10.6)
    assert set(visited) <= {"s10", "s6", "s7", "s8", "s9"}  # only what falls due by 10.6
    assert s.next_due is not None and s.next_due > 10.6


@given(
    st.lists(
        st.tuples(
            st.floats(0.0, 1.0),
            st.sampled_from(["tick", "pause", "resume", "speed", "remove", "add", "seek"]),
            st.integers(0, 5),
            st.floats(0.25, 3.0),
        ),
        max_size=50,
    )
)
def test_due_sessions_heap_matches_a_walk_over_every_session(
    steps: list[tuple[float, str, int, float]],
) -> None:
    """Visiting only due sessions sends exactly what a walk over every session sends,
    and finds the same next deadline, as sessions come, go, pause, seek and change speed."""
    m = media(6, vbr=True)
    a, b = NodeScheduler(), NodeScheduler()
    for sch in (a, b):
        for k in range(6):
            sch.add(f"s{k}", m, [k % 3, 3 + k % 3], start_ct=0.1 * k)
    now = 0.0
    for dt, action, k, value in steps:
        now += dt
        sid = f"s{k}"
        for sch in (a, b):
            if action == "pause":
                sch.pause(sid, now)
            elif action == "resume":
                sch.resume(sid, now + 0.05)
            elif action == "speed":
                sch.set_speed(sid, value, now)
            elif action == "remove":
                sch.remove(sid)
            elif action in ("add", "seek"):
                sch.add(sid, m, [k % 3, 3 + k % 3], start_ct=now, start_mt=value)
        got = a.tick_runs(now)
        want: list[tuple] = []  # type: ignore[type-arg]
        nxt = None
        for wsid, sess in b.sessions.items():  # the reference: every session, every tick
            d = b._due_runs(wsid, sess, now, None, want)
            if d is not None and (nxt is None or d < nxt):
                nxt = d
        assert sorted(got) == sorted(want)
        assert a.next_due == nxt


def _wanted_walk(s: NodeScheduler, now: float) -> list[tuple[str, int]]:
    """Reference: every session's blocks from its cursor while they start in the window."""
    out = []
    for sess in s.sessions.values():
        if sess.paused:
            continue
        for k in range(sess.cursor_block, len(sess.my_blocks)):
            block = sess.my_blocks[k]
            if sess.deadline(sess.media.packet_time(block, 0)) > now + s.prefetch:
                break
            out.append((sess.media.name, block))
    return out


@given(
    st.lists(
        st.tuples(
            st.floats(0.0, 1.5),
            st.sampled_from(["tick", "pause", "resume", "speed", "remove", "add", "unready"]),
            st.integers(0, 5),
            st.floats(0.25, 3.0),
        ),
        max_size=50,
    )
)
@example(steps=[(0.0, "tick", 0, 1.0), (1.4999999999999998, "tick", 0, 1.0)])
def test_read_ahead_skips_quiet_sessions_and_wants_the_same_blocks(
    steps: list[tuple[float, str, int, float]],
) -> None:
    """The read-ahead scan, which skips a session until its next block nears, wants
    exactly the blocks a scan of every session wants, through changes of every kind."""
    m = media(12, vbr=True)
    s = NodeScheduler(prefetch=1.0)
    for k in range(6):
        s.add(f"s{k}", m, list(range(k % 4, 12, 4)), start_ct=0.4 * k)
    now = 0.0
    for dt, action, k, value in steps:
        now += dt
        sid = f"s{k}"
        if action == "pause":
            s.pause(sid, now)
        elif action == "resume":
            s.resume(sid, now + 0.05)
        elif action == "speed":
            s.set_speed(sid, value, now)
        elif action == "remove":
            s.remove(sid)
        elif action == "add":
            s.add(sid, m, list(range(k % 4, 12, 4)), start_ct=now, start_mt=value)
        assert s.wanted_blocks(now) == _wanted_walk(s, now)
        ready = {("m", b) for b in range(0, 12, 2)} if action == "unready" else None
        s.tick_runs(now, ready)
        assert s.wanted_blocks(now) == _wanted_walk(s, now)
