"""Membership datagrams on the wire: pure parse/serialize, MACed, replay-checked.

Every datagram is one envelope (see docs/wire.md, "Cluster membership datagrams")::

    magic "YPM2" | cluster name (u8-prefixed ascii) | node kind (u8-prefixed ascii) |
    type u8 | sender node id (u8-prefixed utf-8) |
    sender address (u8-prefixed "host:port") | incarnation u64 | seq u64 |
    lamport u64 | body (u16-prefixed) | mac (16 bytes)

The MAC is HMAC-SHA256 (truncated to 16 bytes) over everything before it, keyed
with the membership key of this cluster and kind (see
:func:`yimaporc.secret.cluster_key`).  It is checked before the body is parsed.
A datagram is bound to one :class:`Scope` twice over: the scope is in the key
and in the MACed header, so a genuine datagram of one cluster (or node kind) is
refused by every other cluster, even one that shares the secret.
``(incarnation, seq)`` lets a receiver refuse replays (see :class:`ReplayGuard`).

Layout: the values live in :mod:`._wiretypes`, the format's construct specification
in :mod:`._wirespec` (:func:`spec_serialize`, :func:`spec_parse`); this module is the
public face and the hot path: :func:`serialize` and :func:`parse` on precompiled
``struct``, tested against the specification byte for byte, error for error.
"""

from __future__ import annotations

import functools
import hmac
import struct
from collections.abc import Callable
from typing import Any

from ._wirespec import (
    BODY_TYPES,
    check_outer,
    check_scope_spec,
    parse_signed_spec,
    spec_parse,
    spec_serialize,
)
from ._wirespec import (
    datagram_mac as _mac,
)
from ._wiretypes import (
    MAC_SIZE,
    MAGIC,
    MAX_DATAGRAM,
    Ack,
    BadMac,
    Body,
    Commit,
    Datagram,
    Header,
    IndirectAck,
    MalformedPacket,
    Member,
    MsgType,
    NewGroup,
    Ping,
    PingReq,
    Probe,
    Reply,
    Scope,
    TimeReq,
    TimeResp,
    WrongScope,
    address_key,
    check_scope_name,
)

__all__ = [
    "MAC_SIZE",
    "MAGIC",
    "MAX_DATAGRAM",
    "Ack",
    "BadMac",
    "Body",
    "Commit",
    "Datagram",
    "Header",
    "IndirectAck",
    "MalformedPacket",
    "Member",
    "MsgType",
    "NewGroup",
    "Ping",
    "PingReq",
    "Probe",
    "ReplayGuard",
    "Reply",
    "Scope",
    "TimeReq",
    "TimeResp",
    "WrongScope",
    "address_key",
    "check_scope_name",
    "parse",
    "serialize",
    "spec_parse",
    "spec_serialize",
]


# --- the fast codec: precompiled struct, same bytes ------------------------------
#
# Every datagram is encoded and decoded here, so this is the simulation kernel's and
# the nodes' hot path (STYLE 3: construct specifies, struct runs).  Out-of-range
# values and malformed input are not judged here: whatever fails falls back to the
# specification (:mod:`._wirespec`), which raises its own error (so the error class
# and message are the spec's, by construction).

_B = struct.Struct(">B")
_H = struct.Struct(">H")
_I = struct.Struct(">I")
_Q = struct.Struct(">Q")
_QQ = struct.Struct(">QQ")
_QQB = struct.Struct(">QQB")
_BQ = struct.Struct(">BQ")
_d = struct.Struct(">d")
_ddd = struct.Struct(">ddd")
_HEADER_TAIL = struct.Struct(">QQQH")
_pack_B = _B.pack
_pack_Q = _Q.pack

#: What a fast encoder or decoder raises on values or bytes it cannot handle (then
#: the specification decides).
_FALLBACK = (struct.error, LookupError, ValueError, TypeError, AttributeError, OverflowError)


def _str8(value: str) -> bytes:
    raw = value.encode("utf-8")
    return _pack_B(len(raw)) + raw


def _enc_members(members: tuple[Member, ...]) -> bytes:
    parts = [_H.pack(len(members))]
    for m in members:
        parts.append(_str8(m.node_id) + _str8(m.address) + _pack_Q(m.incarnation))
    return b"".join(parts)


