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
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import re
import struct
from collections.abc import Callable
from typing import Any

import attrs
import construct as c

MAGIC = b"YPM2"
MAC_SIZE = 16
MAX_DATAGRAM = 60_000


class MalformedPacket(Exception):
    """The bytes are not a well-formed membership datagram."""


class BadMac(MalformedPacket):
    """The datagram's MAC does not verify with our key."""


class WrongScope(MalformedPacket):
    """The datagram belongs to another cluster or another node kind."""


_SCOPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_scope_name(value: str, what: str = "cluster name") -> str:
    """``value`` if it is 1-64 ASCII letters, digits, '.', '_' or '-' (not first)."""
    if not _SCOPE_NAME.fullmatch(value):
        raise ValueError(
            f"{what} {value!r}: use 1-64 ASCII letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit)"
        )
    return value


@attrs.frozen
class Scope:
    """The cluster (by name) and the node kind a datagram or RPC connection belongs to.

    Nodes of different kinds never share a scope, so they never form one group,
    whatever secret or name they are given.
    """

    cluster: str = attrs.field(validator=lambda _i, _a, v: check_scope_name(v))
    kind: str = attrs.field(validator=lambda _i, _a, v: check_scope_name(v, "node kind"))

    def __str__(self) -> str:
        return f"{self.kind}/{self.cluster}"


class MsgType(enum.IntEnum):
    """Datagram types."""

    PROBE = 1
    NEW_GROUP = 2
    REPLY = 3
    COMMIT = 4
    PING = 5
    ACK = 6
    TIME_REQ = 7
    TIME_RESP = 8
    PING_REQ = 9
    INDIRECT_ACK = 10


@attrs.frozen(order=True, cache_hash=True)
class Member:
    """A cluster member: its id, its cluster address ``host:port`` and its boot number.

    Members are hashed and sorted on every datagram a node handles (views are sets and
    sorted tuples of them), so the hash is cached and the sort key memoised.
    """

    node_id: str
    address: str
    incarnation: int = 0

    @property
    def sort_key(self) -> tuple[tuple[int, ...], int, str]:
        """Address order (numeric IPv4 when possible, then port), as TRM pings use it."""
        return _sort_key(self.address, self.node_id)


@functools.lru_cache(maxsize=4096)
def _sort_key(address: str, node_id: str) -> tuple[tuple[int, ...], int, str]:
    return (*address_key(address), node_id)


@functools.lru_cache(maxsize=4096)
def address_key(address: str) -> tuple[tuple[int, ...], int]:
    """Sort key of ``host:port``: dotted quads numerically, others by code points
    (memoised: a pure function of the string, asked for on every sort of a view)."""
    host, _, port = address.rpartition(":")
    try:
        parts = tuple(int(x) for x in host.split("."))
    except ValueError:
        parts = tuple(ord(ch) for ch in host)
    try:
        p = int(port)
    except ValueError:
        p = 0
    return (parts, p)


# --- bodies -----------------------------------------------------------------

_Str8 = c.PascalString(c.Int8ub, "utf8")
_MemberS = c.Struct("node_id" / _Str8, "address" / _Str8, "incarnation" / c.Int64ub)
_Members = c.PrefixedArray(c.Int16ub, _MemberS)


@attrs.frozen
class Probe:
    """A coordinator's periodic announcement to nodes outside its group."""

    epoch: int
    members: tuple[Member, ...]


@attrs.frozen
class NewGroup:
    """TRM round 1: coordinator proposes ``proposal`` for a new group."""

    proposal: int


@attrs.frozen
class Reply:
    """TRM round 2: a member's answer, with its own epoch proposal and view."""

    proposal: int
    coordinator: str
    epoch: int
    members: tuple[Member, ...]


@attrs.frozen
class Commit:
    """TRM round 3: the new group, its epoch, and an attachment (e.g. the user map)."""

    epoch: int
    members: tuple[Member, ...]
    attachment: bytes = b""


@attrs.frozen
class Ping:
    """Liveness check of the next-highest neighbour; carries the pinger's epoch."""

    epoch: int
    nonce: int


@attrs.frozen
class Ack:
    """Answer to a ping: the answerer's epoch and whether the pinger is in its view."""

    epoch: int
    nonce: int
    member: bool


@attrs.frozen
class TimeReq:
    """NTP-style request: ``t1`` is the requester's clock at send."""

    t1: float


@attrs.frozen
class TimeResp:
    """NTP-style response: ``t2`` receive and ``t3`` send times on the responder's clock."""

    t1: float
    t2: float
    t3: float


@attrs.frozen
class PingReq:
    """Indirect probe (SWIM ping-req): please ping ``target_id`` at ``target_address`` for me."""

    nonce: int
    target_id: str
    target_address: str


