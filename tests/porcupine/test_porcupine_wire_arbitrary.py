"""Arbitrary bytes into the mail cluster's payload parsers: only their own error types come out."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.protocols import amp

from yimaporc.porcupine.cluster import NewMessage, pack_messages, unpack_messages
from yimaporc.porcupine.replication._wire import MalformedMessage, from_bytes
from yimaporc.porcupine.replication.amp import pack_frames, unpack_frames

GOOD = pack_messages([NewMessage("demo@example.org", "INBOX", b"body", ("\\Seen",), 1.0, 7)])


@st.composite
def near_batches(draw: st.DrawFn) -> bytes:
    """A real message batch with a few bytes changed, cut or extended (or pure junk)."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    raw = bytearray(GOOD)
    for _ in range(draw(st.integers(1, 4))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw[: draw(st.integers(0, len(raw)))]) + draw(st.binary(max_size=10))


@given(near_batches())
def test_unpack_messages_raises_only_malformed_amp_box(data: bytes) -> None:
    """A mangled NewMessage batch decodes or raises MalformedAmpBox (AMP answers it as an error)."""
    try:
        unpack_messages(data)
    except amp.MalformedAmpBox:
        pass


@given(st.binary(max_size=200))
def test_unpack_frames_raises_only_malformed_message(data: bytes) -> None:
    """Any blob splits into frames or raises MalformedMessage."""
    try:
        frames = unpack_frames(data)
    except MalformedMessage:
        return
    assert pack_frames(frames) == data


@given(st.binary(max_size=200))
def test_replication_frames_raise_only_malformed_message(data: bytes) -> None:
    """Any bytes parse as a replication message or raise MalformedMessage."""
    try:
        from_bytes(data)
    except MalformedMessage:
        pass
