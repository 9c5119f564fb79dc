"""The RTSP server state table, request checks and the session table's timeouts."""

from __future__ import annotations

import random

import pytest

from yimaporc.rtsp import (
    TRANSITIONS,
    Headers,
    NptRange,
    Request,
    RtspStatusError,
    SessionState,
    SessionTable,
    TransportSpec,
    abort,
    choose_transport,
    complete,
    prepare,
)
from yimaporc.rtsp._machine import (
    MAX_STREAMS,
    SERVER_METHODS,
    STATE_METHODS,
    ForeignDestination,
    allowed_in,
)

URL = "rtsp://h/s"
UDP = "RTP/AVP;unicast;client_port=5000-5001"


def _req(method: str, url: str = URL, **headers: str) -> Request:
    fields = [("CSeq", "1"), *((k.replace("_", "-"), v) for k, v in headers.items())]
    return Request(method, url, Headers(tuple(fields)))


def _table() -> SessionTable:
    return SessionTable(random.Random(1), timeout=60.0)


def _status(request: Request, table: SessionTable, now: float = 0.0) -> int:
    with pytest.raises(RtspStatusError) as info:
        prepare(request, table, now)
    return info.value.status


def _in_state(table: SessionTable, state: SessionState) -> str:
    prep = prepare(_req("SETUP", URL + "/t0", Transport=UDP), table, 0.0)
    complete(prep, table)
    assert prep.session is not None
    prep.session.state = state
    return prep.session.session_id


def test_table_is_rfc2326_without_record() -> None:
    """The transition table is RFC 2326 A.2 (server) plus PAUSE in Ready as a no-op."""
    assert TRANSITIONS == {
        (SessionState.INIT, "SETUP"): SessionState.READY,
        (SessionState.INIT, "TEARDOWN"): SessionState.INIT,
        (SessionState.READY, "SETUP"): SessionState.READY,
        (SessionState.READY, "PLAY"): SessionState.PLAYING,
        (SessionState.READY, "PAUSE"): SessionState.READY,
        (SessionState.READY, "TEARDOWN"): SessionState.INIT,
        (SessionState.PLAYING, "SETUP"): SessionState.PLAYING,
        (SessionState.PLAYING, "PLAY"): SessionState.PLAYING,
        (SessionState.PLAYING, "PAUSE"): SessionState.READY,
        (SessionState.PLAYING, "TEARDOWN"): SessionState.INIT,
    }


@pytest.mark.parametrize("state", [SessionState.READY, SessionState.PLAYING])
@pytest.mark.parametrize("method", SERVER_METHODS)
def test_every_state_and_method(state: SessionState, method: str) -> None:
    """Every (state, method) pair either follows the table or answers 455 with Allow."""
    table = _table()
    sid = _in_state(table, state)
    headers = {"Session": sid}
    if method == "SETUP":
        headers["Transport"] = UDP
    request = _req(method, URL + "/t0", **headers)
    if method in STATE_METHODS and (state, method) not in TRANSITIONS:
        with pytest.raises(RtspStatusError) as info:
            prepare(request, table, 1.0)
        assert info.value.status == 455
        assert ("Allow", allowed_in(state)) in info.value.headers
        return
    prep = prepare(request, table, 1.0)
    assert prep.session is not None and prep.session.session_id == sid
    assert prep.next_state == TRANSITIONS.get((state, method))
    complete(prep, table)
    expected = TRANSITIONS.get((state, method), state)
    if expected is SessionState.INIT:
        assert table.get(sid) is None
    else:
        assert table.get(sid) is not None and table.get(sid).state is expected  # type: ignore[union-attr]


@pytest.mark.parametrize("method", ["PLAY", "PAUSE"])
def test_play_or_pause_before_setup_is_455(method: str) -> None:
    """PLAY or PAUSE without a session is not valid in Init (455)."""
    assert _status(_req(method), _table()) == 455


def test_teardown_without_session_is_a_no_op() -> None:
    """TEARDOWN in Init stays in Init and touches no session (RFC 2326 A.2)."""
    table = _table()
    prep = prepare(_req("TEARDOWN"), table, 0.0)
    assert prep.session is None
    complete(prep, table)
    assert len(table) == 0


def test_unknown_or_malformed_session_is_454() -> None:
    """A Session header naming no session, or not a session id at all, answers 454."""
    assert _status(_req("PLAY", Session="DEADBEEF"), _table()) == 454
    assert _status(_req("PLAY", Session="bad id"), _table()) == 454


def test_method_errors() -> None:
    """Unknown methods 501, RECORD/ANNOUNCE 405, a missing CSeq 400, Require 551."""
    table = _table()
    assert _status(_req("FROBNICATE"), table) == 501
    assert _status(_req("RECORD"), table) == 405
    assert _status(_req("ANNOUNCE"), table) == 405
    assert _status(Request("OPTIONS", "*"), table) == 400
    with pytest.raises(RtspStatusError) as info:
        prepare(_req("OPTIONS", Require="funky, x-other"), table, 0.0)
    assert info.value.status == 551
    assert ("Unsupported", "funky, x-other") in info.value.headers