@attrs.frozen
class IndirectAck:
    """A relay's answer to :class:`PingReq` ``nonce``: the target answered (``ok``, with its
    ``epoch``) or did not within the relay's timeout (a nack: the relay itself is reachable)."""

    nonce: int
    target_id: str
    ok: bool
    epoch: int


Body = Probe | NewGroup | Reply | Commit | Ping | Ack | TimeReq | TimeResp | PingReq | IndirectAck

_BODY_STRUCTS: dict[MsgType, c.Construct] = {
    MsgType.PROBE: c.Struct("epoch" / c.Int64ub, "members" / _Members),
    MsgType.NEW_GROUP: c.Struct("proposal" / c.Int64ub),
    MsgType.REPLY: c.Struct(
        "proposal" / c.Int64ub,
        "coordinator" / _Str8,
        "epoch" / c.Int64ub,
        "members" / _Members,
    ),
    MsgType.COMMIT: c.Struct(
        "epoch" / c.Int64ub,
        "members" / _Members,
        "attachment" / c.Prefixed(c.Int32ub, c.GreedyBytes),
    ),
    MsgType.PING: c.Struct("epoch" / c.Int64ub, "nonce" / c.Int64ub),
    MsgType.ACK: c.Struct("epoch" / c.Int64ub, "nonce" / c.Int64ub, "member" / c.Flag),
    MsgType.TIME_REQ: c.Struct("t1" / c.Float64b),
    MsgType.TIME_RESP: c.Struct("t1" / c.Float64b, "t2" / c.Float64b, "t3" / c.Float64b),
    MsgType.PING_REQ: c.Struct("nonce" / c.Int64ub, "target_id" / _Str8, "target_address" / _Str8),
    MsgType.INDIRECT_ACK: c.Struct(
        "nonce" / c.Int64ub, "target_id" / _Str8, "ok" / c.Flag, "epoch" / c.Int64ub
    ),
}

_BODY_TYPES: dict[type, MsgType] = {
    Probe: MsgType.PROBE,
    NewGroup: MsgType.NEW_GROUP,
    Reply: MsgType.REPLY,
    Commit: MsgType.COMMIT,
    Ping: MsgType.PING,
    Ack: MsgType.ACK,
    TimeReq: MsgType.TIME_REQ,
    TimeResp: MsgType.TIME_RESP,
    PingReq: MsgType.PING_REQ,
    IndirectAck: MsgType.INDIRECT_ACK,
}

_Ascii8 = c.PascalString(c.Int8ub, "ascii")
_ScopePrefix = c.Struct("magic" / c.Const(MAGIC), "cluster" / _Ascii8, "kind" / _Ascii8)
_Envelope = c.Struct(
    "magic" / c.Const(MAGIC),
    "cluster" / _Ascii8,
    "kind" / _Ascii8,
    "type" / c.Int8ub,
    "sender" / _Str8,
    "address" / _Str8,
    "incarnation" / c.Int64ub,
    "seq" / c.Int64ub,
    "lamport" / c.Int64ub,
    "body" / c.Prefixed(c.Int16ub, c.GreedyBytes),
    c.Terminated,
)


@attrs.frozen
class Header:
    """Who sent a datagram, and its anti-replay and Lamport counters."""

    sender: str
    address: str
    incarnation: int
    seq: int
    lamport: int


@attrs.frozen
class Datagram:
    """A parsed, authenticated membership datagram."""

    header: Header
    body: Body


def _members_to_obj(members: tuple[Member, ...]) -> list[dict[str, object]]:
    return [
        {"node_id": m.node_id, "address": m.address, "incarnation": m.incarnation} for m in members
    ]


def _members_from_obj(obj: list[c.Container]) -> tuple[Member, ...]:
    return tuple(Member(m.node_id, m.address, m.incarnation) for m in obj)


def _body_to_obj(body: Body) -> dict[str, object]:
    d = attrs.asdict(body, recurse=False)
    if "members" in d:
        d["members"] = _members_to_obj(d["members"])
    return d


def _body_from_obj(kind: MsgType, obj: c.Container) -> Body:
    if kind is MsgType.PROBE:
        return Probe(obj.epoch, _members_from_obj(obj.members))
    if kind is MsgType.NEW_GROUP:
        return NewGroup(obj.proposal)
    if kind is MsgType.REPLY:
        return Reply(obj.proposal, obj.coordinator, obj.epoch, _members_from_obj(obj.members))
    if kind is MsgType.COMMIT:
        return Commit(obj.epoch, _members_from_obj(obj.members), bytes(obj.attachment))
    if kind is MsgType.PING:
        return Ping(obj.epoch, obj.nonce)
    if kind is MsgType.ACK:
        return Ack(obj.epoch, obj.nonce, bool(obj.member))
    if kind is MsgType.TIME_REQ:
        return TimeReq(obj.t1)
    if kind is MsgType.PING_REQ:
        return PingReq(obj.nonce, obj.target_id, obj.target_address)
    if kind is MsgType.INDIRECT_ACK:
        return IndirectAck(obj.nonce, obj.target_id, bool(obj.ok), obj.epoch)
    return TimeResp(obj.t1, obj.t2, obj.t3)


