"""How a store's failure reaches an IMAP client: :func:`as_imap_error` (the
response code of RFC 5530 each one gets)."""

from __future__ import annotations

from twisted.internet.defer import FirstError
from twisted.python.failure import Failure

from ..cluster.rpc import PeerUnavailable
from ..imap.interfaces import ImapError
from ._cluster_wire import storage_full
from .values import (
    MailboxExists,
    MailboxHasChildren,
    MailError,
    MailUnavailable,
    MessageTooLarge,
    NoSuchMailbox,
)

__all__ = ["as_imap_error"]


def as_imap_error(f: Failure, missing: str = "NONEXISTENT") -> Failure:
    """A store failure as the ``ImapError`` the client sees (others pass unchanged)."""
    e = f.value
    while isinstance(e, FirstError):  # gatherResults over several nodes
        e = e.subFailure.value
    if isinstance(e, ImapError):
        return f
    if isinstance(e, NoSuchMailbox):
        raise ImapError("no such mailbox", missing)
    if isinstance(e, MailboxExists):
        raise ImapError("mailbox already exists", "ALREADYEXISTS")
    if isinstance(e, MailboxHasChildren):
        raise ImapError(str(e), "INUSE")  # RFC 5530: a branch someone sits on
    if isinstance(e, MailUnavailable):
        text = str(e).removeprefix("[UNAVAILABLE] ")
        raise ImapError(text, "UNAVAILABLE")
    if isinstance(e, MessageTooLarge):
        raise ImapError("message too large", "TOOBIG")
    if isinstance(e, PeerUnavailable):
        raise ImapError("a node holding this mail is out of reach, try again later", "UNAVAILABLE")
    if storage_full(e):  # this node's own disk (a remote one answers StorageFull)
        raise ImapError("mail storage is full here, try again later", "UNAVAILABLE")
    if isinstance(e, MailError):
        raise ImapError(str(e) or type(e).__name__, "CANNOT")
    return f
