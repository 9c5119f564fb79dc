"""The values Porcupine's cluster commands carry and their codecs (moved out of
``cluster.py``): the :class:`Json` AMP argument, the manager errors that cross as
AMP errors (:data:`ERRORS`), the profile/digest/mailbox-info list forms and the
packed message and body batches (``MalformedAmpBox`` on junk).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

from twisted.protocols import amp

from ..cluster.rpc import BigBytes, PeerUnavailable
from .usermap import BadAddress
from .values import (
    BadCredentials,
    Digest,
    MailboxExists,
    MailboxInfo,
    MessageTooLarge,
    NewMessage,
    NoSuchMailbox,
    NoSuchUser,
    Profile,
    UserExists,
)


class Json(BigBytes):
    """Any JSON value, of any size (split like :class:`BigBytes`)."""

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        key = name.decode("ascii")
        objects[key] = json.dumps(objects[key], separators=(",", ":")).encode("utf-8")
        super().toBox(name, strings, objects, proto)

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        super().fromBox(name, strings, objects, proto)
        key = name.decode("ascii")
        try:
            objects[key] = json.loads(objects[key])
        except ValueError as e:
            raise amp.MalformedAmpBox(f"bad JSON in {name!r}") from e


class HolderNotRecorded(PeerUnavailable):
    """No majority recorded a node as holder of a user's mail (the delivery answers a
    temporary error: the reconstruction would not find the message)."""


ERRORS: dict[type[Exception], bytes] = {
    HolderNotRecorded: b"HOLDER_NOT_RECORDED",
    NoSuchUser: b"NO_SUCH_USER",
    BadCredentials: b"BAD_CREDENTIALS",
    NoSuchMailbox: b"NO_SUCH_MAILBOX",
    MailboxExists: b"MAILBOX_EXISTS",
    UserExists: b"USER_EXISTS",
    MessageTooLarge: b"MESSAGE_TOO_LARGE",
    BadAddress: b"BAD_ADDRESS",
}


def _profile_out(p: Profile | None) -> Any:
    return None if p is None else [p.address, p.password_hash, p.replicas, p.created]


def _profile_in(v: Any) -> Profile | None:
    return None if v is None else Profile(str(v[0]), str(v[1]), int(v[2]), float(v[3]))


def _digest_out(d: Digest) -> list[Any]:
    return [d.uid, d.key, d.size, list(d.flags), d.internal_date, d.node]


def _digest_in(v: Any) -> Digest:
    return Digest(int(v[0]), str(v[1]), int(v[2]), tuple(v[3]), float(v[4]), str(v[5]))


def _info_out(i: MailboxInfo) -> list[Any]:
    return [i.name, i.uidvalidity, i.uidnext, i.messages, i.unseen, i.subscribed]


def _info_in(v: Any) -> MailboxInfo:
    return MailboxInfo(str(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]), bool(v[5]))


def pack_messages(messages: Sequence[NewMessage]) -> bytes:
    """A JSON header (everything but the bodies) followed by the bodies."""
    head = json.dumps(
        [
            [m.user, m.mailbox, list(m.flags), m.internal_date, m.uid, len(m.body), m.fence]
            for m in messages
        ]
    ).encode("utf-8")
    return struct.pack("!I", len(head)) + head + b"".join(m.body for m in messages)


def unpack_messages(data: bytes) -> list[NewMessage]:
    """The inverse of :func:`pack_messages` (``MalformedAmpBox`` on junk)."""
    try:
        (n,) = struct.unpack("!I", data[:4])
        head = json.loads(data[4 : 4 + n])
        pos = 4 + n
        out = []
        for entry in head:
            user, mailbox, flags, date, uid, size = entry[:6]
            fence = str(entry[6]) if len(entry) > 6 else ""
            body = data[pos : pos + int(size)]
            if len(body) != int(size):
                raise ValueError("short body")
            pos += int(size)
            out.append(
                NewMessage(
                    str(user), str(mailbox), body, tuple(flags), float(date), int(uid), fence
                )
            )
        return out
    except (ValueError, TypeError, struct.error) as e:
        raise amp.MalformedAmpBox(f"bad message batch: {e}") from e


def pack_bodies(bodies: dict[int, bytes]) -> bytes:
    """``{uid: body}`` as a JSON header of (uid, size) then the bodies."""
    items = sorted(bodies.items())
    head = json.dumps([[uid, len(b)] for uid, b in items]).encode("utf-8")
    return struct.pack("!I", len(head)) + head + b"".join(b for _, b in items)


def unpack_bodies(data: bytes) -> dict[int, bytes]:
    """The inverse of :func:`pack_bodies`."""
    (n,) = struct.unpack("!I", data[:4])
    pos, out = 4 + n, {}
    for uid, size in json.loads(data[4 : 4 + n]):
        out[int(uid)] = data[pos : pos + int(size)]
        pos += int(size)
    return out
