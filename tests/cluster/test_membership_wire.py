"""Membership datagrams: round-trips, MAC, malformed input, replay."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from yimaporc.cluster import wire

KEY = b"k" * 32
SCOPE = wire.Scope("c1", "porcupine")

ids = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)
u64 = st.integers(0, 2**64 - 1)
members = st.lists(st.builds(wire.Member, ids, ids, u64), max_size=8).map(tuple)
floats = st.floats(allow_nan=False, allow_infinity=False)
bodies = st.one_of(
    st.builds(wire.Probe, u64, members),
    st.builds(wire.NewGroup, u64),
    st.builds(wire.Reply, u64, ids, u64, members),
    st.builds(wire.Commit, u64, members, st.binary(max_size=300)),
    st.builds(wire.Ping, u64, u64),
    st.builds(wire.Ack, u64, u64, st.booleans()),
    st.builds(wire.TimeReq, floats),
    st.builds(wire.TimeResp, floats, floats, floats),
    st.builds(wire.PingReq, u64, ids, ids),
    st.builds(wire.IndirectAck, u64, ids, st.booleans(), u64),
)
headers = st.builds(wire.Header, ids, ids, u64, u64, u64)


@given(headers, bodies)
def test_round_trip(header: wire.Header, body: wire.Body) -> None:
    """Every datagram type parses back to what was serialized."""
    data = wire.serialize(KEY, SCOPE, header, body)
    assert wire.parse(KEY, SCOPE, data) == wire.Datagram(header, body)


@given(headers, bodies, st.data())
def test_any_bit_flip_is_rejected(
    header: wire.Header, body: wire.Body, data: st.DataObject
) -> None:
    """A datagram altered anywhere fails the MAC (or the framing), never parses."""
    raw = bytearray(wire.serialize(KEY, SCOPE, header, body))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(wire.MalformedPacket):
        wire.parse(KEY, SCOPE, bytes(raw))


@given(headers, bodies, st.data())
def test_truncated_is_rejected(header: wire.Header, body: wire.Body, data: st.DataObject) -> None:
    """Every proper prefix of a datagram is rejected."""
    raw = wire.serialize(KEY, SCOPE, header, body)
    n = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(wire.MalformedPacket):
        wire.parse(KEY, SCOPE, raw[:n])


@given(st.binary(max_size=400))
def test_random_bytes_are_rejected(raw: bytes) -> None:
    """Random bytes never parse and never raise anything but MalformedPacket."""
    with pytest.raises(wire.MalformedPacket):
        wire.parse(KEY, SCOPE, raw)


def test_wrong_key_is_bad_mac() -> None:
    """A datagram from a node with another secret is BadMac."""
    raw = wire.serialize(b"x" * 32, SCOPE, wire.Header("a", "h:1", 1, 1, 1), wire.NewGroup(3))
    with pytest.raises(wire.BadMac):
        wire.parse(KEY, SCOPE, raw)


def test_validly_maced_garbage_body_is_malformed() -> None:
    """A correctly MACed envelope with an unknown type is MalformedPacket, not a crash."""
    raw = wire.serialize(KEY, SCOPE, wire.Header("a", "h:1", 1, 1, 1), wire.NewGroup(3))
    signed = bytearray(raw[: -wire.MAC_SIZE])
    signed[4 + 1 + len("c1") + 1 + len("porcupine")] = 99  # type byte
    forged = bytes(signed) + wire._mac(KEY, bytes(signed))
    with pytest.raises(wire.MalformedPacket):
        wire.parse(KEY, SCOPE, forged)


def h(inc: int, seq: int, sender: str = "a") -> wire.Header:
    return wire.Header(sender, "h:1", inc, seq, 0)


def test_replay_guard_refuses_duplicates_and_old_incarnations() -> None:
    """Each (incarnation, seq) is accepted once; older incarnations never again."""
    g = wire.ReplayGuard()
    assert g.check(h(5, 1))
    assert not g.check(h(5, 1))
    assert g.check(h(5, 3))
    assert g.check(h(5, 2)), "reordered within the window is fine"
    assert not g.check(h(5, 2))
    assert g.check(h(6, 1)), "a reboot starts a new incarnation"
    assert not g.check(h(5, 10)), "the old incarnation is gone"
    assert g.check(h(1, 1, sender="b")), "senders are independent"


def test_replay_guard_window_edge() -> None:
    """Sequence numbers older than the window are refused even if unseen."""
    g = wire.ReplayGuard()
    assert g.check(h(1, 100))
    assert not g.check(h(1, 100 - wire.ReplayGuard.WINDOW))
    assert g.check(h(1, 100 - wire.ReplayGuard.WINDOW + 1))
    assert g.check(h(1, 1000))
    assert not g.check(h(1, 999 - wire.ReplayGuard.WINDOW))


def test_address_order_is_numeric() -> None:
    """127.0.1.10 sorts after 127.0.1.9 (ping neighbours follow address order)."""
    a = wire.Member("x", "127.0.1.9:7946")
    b = wire.Member("y", "127.0.1.10:7946")
    assert sorted([b, a], key=lambda m: m.sort_key) == [a, b]
