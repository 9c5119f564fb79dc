"""The membership datagram format as a construct specification (docs/wire.md).

Slow and obviously right: :func:`spec_serialize` and :func:`spec_parse` are the
reference the fast codec in :mod:`.wire` is tested against, byte for byte and error
for error, and the codec falls back to them for anything it does not handle (values
out of range, malformed input), so their errors are the ones callers see.
"""

from __future__ import annotations

import functools
import hashlib
import hmac

import attrs
import construct as c

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
)

_Str8 = c.PascalString(c.Int8ub, "utf8")
_MemberS = c.Struct("node_id" / _Str8, "address" / _Str8, "incarnation" / c.Int64ub)
_Members = c.PrefixedArray(c.Int16ub, _MemberS)

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

BODY_TYPES: dict[type, MsgType] = {
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


def datagram_mac(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 of ``data`` with ``key``, truncated to :data:`MAC_SIZE` bytes."""
    h = _keyed(key).copy()
    h.update(data)
    return h.digest()[:MAC_SIZE]


def spec_serialize(key: bytes, scope: Scope, header: Header, body: Body) -> bytes:
    """:func:`serialize` as the construct specification writes it (the reference the
    fast codec is tested against, byte for byte)."""
    kind = BODY_TYPES[type(body)]
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
    return data + datagram_mac(key, data)


def check_outer(data: bytes) -> tuple[bytes, bytes]:
    """Length and magic; the signed part and the MAC."""
    if len(data) < len(MAGIC) + MAC_SIZE or len(data) > MAX_DATAGRAM:
        raise MalformedPacket(f"bad length {len(data)}")
    if not data.startswith(MAGIC):
        raise MalformedPacket("bad magic")
    return data[:-MAC_SIZE], data[-MAC_SIZE:]


def check_scope_spec(scope: Scope, signed: bytes) -> None:
    try:
        prefix = _ScopePrefix.parse(signed)
    except (c.ConstructError, UnicodeDecodeError) as e:
        raise MalformedPacket("truncated scope") from e
    if (prefix.cluster, prefix.kind) != (scope.cluster, scope.kind):
        # Counted apart from bad MACs: it is what a replayed datagram of a
        # neighbouring cluster looks like (the MAC would not verify either).
        raise WrongScope(f"datagram of {prefix.kind}/{prefix.cluster}, not {scope}")


def parse_signed_spec(signed: bytes) -> Datagram:
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
    signed, mac = check_outer(data)
    check_scope_spec(scope, signed)
    if not hmac.compare_digest(mac, datagram_mac(key, signed)):
        raise BadMac("MAC does not verify")
    return parse_signed_spec(signed)
