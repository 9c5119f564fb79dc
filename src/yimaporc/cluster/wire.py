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
import hashlib
import hmac
import re

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


@attrs.frozen(order=True)
class Member:
    """A cluster member: its id, its cluster address ``host:port`` and its boot number."""

    node_id: str
    address: str
    incarnation: int = 0

    @property
    def sort_key(self) -> tuple[tuple[int, ...], int, str]:
        """Address order (numeric IPv4 when possible, then port), as TRM pings use it."""
        return (*address_key(self.address), self.node_id)


def address_key(address: str) -> tuple[tuple[int, ...], int]:
    """Sort key of ``host:port``: dotted quads numerically, others by code points."""
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


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()[:MAC_SIZE]


def serialize(key: bytes, scope: Scope, header: Header, body: Body) -> bytes:
    """Encode one datagram of ``scope`` and MAC it with that scope's ``key``."""
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


def parse(key: bytes, scope: Scope, data: bytes) -> Datagram:
    """Verify and decode one datagram of ``scope``.

    Raises :class:`WrongScope` for a datagram that names another cluster or
    kind, :class:`BadMac` if the MAC does not verify with ``key`` (which is
    itself derived from the scope), :class:`MalformedPacket` otherwise.
    """
    if len(data) < len(MAGIC) + MAC_SIZE or len(data) > MAX_DATAGRAM:
        raise MalformedPacket(f"bad length {len(data)}")
    if not data.startswith(MAGIC):
        raise MalformedPacket("bad magic")
    signed, mac = data[:-MAC_SIZE], data[-MAC_SIZE:]
    try:
        prefix = _ScopePrefix.parse(signed)
    except (c.ConstructError, UnicodeDecodeError) as e:
        raise MalformedPacket("truncated scope") from e
    if (prefix.cluster, prefix.kind) != (scope.cluster, scope.kind):
        # Counted apart from bad MACs: it is what a replayed datagram of a
        # neighbouring cluster looks like (the MAC would not verify either).
        raise WrongScope(f"datagram of {prefix.kind}/{prefix.cluster}, not {scope}")
    if not hmac.compare_digest(mac, _mac(key, signed)):
        raise BadMac("MAC does not verify")
    try:
        env = _Envelope.parse(signed)
        kind = MsgType(env.type)
        body = _body_from_obj(kind, _BODY_STRUCTS[kind].parse(env.body))
    except (c.ConstructError, ValueError, UnicodeDecodeError) as e:
        raise MalformedPacket(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    header = Header(env.sender, env.address, env.incarnation, env.seq, env.lamport)
    return Datagram(header, body)


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
