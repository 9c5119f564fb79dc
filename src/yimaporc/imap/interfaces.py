"""What the IMAP server asks of the mail store: :class:`IImapBackend` and friends.

Methods may return a value or a Deferred of it.  To answer ``NO``/``BAD`` with a
response code, raise or errback :class:`ImapError` (e.g.
``ImapError("no such mailbox", code="TRYCREATE")``); any other failure is
logged and answered ``NO [SERVERBUG]``.

The protocol package keeps the per-session view (sequence numbers, flags last
shown, what to announce on NOOP/IDLE) itself: a selected mailbox only returns
snapshots of its messages (:meth:`ISelectedMailbox.snapshot`), so a Porcupine
adaptor maps straight onto ``UserMail`` (``digests`` -> snapshot, ``fetch`` ->
load, ``set_flags`` -> store, ``delete`` -> expunge, ``copy``, ``append``,
``mailboxes`` -> list/status, ``create``/``delete_mailbox``/``rename``/
``subscribe``).
"""

from __future__ import annotations

from typing import Any

import attrs
from zope.interface import Attribute, Interface

from ._serialize import ResponseCode


class ImapError(Exception):
    """A command fails: answered ``status [code] text`` (status ``NO`` or ``BAD``).

    ``code`` is a response-code name (``"TRYCREATE"``) or a whole
    :class:`~._serialize.ResponseCode` when it has arguments
    (``ResponseCode("BADCHARSET", ("US-ASCII", "UTF-8"))``).
    """

    def __init__(
        self, text: str, code: str | ResponseCode | None = None, status: str = "NO"
    ) -> None:
        super().__init__(text)
        self.text = text
        self.code = code
        self.status = status


@attrs.frozen
class MailboxListing:
    """One mailbox of the user: name (hierarchy delimited by the session's
    ``delimiter``), attributes (``\\Noselect``, special use such as ``\\Sent``),
    subscription."""

    name: str
    attributes: tuple[str, ...] = ()
    subscribed: bool = False


@attrs.frozen
class MailboxStatus:
    """Counters of a mailbox (STATUS, LIST-STATUS)."""

    messages: int
    uidnext: int
    uidvalidity: int
    unseen: int
    recent: int = 0
    highestmodseq: int = 0
    size: int = 0
    deleted: int = 0


@attrs.frozen
class MessageInfo:
    """What a snapshot says of one message (no body)."""

    uid: int
    flags: tuple[str, ...]
    size: int
    internal_date: float
    modseq: int = 0


@attrs.frozen
class Snapshot:
    """The messages of a mailbox in UID order, with its counters."""

    messages: tuple[MessageInfo, ...]
    uidnext: int
    highestmodseq: int = 0


@attrs.frozen
class AppendResult:
    """Where APPEND stored the message (APPENDUID)."""

    uidvalidity: int
    uid: int


@attrs.frozen
class CopyResult:
    """What COPY/MOVE made (COPYUID): source UIDs and their new UIDs, in pairs."""

    uidvalidity: int
    source_uids: tuple[int, ...]
    dest_uids: tuple[int, ...]


#: Capabilities a backend may add through ``IImapBackend.extensions``.
BACKEND_EXTENSIONS = ("MULTIAPPEND", "BINARY")


class IImapBackend(Interface):
    """The mail store behind an IMAP server (for Porcupine: the retrieval proxy)."""

    supports_modseq = Attribute("True when snapshots carry MODSEQs (CONDSTORE/QRESYNC).")
    extensions = Attribute(
        "The capabilities that need the backend's help and that it has, a subset "
        "of :data:`BACKEND_EXTENSIONS` (``MULTIAPPEND``: its sessions have "
        ":meth:`IImapSession.append_many`; ``BINARY``: APPEND stores ``~{n}`` literal8 "
        "messages octet for octet); ``()``: none."
    )

    def login(user: str, password: str) -> Any:
        """An :class:`IImapSession` for the user, or ``ImapError(code="AUTHENTICATIONFAILED")``
        (``"UNAVAILABLE"`` when the store cannot be reached)."""


