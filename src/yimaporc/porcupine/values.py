"""Plain values that cross the managers' seams (and, in the cluster, AMP).

Everything here is made of str, int, float, bool, bytes and tuples of them,
so each value maps one-to-one onto AMP arguments.
"""

from __future__ import annotations

import attrs

INBOX = "INBOX"
DELIMITER = "/"


class MailError(Exception):
    """Base of the managers' errors (each maps onto a protocol-level reply)."""


class UserExists(MailError):
    """``adduser`` of an address that already has a profile."""


class NoSuchUser(MailError):
    """An address with no profile."""


class BadCredentials(MailError):
    """Wrong address or password."""


class NoSuchMailbox(MailError):
    """A mailbox name the user does not have."""


class MailboxExists(MailError):
    """``CREATE`` or ``RENAME`` onto a name in use."""


class MessageTooLarge(MailError):
    """A message over the configured size limit."""


@attrs.frozen
class Profile:
    """One user's hard profile: the scrypt hash, never the password."""

    address: str
    password_hash: str
    replicas: int = 1
    created: float = 0.0

    def public(self) -> dict[str, object]:
        """The JSON the admin API shows (no hash)."""
        return {"address": self.address, "replicas": self.replicas, "created": self.created}


@attrs.frozen
class NewMessage:
    """A message to store: ``body`` is the exact octets (CRLF lines)."""

    user: str
    mailbox: str
    body: bytes
    flags: tuple[str, ...] = ()
    internal_date: float = 0.0
    #: 0: the storing node picks the UID; else the UID a cluster allocated for it
    #: (the node uses it unless its mailbox is already past it).
    uid: int = 0


@attrs.frozen
class Digest:
    """What a mailbox manager says about one stored message (no body).

    ``key`` names the body within its fragment; ``node`` is the node holding it.
    """

    uid: int
    key: str
    size: int
    flags: tuple[str, ...]
    internal_date: float
    node: str


@attrs.frozen
class MailboxInfo:
    """A mailbox's counters: ``uidnext`` only ever grows, ``uidvalidity`` is fixed at creation."""

    name: str
    uidvalidity: int
    uidnext: int
    messages: int
    unseen: int
    subscribed: bool = True