def test_bad_range_is_457() -> None:
    """PLAY with a Range in other units or malformed answers 457; a good one is parsed."""
    table = _table()
    sid = _in_state(table, SessionState.READY)
    assert _status(_req("PLAY", Session=sid, Range="smpte=0:0:0-"), table) == 457
    prep = prepare(_req("PLAY", Session=sid, Range="npt=3.5-"), table, 0.0)
    assert prep.range == NptRange(3.5, None)


def test_setup_creates_and_abort_removes() -> None:
    """A SETUP without Session creates a session in Init; abort forgets it."""
    table = _table()
    prep = prepare(_req("SETUP", Transport=UDP), table, 5.0)
    assert prep.created and prep.session is not None
    assert prep.session.state is SessionState.INIT
    assert len(table) == 1
    abort(prep, table)
    assert len(table) == 0


def test_aggregate_setup_and_teardown() -> None:
    """Two SETUPs share one session; a TEARDOWN of any of its URLs ends the whole session."""
    table = _table()
    p1 = prepare(_req("SETUP", URL + "/t0", Transport=UDP), table, 0.0)
    complete(p1, table)
    assert p1.session is not None
    sid = p1.session.session_id
    p2 = prepare(_req("SETUP", URL + "/t1", Transport=UDP, Session=sid), table, 0.0)
    complete(p2, table, TransportSpec(client_port=(5000, 5001), server_port=(1, 2)))
    assert set(p1.session.streams) == {URL + "/t0", URL + "/t1"}
    assert p1.session.streams[URL + "/t1"].server_port == (1, 2)
    complete(prepare(_req("TEARDOWN", URL + "/t1", Session=sid), table, 0.0), table)
    assert table.get(sid) is None and not p1.session.streams


def test_choose_transport() -> None:
    """Multicast and foreign profiles are skipped; TCP gets the lowest free channel pair."""
    assert choose_transport("RTP/AVP;multicast,RTP/AVP;unicast;client_port=9-10").client_port == (
        9,
        10,
    )
    tcp = choose_transport("RTP/AVP/TCP;unicast", frozenset({0, 1, 2}))
    assert tcp.interleaved == (4, 5)
    assert choose_transport("RTP/AVP/TCP;interleaved=6-7").interleaved == (6, 7)
    for bad in [
        None,
        "garbage;;",
        "RTP/SAVP;client_port=1-2",
        "RTP/AVP;multicast",
        "RTP/AVP;unicast",
        'RTP/AVP;client_port=1-2;mode="RECORD"',
        "RTP/AVP;unicast;client_port=0-1",
        "RTP/AVP;unicast;client_port=5000-0",
    ]:
        with pytest.raises(RtspStatusError) as info:
            choose_transport(bad)
        assert info.value.status == 461
    with pytest.raises(RtspStatusError):
        choose_transport("RTP/AVP/TCP", frozenset(range(256)))


def test_session_table_timeouts() -> None:
    """Sessions expire after their timeout unless touched; next_expiry follows touches."""
    table = SessionTable(random.Random(2), timeout=10.0)
    a = table.create(0.0)
    b = table.create(2.0)
    assert table.next_expiry() == 10.0
    a.touch(5.0)
    assert table.next_expiry() == 12.0
    assert table.expire(11.9) == []
    assert table.expire(12.0) == [b]
    assert table.expire(14.9) == []
    assert table.expire(15.0) == [a]
    assert table.next_expiry() is None and len(table) == 0
    c = table.create(20.0)
    table.remove(c.session_id)
    assert table.next_expiry() is None
    assert not table.touch("nope", 1.0)


def test_session_ids_are_seeded_and_capped() -> None:
    """Session ids come from the injected Random; a full table answers 503."""
    ids1 = [SessionTable(random.Random(7)).create(0.0).session_id for _ in range(2)]
    assert ids1[0] == ids1[1] and len(ids1[0]) == 16
    table = SessionTable(random.Random(7), max_sessions=2)
    table.create(0.0)
    table.create(0.0)
    with pytest.raises(RtspStatusError) as info:
        table.create(0.0)
    assert info.value.status == 503


# --- hostile clients: reflection, caps, short lives (issue 13) ----------------------------