def _enc_probe(b: Probe) -> bytes:
    return _pack_Q(b.epoch) + _enc_members(b.members)


def _enc_reply(b: Reply) -> bytes:
    return _pack_Q(b.proposal) + _str8(b.coordinator) + _pack_Q(b.epoch) + _enc_members(b.members)


def _enc_commit(b: Commit) -> bytes:
    att = b.attachment
    return _pack_Q(b.epoch) + _enc_members(b.members) + _I.pack(len(att)) + att


def _enc_indirect_ack(b: IndirectAck) -> bytes:
    return _pack_Q(b.nonce) + _str8(b.target_id) + _BQ.pack(1 if b.ok else 0, b.epoch)


#: One encoder per body type (attrs classes are final here: ``type(body)`` is exact).
_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    Probe: _enc_probe,
    NewGroup: lambda b: _pack_Q(b.proposal),
    Reply: _enc_reply,
    Commit: _enc_commit,
    Ping: lambda b: _QQ.pack(b.epoch, b.nonce),
    Ack: lambda b: _QQB.pack(b.epoch, b.nonce, 1 if b.member else 0),
    TimeReq: lambda b: _d.pack(b.t1),
    TimeResp: lambda b: _ddd.pack(b.t1, b.t2, b.t3),
    PingReq: lambda b: _pack_Q(b.nonce) + _str8(b.target_id) + _str8(b.target_address),
    IndirectAck: _enc_indirect_ack,
}


@functools.lru_cache(maxsize=64)
def _scope_prefix(scope: Scope) -> bytes:
    """MAGIC and the scope as every datagram of ``scope`` starts."""
    cluster, kind = scope.cluster.encode("ascii"), scope.kind.encode("ascii")
    return MAGIC + _pack_B(len(cluster)) + cluster + _pack_B(len(kind)) + kind


def serialize(key: bytes, scope: Scope, header: Header, body: Body) -> bytes:
    """Encode one datagram of ``scope`` and MAC it with that scope's ``key``.

    Raises ``ValueError`` for a value the format cannot carry (a string over 255
    bytes, an integer out of range...)."""
    kind = BODY_TYPES[type(body)]
    try:
        raw_body = _ENCODERS[type(body)](body)
        data = b"".join(
            (
                _scope_prefix(scope),
                _pack_B(kind),
                _str8(header.sender),
                _str8(header.address),
                _HEADER_TAIL.pack(header.incarnation, header.seq, header.lamport, len(raw_body)),
                raw_body,
            )
        )
    except _FALLBACK:
        return spec_serialize(key, scope, header, body)
    return data + _mac(key, data)


