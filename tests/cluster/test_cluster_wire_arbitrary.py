"""Validly MACed arbitrary bytes into the cluster parsers: only their own error types come out.

The existing wire tests feed junk that fails the MAC; these sign it first, so the
envelope and body parsers behind the MAC see arbitrary bytes (what a node with the
secret, or a bug in one, could send).
"""

from __future__ import annotations

import hashlib
import hmac

from hypothesis import given
from hypothesis import strategies as st
from twisted.protocols import amp

from yimaporc.cluster import wire
from yimaporc.cluster.buckets import BucketMap, MalformedMap
from yimaporc.cluster.bucketservice import unpack_commit
from yimaporc.cluster.rpc import BigBytes

KEY = b"k" * 32
SCOPE = wire.Scope("c", "k")
#: MAGIC and the scope (u8-counted cluster and kind names) that every datagram starts with.
PREFIX = wire.MAGIC + b"\x01c\x01k"


def sign(data: bytes) -> bytes:
    """``data`` followed by its valid MAC."""
    return data + hmac.new(KEY, data, hashlib.sha256).digest()[: wire.MAC_SIZE]


def valid(kind: int) -> bytes:
    """A real datagram of type ``kind``, MAC stripped."""
    bodies = {
        1: wire.Probe(1, (wire.Member("a", "127.0.0.1:1", 2),)),
        2: wire.NewGroup(3),
        3: wire.Reply(4, "a", 5, (wire.Member("b", "h:2", 0),)),
        4: wire.Commit(6, (), b"att"),
        5: wire.Ping(7, 8),
        6: wire.Ack(7, 8, True),
        7: wire.TimeReq(1.0),
        8: wire.TimeResp(1.0, 2.0, 3.0),
    }
    header = wire.Header("n1", "127.0.0.1:7946", 1, 2, 3)
    raw = wire.serialize(KEY, SCOPE, header, bodies[kind])[: -wire.MAC_SIZE]
    assert raw.startswith(PREFIX)
    return raw


@given(st.binary(max_size=300))
def test_signed_arbitrary_bytes_raise_only_malformed(raw: bytes) -> None:
    """MAGIC, scope + anything, validly MACed: a Datagram or MalformedPacket, never another."""
    try:
        dgram = wire.parse(KEY, SCOPE, sign(PREFIX + raw))
    except wire.MalformedPacket:
        return
    assert isinstance(dgram, wire.Datagram)


@given(st.integers(1, 8), st.data())
def test_signed_mutations_of_real_datagrams_raise_only_malformed(
    kind: int, data: st.DataObject
) -> None:
    """A real datagram with bytes replaced, cut or extended, re-MACed: Datagram or MalformedPacket."""
    raw = bytearray(valid(kind))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(len(PREFIX), len(raw) - 1))
        raw[i] = data.draw(
            st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, data.draw(st.integers(0, 255))])
        )
    raw = raw[: data.draw(st.integers(len(PREFIX), len(raw)))] + data.draw(st.binary(max_size=20))
    try:
        wire.parse(KEY, SCOPE, sign(bytes(raw)))
    except wire.MalformedPacket:
        pass


def test_oversized_and_undersized_are_malformed() -> None:
    """Longer than MAX_DATAGRAM or shorter than magic + MAC: MalformedPacket before any MAC work."""
    for raw in (b"", wire.MAGIC, wire.MAGIC + b"x" * wire.MAX_DATAGRAM):
        try:
            wire.parse(KEY, SCOPE, raw)
        except wire.MalformedPacket as e:
            assert "length" in str(e)
        else:
            raise AssertionError("parsed")


def test_bigbytes_round_trip_over_many_chunks() -> None:
    """BigBytes splits 200 KB over keys and joins them back (the Echo payload path)."""
    arg = BigBytes()
    strings: dict[bytes, bytes] = {}
    value = bytes(range(256)) * 800
    arg.toBox(b"payload", strings, {"payload": value}, None)
    assert strings[b"payload.n"] == b"4"
    objects: dict[str, object] = {}
    arg.fromBox(b"payload", dict(strings), objects, None)
    assert objects["payload"] == value


def test_bigbytes_refuses_absurd_chunk_counts() -> None:
    """A chunk count outside 1..100000 is MalformedAmpBox, not a huge allocation."""
    for count in (b"0", b"100001", b"-1"):
        try:
            BigBytes().fromBox(b"p", {b"p": b"x", b"p.n": count}, {}, None)
        except amp.MalformedAmpBox:
            continue
        raise AssertionError(count)


@given(
    st.dictionaries(
        st.sampled_from([b"p", b"p.n", b"p.1", b"p.2", b"q"]),
        st.sampled_from([b"", b"x", b"2", b"3", b"1e3", b"\xff", b"99999"]),
    )
)
def test_bigbytes_arbitrary_boxes_raise_only_malformed(strings: dict[bytes, bytes]) -> None:
    """Any keys and values: BigBytes decodes or raises MalformedAmpBox (answered, not a traceback)."""
    try:
        BigBytes().fromBox(b"p", dict(strings), {}, None)
    except amp.MalformedAmpBox:
        pass


@given(st.binary(max_size=300), st.booleans())
def test_commit_attachments_raise_only_malformed_map(raw: bytes, with_magic: bool) -> None:
    """Any commit attachment (with or without the commit head) decodes or raises MalformedMap."""
    data = (b"BKC1" if with_magic else b"") + raw
    try:
        unpack_commit(data)
    except MalformedMap:
        pass
    try:
        BucketMap.parse(raw)
    except MalformedMap:
        pass
