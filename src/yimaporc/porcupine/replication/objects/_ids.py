"""The replicated objects' ids and bodies, per kind: messages (``msg/<user>/<rid>``,
:class:`MessageObject`), profiles (``profile/<address>``) and mailboxes
(``box/<user>/<mailbox>``, :class:`BoxObject`); and :class:`ObjectRecord`, what a
node knows of one message object."""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

from .._values import Timestamp

MSG = "msg/"


PROFILE = "profile/"


BOX = "box/"


_RID = re.compile(r"^[0-9a-f]{32}$")


class MalformedObject(ValueError):
    """An object id or body that is not one of ours."""


def message_id(user: str, rid: str) -> str:
    """The object id of message ``rid`` of ``user``."""
    return f"{MSG}{user}/{rid}"


def profile_id(address: str) -> str:
    """The object id of ``address``'s profile."""
    return f"{PROFILE}{address}"


def parse_message_id(object_id: str) -> tuple[str, str]:
    """``(user, rid)``; raises :class:`MalformedObject`."""
    rest = object_id[len(MSG) :]
    user, _, rid = rest.rpartition("/")
    if not object_id.startswith(MSG) or not _RID.match(rid) or not user or "/" in user:
        raise MalformedObject(f"not a message object id: {object_id!r}")
    if user.startswith(".") or "\0" in user:
        raise MalformedObject(f"bad user in {object_id!r}")
    return user, rid


def box_id(user: str, name: str) -> str:
    """The object id of ``user``'s mailbox ``name``."""
    return f"{BOX}{user}/{_mailbox(name)}"


def parse_box_id(object_id: str) -> tuple[str, str]:
    """``(user, mailbox)``; raises :class:`MalformedObject`."""
    user, sep, name = object_id[len(BOX) :].partition("/")
    if not object_id.startswith(BOX) or not sep or not user or not name or "\0" in object_id:
        raise MalformedObject(f"not a mailbox object id: {object_id!r}")
    if user.startswith("."):
        raise MalformedObject(f"bad user in {object_id!r}")
    return user, name


@attrs.frozen
class BoxObject:
    """The replicated state of one mailbox name: it exists (``moved_from``: made by a
    RENAME of that mailbox) or not (``moved_to``: renamed to that name)."""

    exists: bool
    moved_from: str | None = None
    moved_to: str | None = None

    def to_body(self) -> bytes:
        """JSON."""
        meta = {"v": 1, "exists": self.exists, "from": self.moved_from, "to": self.moved_to}
        return json.dumps(meta, separators=(",", ":")).encode()

    @classmethod
    def from_body(cls, body: bytes) -> BoxObject:
        """Parse; raises :class:`MalformedObject`."""
        try:
            meta = json.loads(body)
            if meta.get("v") != 1:
                raise ValueError("not version 1")
            frm, to = meta.get("from"), meta.get("to")
            return cls(
                bool(meta["exists"]),
                None if frm is None else str(frm),
                None if to is None else str(to),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise MalformedObject(f"bad mailbox object: {e}") from e


def key_of(rid: str) -> str:
    """The fragment-store key (body file name) of message ``rid`` on every replica."""
    return rid + ".m"


@attrs.frozen
class MessageObject:
    """The replicated body of one message: where it lives, its flags, its octets."""

    mailbox: str
    data: bytes
    flags: tuple[str, ...] = ()
    internal_date: float = 0.0
    uid: int = 0
    targets: tuple[str, ...] = ()

    def to_body(self) -> bytes:
        """A JSON line, then the message octets."""
        meta = {
            "v": 1,
            "mailbox": self.mailbox,
            "flags": list(self.flags),
            "date": self.internal_date,
            "uid": self.uid,
            "targets": list(self.targets),
        }
        return json.dumps(meta, separators=(",", ":")).encode() + b"\n" + self.data

    @classmethod
    def from_body(cls, body: bytes) -> MessageObject:
        """Parse; raises :class:`MalformedObject`."""
        head, sep, data = body.partition(b"\n")
        try:
            meta = json.loads(head)
            if not sep or meta.get("v") != 1:
                raise ValueError("no version-1 header")
            flags = tuple(str(f) for f in meta["flags"])
            targets = tuple(str(t) for t in meta["targets"])
            mailbox = str(meta["mailbox"])
            return cls(mailbox, data, flags, float(meta["date"]), int(meta["uid"]), targets)
        except (ValueError, KeyError, TypeError) as e:
            raise MalformedObject(f"bad message object: {e}") from e


@attrs.frozen
class ObjectRecord:
    """What a node knows of one replicated message: version, place, replica set."""

    object_id: str
    timestamp: Timestamp
    user: str
    mailbox: str
    rid: str
    targets: tuple[str, ...]
    deleted: bool


def _mailbox(name: str) -> str:
    return "INBOX" if name.upper() == "INBOX" else name


def _record(row: Any) -> ObjectRecord:
    oid, wall, node, user, mailbox, rid, targets, deleted = row
    return ObjectRecord(
        oid,
        Timestamp(int(wall), str(node)),
        user,
        mailbox,
        rid,
        tuple(t for t in targets.split("\n") if t),
        bool(deleted),
    )
