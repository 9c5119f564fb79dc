"""The fast membership codec against its construct specification, byte for byte.

``wire.serialize``/``wire.parse`` run on precompiled ``struct`` (the hot path of every
node and of the simulation kernel); ``wire.spec_serialize``/``wire.spec_parse`` are the
construct description of the same format.  These tests hold them together: the same
bytes for every value, the same result or the same error for every input, and fixed
hex vectors written by the construct codec before the fast one existed (so nodes of
the previous build interoperate).
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from yimaporc.cluster import wire

KEY = b"k" * 32
SCOPE = wire.Scope("c1", "porcupine")

# Values in range, and values just past every limit of the format.
u64 = st.integers(0, 2**64 - 1)
any_int = st.one_of(u64, st.integers(-(2**65), 2**66), st.sampled_from([-1, 2**64]))
ids = st.text(max_size=20)
strings = st.one_of(
    ids,
    st.text(min_size=250, max_size=300),  # around the u8 length limit, in UTF-8 bytes
    st.text(st.characters(codec="utf-8"), max_size=5),
    st.sampled_from(["\ud800", "a\udfffb"]),  # lone surrogates: not encodable
)
members = st.lists(st.builds(wire.Member, strings, strings, any_int), max_size=6).map(tuple)
floats = st.floats()
flags = st.one_of(st.booleans(), st.integers(0, 3), st.none())
bodies = st.one_of(
    st.builds(wire.Probe, any_int, members),
    st.builds(wire.NewGroup, any_int),
    st.builds(wire.Reply, any_int, strings, any_int, members),
    st.builds(wire.Commit, any_int, members, st.binary(max_size=300)),
    st.builds(wire.Ping, any_int, any_int),
    st.builds(wire.Ack, any_int, any_int, flags),
    st.builds(wire.TimeReq, floats),
    st.builds(wire.TimeResp, floats, floats, floats),
    st.builds(wire.PingReq, any_int, strings, strings),
    st.builds(wire.IndirectAck, any_int, strings, flags, any_int),
)
headers = st.builds(wire.Header, strings, strings, any_int, any_int, any_int)
valid_bodies = st.one_of(
    st.builds(
        wire.Probe, u64, st.lists(st.builds(wire.Member, ids, ids, u64), max_size=4).map(tuple)
    ),
    st.builds(wire.Reply, u64, ids, u64, st.just(())),
    st.builds(wire.Commit, u64, st.just(()), st.binary(max_size=40)),
    st.builds(wire.Ping, u64, u64),
    st.builds(wire.Ack, u64, u64, st.booleans()),
    st.builds(wire.TimeResp, floats, floats, floats),
    st.builds(wire.PingReq, u64, ids, ids),
    st.builds(wire.IndirectAck, u64, ids, st.booleans(), u64),
    st.builds(wire.NewGroup, u64),
    st.builds(wire.TimeReq, floats),
)
valid_headers = st.builds(wire.Header, ids, ids, u64, u64, u64)


def outcome(fn: object, *args: object) -> tuple[str, object]:
    """``("ok", repr(result))`` or ``("error", class name, message)`` of ``fn(*args)``."""
    try:
        result = fn(*args)  # type: ignore[operator]
    except Exception as e:  # the class and message are what is compared
        return ("error", (type(e).__name__, str(e)))
    # repr: NaN compares unequal to itself, and -0.0 equal to 0.0; repr tells both apart.
    return ("ok", repr(result))


def sign(signed: bytes) -> bytes:
    """``signed`` followed by its valid MAC (an authenticated datagram)."""
    return signed + hmac.new(KEY, signed, hashlib.sha256).digest()[: wire.MAC_SIZE]


@given(headers, bodies)
def test_serialize_matches_spec_bytes_and_errors(header: wire.Header, body: wire.Body) -> None:
    """For any values, in range or not, the fast encoder gives the spec's bytes or its error."""
    assert outcome(wire.serialize, KEY, SCOPE, header, body) == outcome(
        wire.spec_serialize, KEY, SCOPE, header, body
    )


@given(valid_headers, valid_bodies)
def test_parse_matches_spec_on_real_datagrams(header: wire.Header, body: wire.Body) -> None:
    """A datagram parses to the same value through the fast decoder and the spec."""
    raw = wire.spec_serialize(KEY, SCOPE, header, body)
    assert outcome(wire.parse, KEY, SCOPE, raw) == outcome(wire.spec_parse, KEY, SCOPE, raw)
    assert repr(wire.parse(KEY, SCOPE, raw)) == repr(wire.Datagram(header, body))


