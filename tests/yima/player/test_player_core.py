"""The player core's events and actions (what a shell drives)."""

from __future__ import annotations

import json
import random

import pytest

from yimaporc.yima.player.core import (
    Dropper,
    PlayerConfig,
    StreamPlayer,
)
from yimaporc.yima.player.events import (
    Deliver,
    PacketArrived,
    Pause,
    ProbeAnswered,
    Resume,
    SendNack,
    SendProbe,
    SetSpeed,
)
from yimaporc.yima.player.flow import BandsConfig, PauseResumeConfig
from yimaporc.yima.player.presentation import (
    Presentation,
)

CONTRACT_KEYS = {
    "packets_expected",
    "packets_received",
    "packets_dropped_simulated",
    "nacks_sent",
    "retransmissions_received",
    "packets_missing_at_playout",
    "late_packets",
    "underflows",
    "max_sync_skew_ms",
    "nodes_seen",
    "buffer_levels",
}


def arrive(g: int, node: int | None = None, ns: int | None = None, **kw: object) -> PacketArrived:
    # Round-robin by block of 4 over 3 nodes; 100 packets per media second.
    block = g // 4
    node = block % 3 if node is None else node
    ns = (block // 3) * 4 + g % 4 if ns is None else ns
    return PacketArrived("s", node, g, ns, g * 0.01, 1000, **kw)  # type: ignore[arg-type]


def player(flow: str = "delta-p", **kw: object) -> StreamPlayer:
    cfg = PlayerConfig(
        flow=flow,  # type: ignore[arg-type]
        prebuffer=1.0,
        bands=BandsConfig((20_000, 40_000, 60_000, 80_000), dwell=0.0),
        pause=PauseResumeConfig(high=60_000, low=30_000),
        packets_per_block=4,
        **kw,  # type: ignore[arg-type]
    )
    return StreamPlayer("s", [0, 1, 2], start_ct=10.0, config=cfg, total=400)


def test_start_probes_every_node() -> None:
    """Start sends one RTT probe per serving node; delta-p starts at real-time speed."""
    acts = player().start(9.0)
    assert sorted(a.node for a in acts if isinstance(a, SendProbe)) == [0, 1, 2]
    assert not [a for a in acts if isinstance(a, SetSpeed)]


def test_pause_resume_mode_starts_every_node_at_the_over_rate_at_one_instant() -> None:
    """Pause-resume asks every node for the over-rate, effective at the session start."""
    acts = [a for a in player("pause-resume").start(9.0) if isinstance(a, SetSpeed)]
    assert {(a.node, a.speed, a.at_ct) for a in acts} == {(n, 1.25, 10.0) for n in range(3)}


def test_probe_answer_sets_the_nodes_rtt() -> None:
    """The probe round trip becomes that node's RTT estimate."""
    p = player()
    probes = [a for a in p.start(9.0) if isinstance(a, SendProbe)]
    p.receive(ProbeAnswered("s", probes[1].node, probes[1].token), 9.04)
    assert p.retx is not None and p.retx.nodes[probes[1].node].rtt.srtt == pytest.approx(0.04)


def test_delta_p_feedback_reaches_every_node_with_the_same_instant() -> None:
    """A full buffer makes every node slow down, all from the same cluster instant."""
    p = player(trim=None)
    p.start(9.0)
    for g in range(90):
        p.receive(arrive(g), 10.5)
    acts = [a for a in p.handle_timer(11.0) if isinstance(a, SetSpeed)]
    assert sorted(a.node for a in acts) == [0, 1, 2]
    assert {a.speed for a in acts} == {0.6}
    assert {a.at_ct for a in acts} == {11.0 + p.config.lead}


def test_pause_then_resume_every_node_at_thresholds() -> None:
    """Crossing max pauses all nodes; draining to min resumes all at one instant."""
    p = player("pause-resume", trim=None)
    p.start(9.0)
    for g in range(70):
        p.receive(arrive(g), 10.2)
    acts = p.handle_timer(10.5)
    pauses = [a for a in acts if isinstance(a, Pause)]
    assert sorted(a.node for a in pauses) == [0, 1, 2]
    at = pauses[0].at_ct
    assert {(a.at_ct, a.media_time) for a in pauses} == {(at, p.mirror.position(at))}
    assert pauses[0].media_time > 0, "the common schedule's position at the instant"
    acts = p.handle_timer(11.45)
    resumes = [a for a in acts if isinstance(a, Resume)]
    assert sorted(a.node for a in resumes) == [0, 1, 2]
    assert len({a.at_ct for a in resumes}) == 1


def test_nack_goes_to_the_node_whose_own_sequence_has_the_gap() -> None:
    """Losing gseq 5 (node 1, node_seq 1) sends one NACK for node_seq 1 to node 1 only."""
    p = player()
    p.start(9.0)
    acts = []
    for g in range(12):
        if g != 5:
            acts += p.receive(arrive(g), 10.1)
    acts += p.handle_timer(10.2)
    nacks = [a for a in acts if isinstance(a, SendNack)]
    assert nacks == [SendNack("s", 1, (1,))]


def test_tail_of_a_nodes_run_is_recovered_after_silence() -> None:
    """Lost block tails (node 0 mid-stream, node 2 at the top) are NACKed after silence."""
    p = player()
    p.start(9.0)
    for g in (0, 1, 4, 5, 6, 7, 8, 9):
        p.receive(arrive(g), 10.1)
    assert not [a for a in p.handle_timer(10.15) if isinstance(a, SendNack)]
    acts = p.handle_timer(10.3)
    nacks = [a for a in acts if isinstance(a, SendNack)]
    assert sorted(nacks, key=lambda a: a.node) == [
        SendNack("s", 0, (2, 3)),
        SendNack("s", 2, (2, 3)),
    ]


def test_playout_delivers_in_global_order_at_media_rate() -> None:
    """Deliver actions come in gseq order, each at its playout instant."""
    p = player()
    for g in reversed(range(20)):
        p.receive(arrive(g), 10.5)
    out = [a for a in p.handle_timer(11.095) if isinstance(a, Deliver)]
    assert [a.gseq for a in out] == list(range(10))


def test_dropper_removes_packets_before_the_buffer() -> None:
    """A seeded 50% dropper drops about half, counted, and the buffer never sees them."""
    dropper = Dropper(0.5, random.Random(7))
    p = StreamPlayer("s", [0, 1, 2], 10.0, PlayerConfig(flow="none"), dropper=dropper)
    for g in range(400):
        p.receive(arrive(g), 10.5)
    st = p.stats()
    assert 150 < st["packets_dropped_simulated"] < 250
    assert st["packets_received"] == 400 - st["packets_dropped_simulated"]
    with pytest.raises(ValueError):
        Dropper(1.0, random.Random(1))


def test_stats_carry_the_contract_keys_and_are_json() -> None:
    """The stats dict has every CONTRACT §3 key and serialises to JSON."""
    p = player()
    pres = Presentation([p])
    pres.start(9.0)
    for g in range(400):
        pres.receive(arrive(g), 10.5)
    t = pres.get_timer(10.5)
    while t is not None and t < 20:
        pres.handle_timer(t)
        t = pres.get_timer(t)
    pres.finish()
    st = pres.stats()
    assert CONTRACT_KEYS <= set(st)
    assert st["packets_expected"] == 400 and st["packets_missing_at_playout"] == 0
    assert st["nodes_seen"] == [0, 1, 2]
    json.dumps(st)


def test_presentation_needs_one_playout_clock() -> None:
    """Streams with different playout starts cannot form a presentation."""
    a = StreamPlayer("a", [0], 10.0, PlayerConfig(flow="none"))
    b = StreamPlayer("b", [0], 11.0, PlayerConfig(flow="none"))
    with pytest.raises(ValueError):
        Presentation([a, b])


def test_config_requires_the_chosen_modes_thresholds() -> None:
    """Delta p without bands, or pause-resume without thresholds, is a configuration error."""
    with pytest.raises(ValueError):
        PlayerConfig(flow="delta-p")
    with pytest.raises(ValueError):
        PlayerConfig(flow="pause-resume")


def _two_streams() -> Presentation:
    cfg = PlayerConfig(flow="none", prebuffer=1.0, trim=None)
    return Presentation(
        [StreamPlayer(s, [0, 1], 10.0, cfg, total=200) for s in ("a", "b")], sync_interval=0.5
    )


def test_presentation_plays_streams_on_one_clock_with_tiny_skew() -> None:
    """Two streams with different packet spacing present the same media time (timer-exact)."""
    pres = _two_streams()
    for g in range(200):
        pres.receive(PacketArrived("a", g % 2, g, g // 2, g * 0.01, 500), 10.5)
    for g in range(100):
        pres.receive(PacketArrived("b", g % 2, g, g // 2, g * 0.02, 500), 10.5)
    t = pres.get_timer(10.5)
    while t is not None and t < 12.5:
        pres.handle_timer(t)
        t = pres.get_timer(t)
    assert pres.skew.samples > 100
    assert pres.skew.max_skew < 1e-9


def test_coarse_sync_slows_the_fuller_stream_on_all_its_nodes() -> None:
    """Stream a holds 1.5 s more media than b: a's nodes get speed < 1, b's > 1."""
    pres = _two_streams()
    for g in range(200):
        pres.receive(PacketArrived("a", g % 2, g, g // 2, g * 0.01, 500), 10.9)
    for g in range(25):
        pres.receive(PacketArrived("b", g % 2, g, g // 2, g * 0.02, 500), 10.9)
    acts = [a for a in pres.handle_timer(11.0) if isinstance(a, SetSpeed)]
    speeds = {(a.stream, a.node): a.speed for a in acts}
    assert speeds[("a", 0)] == speeds[("a", 1)] < 1.0
    assert speeds[("b", 0)] == speeds[("b", 1)] > 1.0