class _Reader:
    """A cursor over an authenticated datagram's bytes; raises ``IndexError`` when short."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        p = self.pos
        end = p + n
        if end > len(self.data):
            raise IndexError("short")
        self.pos = end
        return self.data[p:end]

    def str8(self) -> str:
        data, p = self.data, self.pos
        end = p + 1 + data[p]
        if end > len(data):
            raise IndexError("short")
        self.pos = end
        return data[p + 1 : end].decode("utf-8")

    def unpack(self, s: struct.Struct) -> tuple[Any, ...]:
        values = s.unpack_from(self.data, self.pos)
        self.pos += s.size
        return values

    def members(self) -> tuple[Member, ...]:
        # The longest body (a Probe or Commit names every member): one loop, locals only.
        (count,) = self.unpack(_H)
        data, p, n = self.data, self.pos, len(self.data)
        unpack_q = _Q.unpack_from
        out = []
        for _ in range(count):
            end = p + 1 + data[p]
            node_id = data[p + 1 : end].decode("utf-8")
            p = end + 1 + data[end]
            address = data[end + 1 : p].decode("utf-8")
            if p > n:
                raise IndexError("short")
            (inc,) = unpack_q(data, p)
            p += 8
            out.append(Member(node_id, address, inc))
        self.pos = p
        return tuple(out)


def _dec_ack(r: _Reader) -> Ack:
    epoch, nonce, member = r.unpack(_QQB)
    return Ack(epoch, nonce, member != 0)


def _dec_probe(r: _Reader) -> Probe:
    (epoch,) = r.unpack(_Q)
    return Probe(epoch, r.members())


def _dec_ping_req(r: _Reader) -> PingReq:
    (nonce,) = r.unpack(_Q)
    target_id = r.str8()
    return PingReq(nonce, target_id, r.str8())


def _dec_indirect_ack(r: _Reader) -> IndirectAck:
    (nonce,) = r.unpack(_Q)
    target = r.str8()
    ok, epoch = r.unpack(_BQ)
    return IndirectAck(nonce, target, ok != 0, epoch)


def _dec_reply(r: _Reader) -> Reply:
    (proposal,) = r.unpack(_Q)
    coordinator = r.str8()
    (epoch,) = r.unpack(_Q)
    return Reply(proposal, coordinator, epoch, r.members())


def _dec_commit(r: _Reader) -> Commit:
    (epoch,) = r.unpack(_Q)
    members = r.members()
    (n,) = r.unpack(_I)
    return Commit(epoch, members, r.take(n))


#: One decoder per type code; trailing bytes after a body are ignored, as
#: construct's ``Struct.parse`` does.  An unknown code is a ``KeyError`` (fallback).
_DECODERS: dict[int, Callable[[_Reader], Body]] = {
    MsgType.PROBE: _dec_probe,
    MsgType.NEW_GROUP: lambda r: NewGroup(*r.unpack(_Q)),
    MsgType.REPLY: _dec_reply,
    MsgType.COMMIT: _dec_commit,
    MsgType.PING: lambda r: Ping(*r.unpack(_QQ)),
    MsgType.ACK: _dec_ack,
    MsgType.TIME_REQ: lambda r: TimeReq(*r.unpack(_d)),
    MsgType.TIME_RESP: lambda r: TimeResp(*r.unpack(_ddd)),
    MsgType.PING_REQ: _dec_ping_req,
    MsgType.INDIRECT_ACK: _dec_indirect_ack,
}


def _parse_signed(signed: bytes, start: int) -> Datagram:
    r = _Reader(signed, start)
    (kind,) = r.unpack(_B)
    sender = r.str8()
    address = r.str8()
    inc, seq, lamport, n = r.unpack(_HEADER_TAIL)
    if r.pos + n != len(signed):  # the body is the rest (construct's Terminated)
        raise IndexError("body length")
    body = _DECODERS[kind](_Reader(signed[r.pos :], 0))
    return Datagram(Header(sender, address, inc, seq, lamport), body)


def parse(key: bytes, scope: Scope, data: bytes) -> Datagram:
    """Verify and decode one datagram of ``scope``.

    Raises :class:`WrongScope` for a datagram that names another cluster or
    kind, :class:`BadMac` if the MAC does not verify with ``key`` (which is
    itself derived from the scope), :class:`MalformedPacket` otherwise.
    """
    signed, mac = check_outer(data)
    prefix = _scope_prefix(scope)
    if not signed.startswith(prefix):
        # Not ours, or not well formed: the specification says which.
        check_scope_spec(scope, signed)
    if not hmac.compare_digest(mac, _mac(key, signed)):
        raise BadMac("MAC does not verify")
    try:
        return _parse_signed(signed, len(prefix))
    except _FALLBACK:
        return parse_signed_spec(signed)


class ReplayGuard:
    """Refuses datagrams already seen or from an older incarnation of the sender.

    Per sender, the newest incarnation and a 64-wide sliding window of sequence
    numbers (as IPsec does), so UDP reordering within the window is tolerated.
    """

    WINDOW = 64

    def __init__(self) -> None:
        self._state: dict[str, tuple[int, int, int]] = {}

    def check(self, header: Header) -> bool:
        """True if ``header`` is fresh; records it as seen."""
        state = self._state.get(header.sender)
        if state is None or header.incarnation > state[0]:
            self._state[header.sender] = (header.incarnation, header.seq, 1)
            return True
        inc, top, bits = state
        if header.incarnation < inc:
            return False
        if header.seq > top:
            shift = header.seq - top
            bits = ((bits << shift) | 1) & ((1 << self.WINDOW) - 1) if shift < self.WINDOW else 1
            self._state[header.sender] = (inc, header.seq, bits)
            return True
        offset = top - header.seq
        if offset >= self.WINDOW or bits & (1 << offset):
            return False
        self._state[header.sender] = (inc, top, bits | (1 << offset))
        return True