def test_destination_must_be_the_client() -> None:
    """A UDP destination other than the RTSP peer is refused (461, ForeignDestination);
    the peer's own address (also IPv4-mapped) is accepted; a TCP alternative still wins."""
    mine = "RTP/AVP;unicast;destination=127.0.103.10;client_port=5000-5001"
    other = "RTP/AVP;unicast;destination=127.0.103.99;client_port=5000-5001"
    assert choose_transport(mine, peer="127.0.103.10").destination == "127.0.103.10"
    assert choose_transport(mine, peer="::ffff:127.0.103.10").client_port == (5000, 5001)
    for value, peer in [(other, "127.0.103.10"), (mine, None), (other.replace("127.0.103.99", "victim.example"), "127.0.103.10")]:  # fmt: skip
        with pytest.raises(ForeignDestination) as info:
            choose_transport(value, peer=peer)
        assert info.value.status == 461
    assert choose_transport(other + ",RTP/AVP/TCP", peer="127.0.103.10").is_tcp
    request = _req("SETUP", Transport=other)
    with pytest.raises(ForeignDestination):
        prepare(request, _table(), 0.0, peer="127.0.103.10")


def test_prepare_refuses_foreign_destination_without_creating_a_session() -> None:
    """A refused SETUP leaves the table empty (nothing to reap, no slot taken)."""
    table = _table()
    with pytest.raises(RtspStatusError):
        prepare(
            _req("SETUP", Transport="RTP/AVP;destination=10.0.0.1;client_port=9-10"),
            table,
            0.0,
            peer="127.0.0.1",
        )
    assert len(table) == 0 and table.next_expiry() is None


def test_per_client_and_total_caps() -> None:
    """One address gets max_per_client sessions (453), the table max_sessions (503);
    freed or expired slots are counted back; refusals are counted."""
    table = SessionTable(random.Random(3), 60.0, max_sessions=5, max_per_client=3)
    a = [table.create(0.0, "10.0.0.1") for _ in range(3)]
    with pytest.raises(RtspStatusError) as info:
        table.create(0.0, "10.0.0.1")
    assert info.value.status == 453 and "client" in info.value.reason
    table.create(0.0, "10.0.0.2")
    table.create(0.0, "10.0.0.2")
    with pytest.raises(RtspStatusError) as info:
        table.create(0.0, "10.0.0.3")
    assert info.value.status == 503
    assert table.refused == 2
    table.remove(a[0].session_id)
    assert table.of_client("10.0.0.1") == 2
    table.create(1.0, "10.0.0.1")
    assert len(table.expire(60.0)) == 4 and table.of_client("10.0.0.2") == 0


def test_never_played_sessions_expire_after_setup_timeout() -> None:
    """Until its first PLAY a session lives setup_timeout s; a played one the full timeout."""
    table = SessionTable(random.Random(4), 60.0, setup_timeout=15.0)
    idle = table.create(0.0)
    played = table.create(0.0)
    played.state = SessionState.READY
    p = prepare(_req("PLAY", Session=played.session_id), table, 1.0)
    complete(p, table)
    assert played.played and played.expires_at == 61.0
    assert table.expire(14.9) == []
    assert table.expire(15.0) == [idle]
    assert table.expire(60.9) == [] and table.expire(61.0) == [played]


def test_detached_session_deadline_is_not_extended_by_touches() -> None:
    """detach() brings the expiry forward to detached_timeout; touch() cannot push it back;
    attach() (a request on a live connection) lifts it."""
    table = SessionTable(random.Random(5), 60.0, detached_timeout=10.0)
    s = table.create(0.0)
    s.played = True
    table.detach(s, 20.0)
    s.touch(25.0)
    assert table.next_expiry() == 30.0
    table.attach(s)
    assert table.expire(30.0) == [] and s.expires_at == 85.0
    table.detach(s, 40.0)
    assert table.expire(50.0) == [s]


def test_expire_is_bounded_per_call() -> None:
    """expire(limit=n) removes at most n sessions, the earliest first."""
    table = SessionTable(random.Random(6), 10.0)
    made = [table.create(float(i) / 10) for i in range(10)]
    assert table.expire(100.0, 4) == made[:4]
    assert table.expire(100.0, 4) == made[4:8]
    assert table.expire(100.0) == made[8:]


def test_streams_per_session_are_capped() -> None:
    """A session holds at most MAX_STREAMS stream URLs; re-SETUP of a known one is fine."""
    table = _table()
    first = prepare(_req("SETUP", URL + "/t0", Transport=UDP), table, 0.0)
    complete(first, table)
    assert first.session is not None
    sid = first.session.session_id
    for i in range(1, MAX_STREAMS):
        complete(
            prepare(_req("SETUP", f"{URL}/t{i}", Transport=UDP, Session=sid), table, 0.0), table
        )
    with pytest.raises(RtspStatusError) as info:
        prepare(_req("SETUP", f"{URL}/t{MAX_STREAMS}", Transport=UDP, Session=sid), table, 0.0)
    assert info.value.status == 453
    prepare(_req("SETUP", URL + "/t0", Transport=UDP, Session=sid), table, 0.0)
