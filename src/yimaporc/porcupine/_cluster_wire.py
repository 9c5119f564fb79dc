"""The values Porcupine's cluster commands carry and their codecs (moved out of
``cluster.py``): the :class:`Json` AMP argument, the manager errors that cross as
AMP errors (:data:`ERRORS`), the profile/digest/mailbox-info list forms and the
packed message and body batches (``MalformedAmpBox`` on junk).

The reconstruction's control plane is typed: :class:`HintList`, :class:`BucketList`,
:class:`HolderList` and :class:`RecordList` are AMP arguments that carry the same
JSON as before (mixed-version clusters keep talking) but hand the handler values
(:class:`~.reconstruct.BucketHint`, bucket numbers, ``(user, node)`` pairs, profile
records), checked once here: a box that is not the right shape is a
``MalformedAmpBox`` (the caller gets an error answer), a malformed item inside a
well-formed list is dropped.  Each has a pure ``encode``/``decode`` pair.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import struct
from collections.abc import Callable, Sequence
from typing import Any

from twisted.protocols import amp

from ..cluster.rpc import BigBytes, PeerUnavailable
from .profiledb import Record
from .reconstruct import BucketHint, decode_hints
from .usermap import N_BUCKETS, BadAddress, normalise
from .values import (
    BadCredentials,
    Digest,
    MailboxExists,
    MailboxHasChildren,
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


class _Typed(Json):
    """A :class:`Json` argument whose value is typed: ``encode(value)`` makes the JSON,
    ``decode(json)`` the value (``ValueError``/``TypeError``: a malformed box); each
    subclass defines both."""

    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        key = name.decode("ascii")
        objects[key] = self.encode(objects[key])
        super().toBox(name, strings, objects, proto)

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        super().fromBox(name, strings, objects, proto)
        key = name.decode("ascii")
        try:
            objects[key] = self.decode(objects[key])
        except (ValueError, TypeError) as e:
            raise amp.MalformedAmpBox(f"bad {name.decode('ascii', 'replace')}: {e}") from e


class HintList(_Typed):
    """``list[BucketHint]`` as ``[[bucket, epoch, [[user, has_mail, uidnext,
    unnumbered]...], [record...], mark, [[user, node]...]]...]``
    (:meth:`BucketHint.encode`); malformed entries are dropped."""

    @staticmethod
    def encode(value: Sequence[BucketHint]) -> list[Any]:
        return [h.encode() for h in value]

    @staticmethod
    def decode(obj: Any) -> list[BucketHint]:
        if not isinstance(obj, list):
            raise ValueError("hints must be a list")
        return decode_hints(obj, N_BUCKETS)


class BucketList(_Typed):
    """Bucket numbers: a list of at most ``N_BUCKETS`` integers in range; decoded
    sorted, without repeats."""

    @staticmethod
    def encode(value: Sequence[int]) -> list[int]:
        return [int(b) for b in value]

    @staticmethod
    def decode(obj: Any) -> tuple[int, ...]:
        if not isinstance(obj, list) or len(obj) > N_BUCKETS:
            raise ValueError("buckets must be a list of bucket numbers")
        if any(isinstance(b, bool) or not isinstance(b, int) for b in obj):
            raise ValueError("buckets must be a list of bucket numbers")
        wanted = sorted(set(obj))
        if wanted and not (0 <= wanted[0] and wanted[-1] < N_BUCKETS):
            raise ValueError("bucket number out of range")
        return tuple(wanted)


class HolderList(_Typed):
    """``(user, node)`` pairs as ``[[user, node]...]``; a malformed pair is dropped."""

    @staticmethod
    def encode(value: Sequence[tuple[str, str]]) -> list[list[str]]:
        return [[u, n] for u, n in value]

    @staticmethod
    def decode(obj: Any) -> tuple[tuple[str, str], ...]:
        if not isinstance(obj, list):
            raise ValueError("holders must be a list")
        return tuple(
            (h[0], h[1])
            for h in obj
            if isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h)
        )


class RecordList(_Typed):
    """Profile records (``address, password_hash, replicas, created, updated,
    deleted``) as lists; a malformed record (or one with a bad address) is dropped."""

    @staticmethod
    def encode(value: Sequence[Record]) -> list[list[Any]]:
        return [list(r) for r in value]

    @staticmethod
    def decode(obj: Any) -> list[Record]:
        if not isinstance(obj, list):
            raise ValueError("records must be a list")
        out: list[Record] = []
        for rec in obj:
            try:
                a, h, r, c, u, d = rec
                if not all(isinstance(x, str) for x in (a, h)):
                    continue
                out.append((normalise(a), h, int(r), float(c), float(u), bool(d)))
            except (BadAddress, TypeError, ValueError, AttributeError):
                continue
        return out


class HolderNotRecorded(PeerUnavailable):
    """No majority recorded a node as holder of a user's mail (the delivery answers a
    temporary error: the reconstruction would not find the message)."""


class AllocationLapsed(HolderNotRecorded):
    """A delivery's holder note came after its UID allocation had left the
    visibility horizon expired (its coordinator paused, or a very slow delivery):
    readers may have been shown higher UIDs, so the copy stored under it is not
    acknowledged (SMTP 451; the client's retry is its own message)."""


class StorageFull(PeerUnavailable):
    """The called node's mail storage is full: it could not open or write what the
    call needed (``ENOSPC``, SQLite's "database or disk is full").  To the caller the
    node is out of reach for this call (IMAP ``NO [UNAVAILABLE]``, POP3 ``-ERR
    [SYS/TEMP]``, SMTP 451), not a server bug; ``maybe_done``: a write may have
    partly run there."""

    maybe_done = True


def storage_full(e: BaseException | None) -> bool:
    """Is ``e`` the disk (or a quota) being full, as OS and SQLite report it?"""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(e, sqlite3.OperationalError) and (
        getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        or "database or disk is full" in str(e)
    )


class DeliveryRefused(Exception):
    """A delivery handed to the user's manager node was refused there with a
    permanent SMTP reply (its text: ``"CODE reply"``, e.g. ``"550 no such user"``)."""


class DeliveryDeferred(PeerUnavailable):
    """A delivery handed to the user's manager node failed there on a call between
    nodes: the message may be stored (``maybe_done``), so the receiving node answers
    a temporary error and does not try elsewhere."""

    maybe_done = True


ERRORS: dict[type[Exception], bytes] = {
    AllocationLapsed: b"ALLOCATION_LAPSED",
    HolderNotRecorded: b"HOLDER_NOT_RECORDED",
    DeliveryRefused: b"DELIVERY_REFUSED",
    DeliveryDeferred: b"DELIVERY_DEFERRED",
    NoSuchUser: b"NO_SUCH_USER",
    BadCredentials: b"BAD_CREDENTIALS",
    NoSuchMailbox: b"NO_SUCH_MAILBOX",
    MailboxExists: b"MAILBOX_EXISTS",
    MailboxHasChildren: b"MAILBOX_HAS_CHILDREN",
    UserExists: b"USER_EXISTS",
    MessageTooLarge: b"MESSAGE_TOO_LARGE",
    StorageFull: b"STORAGE_FULL",
    BadAddress: b"BAD_ADDRESS",
}


def _profile_out(p: Profile | None) -> Any:
    return None if p is None else [p.address, p.password_hash, p.replicas, p.created]


def _profile_in(v: Any) -> Profile | None:
    return None if v is None else Profile(str(v[0]), str(v[1]), int(v[2]), float(v[3]))


# MODSEQs ride last, optional: a node without them sends none and reads them as 0.
def _digest_out(d: Digest) -> list[Any]:
    return [d.uid, d.key, d.size, list(d.flags), d.internal_date, d.node, d.modseq]


def _digest_in(v: Any) -> Digest:
    modseq = int(v[6]) if len(v) > 6 else 0
    return Digest(int(v[0]), str(v[1]), int(v[2]), tuple(v[3]), float(v[4]), str(v[5]), modseq)


def _info_out(i: MailboxInfo) -> list[Any]:
    return [
        *(i.name, i.uidvalidity, i.uidnext, i.messages, i.unseen, i.subscribed),
        *(i.highestmodseq, i.modseq_bound),
    ]


def _info_in(v: Any) -> MailboxInfo:
    highest, bound = (int(v[6]), int(v[7])) if len(v) > 7 else (0, 0)
    return MailboxInfo(
        str(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]), bool(v[5]), highest, bound
    )


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
