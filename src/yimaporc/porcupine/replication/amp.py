"""Replication frames over the node's authenticated AMP RPC.

:class:`Replicate` carries ``Push``/``Ack``/``Retire`` frames (:mod:`._wire`), a
batch per call (:func:`pack_frames`), as :class:`~yimaporc.cluster.rpc.BigBytes`.  The sender is not
an argument: :class:`PeerNode` fills it in on the receiving side from the
connection's authenticated peer id (the handshake binds it to the cluster key),
so a node cannot speak for another.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail
from twisted.protocols import amp

from ...cluster.rpc import BigBytes, NodeAMP, PeerMaybeDone, PeerUnavailable, RpcRegistry
from ..values import Digest, NewMessage, NoSuchMailbox
from ._values import NodeId
from ._wire import MalformedMessage, from_bytes
from .objects import MalformedObject
from .shell import ReplicationRefused, ReplicationService, Send

if TYPE_CHECKING:
    from ...cluster.interfaces import IClusterNode


class PeerNode(amp.Argument):
    """Never on the wire: the receiving connection's authenticated peer id."""

    def __init__(self) -> None:
        super().__init__(optional=True)

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        objects.pop(name.decode("ascii"), None)

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        peer = proto.peer_id if isinstance(proto, NodeAMP) else None
        if peer is None or not proto.authenticated:
            raise amp.RemoteAmpError(b"UNAUTHENTICATED", "replication frame before handshake")
        objects[name.decode("ascii")] = peer


def pack_frames(frames: list[bytes]) -> bytes:
    """Frames as one blob: each a u32 big-endian length, then its bytes."""
    return b"".join(struct.pack(">I", len(f)) + f for f in frames)


def unpack_frames(blob: bytes) -> list[bytes]:
    """The frames of :func:`pack_frames`; raises ``MalformedMessage``."""
    out, i = [], 0
    while i < len(blob):
        if i + 4 > len(blob):
            raise MalformedMessage("truncated frame length")
        (n,) = struct.unpack_from(">I", blob, i)
        i += 4
        if i + n > len(blob):
            raise MalformedMessage("truncated frame")
        out.append(blob[i : i + n])
        i += n
    return out


class Replicate(amp.Command):
    """Replication frames from the calling node, in order; answered once handed to the core.

    The answer says nothing about durability: acknowledgements are frames of
    their own, sent when the receiver's writes are on disk.
    """

    commandName = b"yimaporc.porcupine.replicate"
    arguments = [(b"frames", BigBytes()), (b"sender", PeerNode())]
    response = []  # type: ignore[var-annotated]
    errors = {
        MalformedMessage: b"REPLICATION_MALFORMED",
        ReplicationRefused: b"REPLICATION_REFUSED",
    }


def responder(service: ReplicationService) -> Any:
    """The handler to register for :class:`Replicate`."""

    def handle(frames: bytes, sender: str) -> dict[str, Any]:
        batch = unpack_frames(frames)
        for frame in batch:
            from_bytes(frame)  # all well-formed, or none is handled
        for frame in batch:
            service.receive(sender, frame)
        return {}

    return handle


def register(registry: RpcRegistry, service: ReplicationService) -> None:
    """Answer :class:`Replicate` on this node's RPC server."""
    registry.register(Replicate, responder(service))


def node_sender(node: IClusterNode) -> Send:
    """``send(node_id, frame)`` over ``node.rpc`` to the address in the current view."""

    def send(to: NodeId, frames: list[bytes]) -> Deferred[Any]:
        member = node.view.member(to)
        if member is None:
            return fail(PeerUnavailable(f"{to} is not in the view"))
        d: Deferred[Any] = node.rpc.call(member.address, Replicate, frames=pack_frames(frames))
        return d

    return send


class CoordinatorUnsure(PeerMaybeDone):
    """The coordinator could not complete a replicated store (its peers out of reach,
    or it is stopping) but may have logged it: the caller must not coordinate it
    again elsewhere (a second copy under another UID)."""


class StoreReplicated(amp.Command):
    """Coordinate the replicated store of one message on the called node.

    The delivery proxy names the object (``rid``) and its replica set; the
    called node must be one of ``targets``.  Answered with the coordinator's
    digest once the replication service acknowledged the update (durable in
    its log and store, and on a second replica when configured).
    """

    commandName = b"yimaporc.porcupine.store-replicated"
    arguments = [
        (b"rid", amp.Unicode()),
        (b"user", amp.Unicode()),
        (b"mailbox", amp.Unicode()),
        (b"body", BigBytes()),
        (b"flags", amp.ListOf(amp.Unicode())),
        (b"date", amp.Float()),
        (b"uid", amp.Integer()),
        (b"targets", amp.ListOf(amp.Unicode())),
        # copies before the answer (the live targets; absent: the configured default)
        (b"acks", amp.Integer(optional=True)),
        # the UID's fence (issue 14 bug 2): checked by the coordinator for its copy
        (b"fence", amp.Unicode(optional=True)),
    ]
    response = [
        (b"uid", amp.Integer()),
        (b"key", amp.Unicode()),
        (b"size", amp.Integer()),
        (b"flags", amp.ListOf(amp.Unicode())),
        (b"date", amp.Float()),
    ]
    errors = {
        ReplicationRefused: b"REPLICATION_REFUSED",
        NoSuchMailbox: b"NO_SUCH_MAILBOX",
        MalformedObject: b"REPLICATION_MALFORMED",
        CoordinatorUnsure: b"REPLICATION_UNSURE",
    }


def digest_out(d: Digest) -> dict[str, Any]:
    """A digest as the answer of :class:`StoreReplicated`."""
    return {"uid": d.uid, "key": d.key, "size": d.size, "flags": list(d.flags), "date": d.internal_date}  # fmt: skip


def digest_in(r: dict[str, Any], node: str) -> Digest:
    """The answer of :class:`StoreReplicated` as a digest of ``node``."""
    return Digest(r["uid"], r["key"], r["size"], tuple(r["flags"]), r["date"], node)


def message_args(rid: str, message: NewMessage, targets: list[str]) -> dict[str, Any]:
    """The arguments of :class:`StoreReplicated`."""
    args = {
        "rid": rid,
        "user": message.user,
        "mailbox": message.mailbox,
        "body": message.body,
        "flags": list(message.flags),
        "date": message.internal_date,
        "uid": message.uid,
        "targets": targets,
    }
    if message.fence:
        args["fence"] = message.fence
    return args


def message_in(kw: dict[str, Any]) -> tuple[str, NewMessage, list[str]]:
    """``(rid, message, targets)`` from the arguments of :class:`StoreReplicated`."""
    msg = NewMessage(
        kw["user"],
        kw["mailbox"],
        kw["body"],
        tuple(kw["flags"]),
        kw["date"],
        kw["uid"],
        str(kw.get("fence") or ""),
    )
    return kw["rid"], msg, list(kw["targets"])
