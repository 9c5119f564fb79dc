"""Messages between replication managers, and their pure byte encoding.

Every message is one frame (see ``docs/replication.md``, "Wire")::

    magic "YPR1" | type u8 | body

    timestamp := wallclock i64 (microseconds) | node_id (u8-prefixed utf-8)
    Push      := object_id (u16-prefixed utf-8) | timestamp | has_body u8 |
                 [body (u32-prefixed)] | coordinator (u8-prefixed utf-8) |
                 targets (u8 count, each u8-prefixed utf-8)
    Ack       := object_id | timestamp
    Retire    := object_id | timestamp

The sender is not in the frame: the transport (an authenticated AMP
connection) knows it and passes it to :meth:`ReplicationManager.receive`.
"""

from __future__ import annotations

import enum

import attrs
import construct as c

from ._values import NodeId, Timestamp, Update

MAGIC = b"YPR1"
MAX_BODY = 64 * 1024 * 1024


class MalformedMessage(Exception):
    """The bytes are not a well-formed replication message."""


class _Type(enum.IntEnum):
    PUSH = 1
    ACK = 2
    RETIRE = 3


_Str8 = c.PascalString(c.Int8ub, "utf8")
_Str16 = c.PascalString(c.Int16ub, "utf8")
_Ts = c.Struct("wallclock" / c.Int64sb, "node_id" / _Str8)
_Push = c.Struct(
    "object_id" / _Str16,
    "ts" / _Ts,
    "has_body" / c.Int8ub,
    "body" / c.If(c.this.has_body == 1, c.Prefixed(c.Int32ub, c.GreedyBytes)),
    "coordinator" / _Str8,
    "targets" / c.PrefixedArray(c.Int8ub, _Str8),
    c.Terminated,
)
_Ref = c.Struct("object_id" / _Str16, "ts" / _Ts, c.Terminated)
_Frame = c.Struct("magic" / c.Const(MAGIC), "type" / c.Int8ub, "rest" / c.GreedyBytes)


def _ts(obj: c.Container) -> Timestamp:
    return Timestamp(obj.wallclock, obj.node_id)


def _ts_dict(ts: Timestamp) -> dict[str, object]:
    return {"wallclock": ts.wallclock, "node_id": ts.node_id}


def _frame(kind: _Type, rest: bytes) -> bytes:
    return MAGIC + bytes([kind]) + rest


@attrs.frozen
class Push:
    """An update pushed to a replica: apply it if newer, log it, then ack."""

    update: Update
    coordinator: NodeId
    targets: frozenset[NodeId]

    def to_bytes(self) -> bytes:
        """The frame of this message."""
        u = self.update
        if u.body is not None and len(u.body) > MAX_BODY:
            raise ValueError(f"body of {len(u.body)} bytes exceeds {MAX_BODY}")
        rest = _Push.build(
            {
                "object_id": u.object_id,
                "ts": _ts_dict(u.timestamp),
                "has_body": 0 if u.body is None else 1,
                "body": u.body,
                "coordinator": self.coordinator,
                "targets": sorted(self.targets),
            }
        )
        return _frame(_Type.PUSH, rest)

    @classmethod
    def from_bytes(cls, data: bytes) -> Push:
        """Parse a Push frame; raises :class:`MalformedMessage`."""
        msg = from_bytes(data)
        if not isinstance(msg, Push):
            raise MalformedMessage(f"expected Push, got {type(msg).__name__}")
        return msg


@attrs.frozen
class Ack:
    """A replica holds update ``timestamp`` of ``object_id`` (or something newer)."""

    object_id: str
    timestamp: Timestamp

    def to_bytes(self) -> bytes:
        """The frame of this message."""
        return _frame(_Type.ACK, _build_ref(self.object_id, self.timestamp))

    @classmethod
    def from_bytes(cls, data: bytes) -> Ack:
        """Parse an Ack frame; raises :class:`MalformedMessage`."""
        msg = from_bytes(data)
        if not isinstance(msg, Ack):
            raise MalformedMessage(f"expected Ack, got {type(msg).__name__}")
        return msg


@attrs.frozen
class Retire:
    """Every replica acknowledged update ``timestamp``: drop its log entry."""

    object_id: str
    timestamp: Timestamp

    def to_bytes(self) -> bytes:
        """The frame of this message."""
        return _frame(_Type.RETIRE, _build_ref(self.object_id, self.timestamp))

    @classmethod
    def from_bytes(cls, data: bytes) -> Retire:
        """Parse a Retire frame; raises :class:`MalformedMessage`."""
        msg = from_bytes(data)
        if not isinstance(msg, Retire):
            raise MalformedMessage(f"expected Retire, got {type(msg).__name__}")
        return msg


Message = Push | Ack | Retire


def _build_ref(object_id: str, ts: Timestamp) -> bytes:
    return _Ref.build({"object_id": object_id, "ts": _ts_dict(ts)})


def to_bytes(message: Message) -> bytes:
    """The frame of any message."""
    return message.to_bytes()


def from_bytes(data: bytes) -> Message:
    """Parse any frame into its message; raises :class:`MalformedMessage`."""
    try:
        frame = _Frame.parse(data)
        kind = frame.type
        if kind == _Type.PUSH:
            p = _Push.parse(frame.rest)
            if p.has_body not in (0, 1):
                raise MalformedMessage(f"bad has_body flag {p.has_body}")
            body = None if p.has_body == 0 else bytes(p.body)
            update = Update(p.object_id, _ts(p.ts), body)
            return Push(update, p.coordinator, frozenset(p.targets))
        if kind in (_Type.ACK, _Type.RETIRE):
            r = _Ref.parse(frame.rest)
            cls = Ack if kind == _Type.ACK else Retire
            return cls(r.object_id, _ts(r.ts))
    except MalformedMessage:
        raise
    except (c.ConstructError, UnicodeDecodeError) as e:
        raise MalformedMessage(str(e)) from e
    raise MalformedMessage(f"unknown message type {kind}")
