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


class MailboxHasChildren(MailError):
    """``DELETE`` of a mailbox with mailboxes below it (IMAP ``NO [INUSE]``): the
    mailbox exists and stays; its children must be deleted first."""


class MessageTooLarge(MailError):
    """A message over the configured size limit."""


class MailUnavailable(MailError):
    """Part of the user's mail is on a node that does not answer: the listing would
    be incomplete, so the command is refused (IMAP ``NO [UNAVAILABLE]``, POP3
    ``-ERR [SYS/TEMP]``) rather than showing a smaller mailbox."""


#: ``NewMessage.uid`` of a message to store *unnumbered*: durable (the 250 is
#: given) but not visible by IMAP/POP3 until its user's legitimate manager numbers
#: it (``FragmentStore.number_pending``); see docs/mail.md, "UIDs under partitions".
PENDING = -1


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
    #: 0: the storing node picks the UID (a cluster of one); :data:`PENDING`: store
    #: unnumbered; else the UID a cluster's user manager allocated for it.
    uid: int = 0
    #: The allocating manager's fence (``"manager@bucket-epoch"``), checked by the
    #: storing node against its own map: a stale one (a paused or partitioned old
    #: manager) makes the message PENDING instead.  Empty: no check (replica applies,
    #: a cluster of one).
    fence: str = ""


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
    #: The message's mod-sequence on that node (CONDSTORE; 0: a node without them).
    modseq: int = 0


@attrs.frozen
class MailboxInfo:
    """A mailbox's counters: ``uidnext`` only ever grows, ``uidvalidity`` is fixed at creation."""

    name: str
    uidvalidity: int
    uidnext: int
    messages: int
    unseen: int
    subscribed: bool = True
    #: The highest mod-sequence given out in the mailbox (0: a node without them);
    #: merged over the fragments, what a client is shown (docs/mail.md, "Mod-sequences").
    highestmodseq: int = 0
    #: From one node's read: a value every later change of the mailbox there exceeds
    #: (0: not taken).
    modseq_bound: int = 0
