"""Replication messages: byte round-trips, exact layout and malformed input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from yimaporc.porcupine.replication import (
    Ack,
    MalformedMessage,
    Push,
    Retire,
    Timestamp,
    Update,
    from_bytes,
    to_bytes,
)

node_ids = st.text(min_size=1, max_size=20).filter(lambda s: len(s.encode()) < 256)
timestamps = st.builds(Timestamp, st.integers(-(2**63), 2**63 - 1), node_ids)
object_ids = st.text(max_size=80)
updates = st.builds(Update, object_ids, timestamps, st.none() | st.binary(max_size=300))
pushes = st.builds(Push, updates, node_ids, st.frozensets(node_ids, max_size=7))
acks = st.builds(Ack, object_ids, timestamps)
retires = st.builds(Retire, object_ids, timestamps)


@given(pushes | acks | retires)
def test_round_trip(msg: Push | Ack | Retire) -> None:
    """Every message parses back to an equal value."""
    data = to_bytes(msg)
    assert from_bytes(data) == msg
    assert type(msg).from_bytes(data) == msg  # type: ignore[attr-defined]


@given(pushes | acks | retires, st.binary(min_size=1, max_size=4))
def test_trailing_bytes_rejected(msg: Push | Ack | Retire, extra: bytes) -> None:
    """A frame with bytes after its end is malformed."""
    with pytest.raises(MalformedMessage):
        from_bytes(to_bytes(msg) + extra)


@given(pushes | acks | retires)
def test_every_truncation_rejected(msg: Push | Ack | Retire) -> None:
    """Every strict prefix of a frame is malformed, never a wrong message."""
    data = to_bytes(msg)
    for n in range(len(data)):
        with pytest.raises(MalformedMessage):
            from_bytes(data[:n])


def test_ack_layout() -> None:
    """An Ack is magic, type 2, u16 object id, i64 microseconds, u8 node id."""
    data = Ack("m", Timestamp(1, "n1")).to_bytes()
    assert data == b"YPR1\x02" + b"\x00\x01m" + (1).to_bytes(8, "big") + b"\x02n1"


def test_delete_and_empty_body_differ() -> None:
    """A deletion (no body) and an empty body are different updates on the wire."""
    ts = Timestamp(5, "a")
    delete = Push(Update("o", ts, None), "a", frozenset({"a", "b"}))
    empty = Push(Update("o", ts, b""), "a", frozenset({"a", "b"}))
    assert to_bytes(delete) != to_bytes(empty)
    assert from_bytes(to_bytes(delete)) == delete
    assert from_bytes(to_bytes(empty)) == empty


def test_wrong_kind_and_garbage() -> None:
    """Asking for the wrong type, bad magic, unknown type and bad flags all fail cleanly."""
    data = Ack("m", Timestamp(1, "n1")).to_bytes()
    with pytest.raises(MalformedMessage):
        Retire.from_bytes(data)
    with pytest.raises(MalformedMessage):
        from_bytes(b"XXXX" + data[4:])
    with pytest.raises(MalformedMessage):
        from_bytes(b"YPR1\x09" + data[5:])
    push = bytearray(Push(Update("o", Timestamp(1, "a"), None), "a", frozenset()).to_bytes())
    push[5 + 2 + 1 + 8 + 2] = 7  # has_body flag
    with pytest.raises(MalformedMessage):
        from_bytes(bytes(push))