@functools.lru_cache(maxsize=64)
def _keyed(key: bytes) -> hmac.HMAC:
    """HMAC-SHA256 with ``key`` and no data: copying it skips the key schedule (two
    SHA-256 blocks) that every datagram would otherwise pay again."""
    return hmac.new(key, digestmod=hashlib.sha256)


def _mac(key: bytes, data: bytes) -> bytes:
    h = _keyed(key).copy()
    h.update(data)
    return h.digest()[:MAC_SIZE]


# --- the specification: construct, slow and obviously right ----------------------


def spec_serialize(key: bytes, scope: Scope, header: Header, body: Body) -> bytes:
    """:func:`serialize` as the construct specification writes it (the reference the
    fast codec is tested against, byte for byte)."""
    kind = _BODY_TYPES[type(body)]
    try:
        raw_body = _BODY_STRUCTS[kind].build(_body_to_obj(body))
        data = _Envelope.build(
            {
                "cluster": scope.cluster,
                "kind": scope.kind,
                "type": int(kind),
                "sender": header.sender,
                "address": header.address,
                "incarnation": header.incarnation,
                "seq": header.seq,
                "lamport": header.lamport,
                "body": raw_body,
            }
        )
    except c.ConstructError as e:
        raise ValueError(f"cannot encode {kind.name}: {e}") from e
    return data + _mac(key, data)


def _check_outer(data: bytes) -> tuple[bytes, bytes]:
    """Length and magic; the signed part and the MAC."""
    if len(data) < len(MAGIC) + MAC_SIZE or len(data) > MAX_DATAGRAM:
        raise MalformedPacket(f"bad length {len(data)}")
    if not data.startswith(MAGIC):
        raise MalformedPacket("bad magic")
    return data[:-MAC_SIZE], data[-MAC_SIZE:]


def _check_scope_spec(scope: Scope, signed: bytes) -> None:
    try:
        prefix = _ScopePrefix.parse(signed)
    except (c.ConstructError, UnicodeDecodeError) as e:
        raise MalformedPacket("truncated scope") from e
    if (prefix.cluster, prefix.kind) != (scope.cluster, scope.kind):
        # Counted apart from bad MACs: it is what a replayed datagram of a
        # neighbouring cluster looks like (the MAC would not verify either).
        raise WrongScope(f"datagram of {prefix.kind}/{prefix.cluster}, not {scope}")


def _parse_signed_spec(signed: bytes) -> Datagram:
    """The envelope and body of an authenticated datagram, by the construct spec."""
    try:
        env = _Envelope.parse(signed)
        kind = MsgType(env.type)
        body = _body_from_obj(kind, _BODY_STRUCTS[kind].parse(env.body))
    except (c.ConstructError, ValueError, UnicodeDecodeError) as e:
        raise MalformedPacket(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    header = Header(env.sender, env.address, env.incarnation, env.seq, env.lamport)
    return Datagram(header, body)


def spec_parse(key: bytes, scope: Scope, data: bytes) -> Datagram:
    """:func:`parse` as the construct specification reads it (the fast codec's reference:
    same result, same error class)."""
    signed, mac = _check_outer(data)
    _check_scope_spec(scope, signed)
    if not hmac.compare_digest(mac, _mac(key, signed)):
        raise BadMac("MAC does not verify")
    return _parse_signed_spec(signed)


# --- the fast codec: precompiled struct, same bytes ------------------------------
#
# Every datagram is encoded and decoded here, so this is the simulation kernel's and
# the nodes' hot path (STYLE 3: construct specifies, struct runs).  Out-of-range
# values and malformed input are not judged here: whatever fails falls back to the
# specification above, which raises its own error (so the error class and message
# are the spec's, by construction).

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
    kind = _BODY_TYPES[type(body)]
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
        (count,) = self.unpack(_H)
        out = []
        for _ in range(count):
            node_id = self.str8()
            address = self.str8()
            (inc,) = self.unpack(_Q)
            out.append(Member(node_id, address, inc))
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
    signed, mac = _check_outer(data)
    prefix = _scope_prefix(scope)
    if not signed.startswith(prefix):
        # Not ours, or not well formed: the specification says which.
        _check_scope_spec(scope, signed)
    if not hmac.compare_digest(mac, _mac(key, signed)):
        raise BadMac("MAC does not verify")
    try:
        return _parse_signed(signed, len(prefix))
    except _FALLBACK:
        return _parse_signed_spec(signed)


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