@given(valid_headers, valid_bodies, st.data())
def test_parse_matches_spec_on_signed_mutations(
    header: wire.Header, body: wire.Body, data: st.DataObject
) -> None:
    """Authenticated but altered envelopes (cut, grown, bytes changed): same value or same
    error, class and message, from the fast decoder as from the spec."""
    signed = bytearray(wire.spec_serialize(KEY, SCOPE, header, body)[: -wire.MAC_SIZE])
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["set", "cut", "insert", "append"]))
        i = data.draw(st.integers(0, max(0, len(signed) - 1)))
        if op == "set" and signed:
            signed[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del signed[i : i + data.draw(st.integers(1, 9))]
        elif op == "insert":
            signed[i:i] = data.draw(st.binary(min_size=1, max_size=9))
        else:
            signed += data.draw(st.binary(min_size=1, max_size=9))
    raw = sign(bytes(signed))
    assert outcome(wire.parse, KEY, SCOPE, raw) == outcome(wire.spec_parse, KEY, SCOPE, raw)


def envelope(kind: int, body: bytes) -> bytes:
    """An authenticated datagram of type code ``kind`` around ``body`` (any bytes)."""
    head = wire.MAGIC + b"\x02c1\x09porcupine" + bytes([kind]) + b"\x02n1\x03h:1"
    return sign(head + struct.pack(">QQQH", 1, 2, 3, len(body)) + body)


@given(st.integers(0, 12), st.binary(max_size=80))
def test_parse_matches_spec_on_arbitrary_bodies(kind: int, body: bytes) -> None:
    """Any bytes as the body of any type code behind a valid envelope: same value (flags,
    floats, trailing bytes ignored) or same error through both decoders."""
    raw = envelope(kind, body)
    assert outcome(wire.parse, KEY, SCOPE, raw) == outcome(wire.spec_parse, KEY, SCOPE, raw)


def test_flag_bytes_other_than_one_are_true() -> None:
    """An Ack whose member byte is 2 (or any non-zero) reads as True, as construct's Flag."""
    raw = envelope(int(wire.MsgType.ACK), struct.pack(">QQB", 1, 2, 0x80))
    assert wire.parse(KEY, SCOPE, raw).body == wire.Ack(1, 2, True)
    assert wire.spec_parse(KEY, SCOPE, raw).body == wire.Ack(1, 2, True)


@given(st.binary(max_size=120), st.booleans(), st.booleans())
def test_parse_matches_spec_on_garbage(raw: bytes, with_prefix: bool, signed: bool) -> None:
    """Random bytes (with or without our magic and scope, MACed or not): the same error
    class and message through both decoders."""
    if with_prefix:
        raw = wire.MAGIC + b"\x02c1\x09porcupine" + raw
    if signed:
        raw = sign(raw)
    fast = outcome(wire.parse, KEY, SCOPE, raw)
    assert fast == outcome(wire.spec_parse, KEY, SCOPE, raw)
    if fast[0] == "error":
        assert fast[1][0] in {"MalformedPacket", "BadMac", "WrongScope"}  # type: ignore[index]


@pytest.mark.parametrize(
    "raw",
    [
        wire.MAGIC + b"\x02c2\x09porcupine" + b"\0" * 40,  # another cluster
        wire.MAGIC + b"\x02c1\x04yima" + b"\0" * 40,  # another kind
        wire.MAGIC + b"\x02c1\x09porcupin" + b"\0" * 16,  # scope cut short
        wire.MAGIC + b"\x02c\xff\x09porcupine" + b"\0" * 40,  # not ASCII
        wire.MAGIC + b"\x40" + b"\0" * 16,  # scope longer than the datagram
    ],
)
def test_scope_refusals_match_spec(raw: bytes) -> None:
    """Another cluster or kind is WrongScope, a broken scope MalformedPacket, as the spec says."""
    fast = outcome(wire.parse, KEY, SCOPE, raw)
    assert fast == outcome(wire.spec_parse, KEY, SCOPE, raw)
    assert fast[0] == "error"


HEADER = wire.Header("n1", "10.0.0.1:7946", 3, 17, 42)
MEMBERS = (wire.Member("n0", "10.0.0.2:7946", 1), wire.Member("n\u00e9", "h:2", 2**64 - 1))
PREFIX = (
    "59504d3202633109706f72637570696e65{t}026e310d31302e302e302e313a37393436"
    "0000000000000003000000000000001100000000000000" + "2a"
)
#: Datagrams as the construct codec wrote them before the fast codec (key b"k"*32).
VECTORS = [
    (
        wire.Probe(7, MEMBERS),
        PREFIX.format(t="01") + "003300000000000000070002026e300d31302e302e302e323a37393436"
        "0000000000000001036ec3a903683a32ffffffffffffffffa295c84499f8df06ca449308c62afad1",
    ),
    (
        wire.Commit(9, MEMBERS, b"BKC1"),
        PREFIX.format(t="04") + "003b00000000000000090002026e300d31302e302e302e323a37393436"
        "0000000000000001036ec3a903683a32ffffffffffffffff00000004424b4331"
        "cee117cc170dee5ebfd57f2227ef7f0f",
    ),
    (
        wire.Ack(7, 5, True),
        PREFIX.format(t="06") + "00110000000000000007000000000000000501"
        "e3d6c81d6c6e5d8496c1c17d608bda7f",
    ),
    (
        wire.TimeResp(1.5, -0.0, 1e300),
        PREFIX.format(t="08") + "00183ff800000000000080000000000000007e37e43c8800759c"
        "72bea44396a48475cecb3321124e5180",
    ),
    (
        wire.IndirectAck(3, "n2", False, 0),
        PREFIX.format(t="0a") + "00140000000000000003026e32000000000000000000"
        "90fd1f5d78ce59169ea74c3a7fde518a",
    ),
]


@pytest.mark.parametrize(("body", "hexdata"), VECTORS, ids=lambda v: type(v).__name__)
def test_fixed_vectors(body: wire.Body, hexdata: str) -> None:
    """Both codecs write, and read back, the exact bytes of the previous build."""
    raw = bytes.fromhex(hexdata)
    assert wire.serialize(KEY, SCOPE, HEADER, body) == raw
    assert wire.spec_serialize(KEY, SCOPE, HEADER, body) == raw
    assert repr(wire.parse(KEY, SCOPE, raw)) == repr(wire.Datagram(HEADER, body))


def test_oversized_values_are_value_errors() -> None:
    """A node id over 255 bytes or a negative epoch cannot be sent: ValueError, as before."""
    with pytest.raises(ValueError, match="cannot encode PING"):
        wire.serialize(KEY, SCOPE, wire.Header("x" * 256, "h:1", 0, 0, 0), wire.Ping(1, 2))
    with pytest.raises(ValueError, match="cannot encode NEW_GROUP"):
        wire.serialize(KEY, SCOPE, HEADER, wire.NewGroup(-1))