class IImapSession(Interface):
    """One authenticated user on one connection."""

    delimiter = Attribute("The hierarchy delimiter, e.g. '/'.")

    def list_mailboxes() -> Any:
        """Every mailbox of the user: a list of :class:`MailboxListing`."""

    def create(name: str, special_use: tuple[str, ...]) -> Any:
        """Create ``name`` (``ImapError(code="ALREADYEXISTS")`` if it exists)."""

    def delete(name: str) -> Any:
        """Delete ``name`` (``NONEXISTENT`` if missing)."""

    def rename(old: str, new: str) -> Any:
        """Rename ``old`` to ``new``."""

    def subscribe(name: str, on: bool) -> Any:
        """(Un)subscribe ``name``."""

    def status(name: str) -> Any:
        """The :class:`MailboxStatus` of ``name``."""

    def append(name: str, message: bytes, flags: tuple[str, ...], date: float | None) -> Any:
        """Store a message: an :class:`AppendResult` (``TRYCREATE`` if ``name`` is missing).
        ``message`` is stored as given: the shell has made its line ends CRLF unless it
        came as a ``~{n}`` literal8 (BINARY)."""

    def append_many(name: str, messages: list[tuple[bytes, tuple[str, ...], float | None]]) -> Any:
        """Only with ``MULTIAPPEND`` in the backend's ``extensions``: store every
        ``(message, flags, date)`` atomically (all become visible together, or none is
        stored): a list of :class:`AppendResult`, in order."""

    def select(name: str, readonly: bool) -> Any:
        """Open ``name``: an :class:`ISelectedMailbox` (``NONEXISTENT`` if missing)."""

    def logout() -> None:
        """The connection ended: release what the session holds."""


class ISelectedMailbox(Interface):
    """A mailbox opened by SELECT/EXAMINE on one connection."""

    name = Attribute("The mailbox name.")
    uidvalidity = Attribute("UIDVALIDITY.")
    readonly = Attribute("True for EXAMINE (or a mailbox the user cannot change).")
    flags = Attribute("Flags defined in the mailbox (FLAGS response).")
    permanent_flags = Attribute("Flags the client can set (PERMANENTFLAGS, without \\*).")

    def snapshot() -> Any:
        """The current :class:`Snapshot` (including other sessions' changes)."""

    def load(uids: list[int]) -> Any:
        """Message octets: ``{uid: bytes}`` (missing UIDs were expunged meanwhile)."""

    def store(
        uids: list[int], mode: str, flags: tuple[str, ...], unchanged_since: int | None
    ) -> Any:
        """Change flags (mode ``""``/``"+"``/``"-"``): the UIDs not changed because their
        MODSEQ is above ``unchanged_since`` (CONDSTORE), else ``[]``."""

    def expunge(uids: list[int] | None) -> Any:
        """Remove messages flagged ``\\Deleted`` (only among ``uids`` when given)."""

    def copy(uids: list[int], dest: str) -> Any:
        """Copy to ``dest``: a :class:`CopyResult` (``TRYCREATE`` if missing)."""

    def move(uids: list[int], dest: str) -> Any:
        """Move to ``dest``: a :class:`CopyResult`."""

    def search(criteria: tuple[Any, ...], charset: str | None, view: list[MessageInfo]) -> Any:
        """UIDs matching the SEARCH tokens; ``view`` is the session's messages in
        sequence order (sequence number = index + 1).  ``BADCHARSET`` for an unknown
        charset."""

    def watch(callback: Any) -> None:
        """Call ``callback()`` when the mailbox changes (None: stop); used by IDLE."""

    def tombstones() -> Any:
        """``{uid: modseq}`` of expunges the backend remembers (the MODSEQ the mailbox
        reached by each; used with ``supports_modseq``).  QRESYNC leaves out of
        ``VANISHED (EARLIER)`` only UIDs shown gone at or before the client's
        mod-sequence, so a forgotten tombstone means a UID reported again, never an
        expunge missed.  ``{}`` (none remembered): every absent UID is reported."""

    def close() -> None:
        """The session leaves the mailbox."""


class IMessageRenderer(Interface):
    """Computes FETCH data of one message from its octets (``yimaporc.imap._message``)."""

    def render(raw: bytes, item: Any, internal_date: float) -> Any:
        """The value of FETCH ``item`` (a :class:`~._commands.FetchAtt` for ENVELOPE,
        BODY, BODYSTRUCTURE, RFC822, RFC822.HEADER, RFC822.TEXT, or a
        :class:`~._commands.BodySection`): nested values for structures (None=NIL,
        bytes=string, int=number, tuple=list), bytes or None for contents.
        Raise ``ImapError`` for a section the message lacks."""
