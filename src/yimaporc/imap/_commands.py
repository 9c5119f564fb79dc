"""IMAP commands as frozen values (RFC 3501/9051 and the extensions real clients use).

Every command carries the client's ``tag``.  Mailbox names are ``str`` as sent
(modified UTF-7 is the backend's concern), sequence sets are validated strings
(``"1:3,5,*"``, or ``"$"`` for SEARCHRES), and SEARCH criteria are a generic
token list: atoms as ``str``, strings (quoted or literal) as ``bytes``,
parenthesised lists as python ``list``.
"""

from __future__ import annotations

from typing import Any

import attrs

#: Simple FETCH attributes (no section).
FETCH_ATTS = frozenset(
    {
        "ENVELOPE",
        "FLAGS",
        "INTERNALDATE",
        "RFC822",
        "RFC822.HEADER",
        "RFC822.SIZE",
        "RFC822.TEXT",
        "UID",
        "BODY",
        "BODYSTRUCTURE",
        "MODSEQ",
    }
)

#: FETCH macros and what they stand for (RFC 3501 6.4.5).
FETCH_MACROS: dict[str, tuple[str, ...]] = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}

#: Section texts of BODY[...] (MIME only after a part number).
SECTION_TEXTS = frozenset({"HEADER", "TEXT", "MIME", "HEADER.FIELDS", "HEADER.FIELDS.NOT"})


@attrs.frozen
class FetchAtt:
    """A FETCH attribute without a section: ``ENVELOPE``, ``FLAGS``, ``UID``, ..."""

    name: str

    @property
    def echo(self) -> str:
        """The name the FETCH response uses."""
        return self.name


@attrs.frozen
class BodySection:
    """``BODY[section]<partial>`` or ``BODY.PEEK[...]``.

    ``part`` is the part path (``(1, 2)`` for ``1.2``), ``text`` one of
    :data:`SECTION_TEXTS` or None for the whole part, ``fields`` the header
    names of ``HEADER.FIELDS (...)`` spelled as the client sent them (the
    response echoes them so), ``partial`` the ``<origin.count>``.
    """

    peek: bool = False
    part: tuple[int, ...] = ()
    text: str | None = None
    fields: tuple[str, ...] = ()
    partial: tuple[int, int] | None = None

    @property
    def section(self) -> str:
        """The text between the brackets, as the response echoes it."""
        out = ".".join(str(p) for p in self.part)
        if self.text is not None:
            out = f"{out}.{self.text}" if out else self.text
            if self.fields:
                out += " (" + " ".join(_astring_text(f) for f in self.fields) + ")"
        return out

    @property
    def echo(self) -> str:
        """The FETCH response item name: ``BODY[section]`` plus ``<origin>`` if partial."""
        out = f"BODY[{self.section}]"
        if self.partial is not None:
            out += f"<{self.partial[0]}>"
        return out

    @property
    def request(self) -> str:
        """The item as a client writes it (with PEEK and ``<origin.count>``)."""
        out = f"BODY{'.PEEK' if self.peek else ''}[{self.section}]"
        if self.partial is not None:
            out += f"<{self.partial[0]}.{self.partial[1]}>"
        return out


@attrs.frozen
class BinarySection:
    """``BINARY[part]<partial>``, ``BINARY.PEEK[...]`` or ``BINARY.SIZE[part]`` (RFC 3516):
    the part's content with its Content-Transfer-Encoding undone."""

    peek: bool = False
    part: tuple[int, ...] = ()
    partial: tuple[int, int] | None = None
    size: bool = False

    @property
    def section(self) -> str:
        return ".".join(str(p) for p in self.part)

    @property
    def echo(self) -> str:
        """The FETCH response item name."""
        if self.size:
            return f"BINARY.SIZE[{self.section}]"
        out = f"BINARY[{self.section}]"
        if self.partial is not None:
            out += f"<{self.partial[0]}>"
        return out

    @property
    def request(self) -> str:
        """The item as a client writes it."""
        if self.size:
            return f"BINARY.SIZE[{self.section}]"
        out = f"BINARY{'.PEEK' if self.peek else ''}[{self.section}]"
        if self.partial is not None:
            out += f"<{self.partial[0]}.{self.partial[1]}>"
        return out


FetchItem = FetchAtt | BodySection | BinarySection


def _astring_text(name: str) -> str:
    # Header field names are atoms in practice; anything else goes quoted.
    if name and all(33 <= ord(c) < 127 and c not in '(){%*"\\]' for c in name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


@attrs.frozen
class Capability:
    """CAPABILITY."""

    tag: str


@attrs.frozen
class Noop:
    """NOOP (also the poll for mailbox changes)."""

    tag: str


@attrs.frozen
class Logout:
    """LOGOUT."""

    tag: str


@attrs.frozen
class StartTls:
    """STARTTLS: bytes the client sent after it in plaintext are discarded."""

    tag: str


@attrs.frozen
class Authenticate:
    """AUTHENTICATE mechanism [initial-response] (SASL-IR; ``b""`` for ``=``)."""

    tag: str
    mechanism: str
    initial_response: bytes | None = None


@attrs.frozen
class Login:
    """LOGIN user password."""

    tag: str
    user: str
    password: str


@attrs.frozen
class Enable:
    """ENABLE capability... (RFC 5161)."""

    tag: str
    capabilities: tuple[str, ...]


@attrs.frozen
class Id:
    """ID (RFC 2971): ``None`` for NIL, else field/value pairs."""

    tag: str
    params: tuple[tuple[str, str | None], ...] | None = None


@attrs.frozen
class Namespace:
    """NAMESPACE (RFC 2342)."""

    tag: str


@attrs.frozen
class Qresync:
    """The QRESYNC select parameter: ``(uidvalidity modseq [known-uids [(seqs uids)]])``."""

    uidvalidity: int
    modseq: int
    known_uids: str | None = None
    seq_match: tuple[str, str] | None = None


@attrs.frozen
class Select:
    """SELECT or EXAMINE (``readonly``), with CONDSTORE/QRESYNC parameters."""

    tag: str
    mailbox: str
    readonly: bool = False
    condstore: bool = False
    qresync: Qresync | None = None


@attrs.frozen
class Create:
    """CREATE mailbox [(USE (\\Sent ...))] (RFC 6154 CREATE-SPECIAL-USE)."""

    tag: str
    mailbox: str
    special_use: tuple[str, ...] = ()


@attrs.frozen
class Delete:
    """DELETE mailbox."""

    tag: str
    mailbox: str


@attrs.frozen
class Rename:
    """RENAME old new."""

    tag: str
    old: str
    new: str


@attrs.frozen
class Subscribe:
    """SUBSCRIBE mailbox."""

    tag: str
    mailbox: str


@attrs.frozen
class Unsubscribe:
    """UNSUBSCRIBE mailbox."""

    tag: str
    mailbox: str


@attrs.frozen
class List:
    """LIST with LIST-EXTENDED selection and return options (RFC 5258, 5819, 6154).

    ``patterns`` has one entry for the basic form; ``selection`` e.g.
    ``("SUBSCRIBED", "SPECIAL-USE")``; ``returns`` e.g. ``("CHILDREN",)``;
    ``status`` the STATUS items of ``RETURN (STATUS (...))``.
    """

    tag: str
    reference: str
    patterns: tuple[str, ...]
    selection: tuple[str, ...] = ()
    returns: tuple[str, ...] = ()
    status: tuple[str, ...] = ()


@attrs.frozen
class Lsub:
    """LSUB reference pattern."""

    tag: str
    reference: str
    pattern: str


@attrs.frozen
class Status:
    """STATUS mailbox (items)."""

    tag: str
    mailbox: str
    items: tuple[str, ...]


@attrs.frozen
class AppendMessage:
    """One further message of a MULTIAPPEND (RFC 3502): [(flags)] [date-time] literal;
    ``binary`` when sent as a ``~{n}`` literal8 (BINARY, RFC 3516); ``utf8`` when
    sent as ``UTF8 (~{n})`` (UTF8=ACCEPT, RFC 6855)."""

    message: bytes
    flags: tuple[str, ...] = ()
    date: str | None = None
    binary: bool = False
    utf8: bool = False


@attrs.frozen
class Append:
    """APPEND mailbox [(flags)] [date-time] literal *(SP [(flags)] [date-time] literal).

    ``date`` is the date-time text as sent (``"17-Jul-1996 02:44:25 -0700"``);
    ``more`` holds the further messages of a MULTIAPPEND (RFC 3502), stored
    together with the first or not at all; ``binary``: the first message came
    as a ``~{n}`` literal8.
    """

    tag: str
    mailbox: str
    message: bytes
    flags: tuple[str, ...] = ()
    date: str | None = None
    more: tuple[AppendMessage, ...] = ()
    binary: bool = False
    utf8: bool = False

    def messages(self) -> list[AppendMessage]:
        """Every message of the command, the first included."""
        first = AppendMessage(self.message, self.flags, self.date, self.binary, self.utf8)
        return [first, *self.more]


@attrs.frozen
class Idle:
    """IDLE (RFC 2177): the connection waits for DONE."""

    tag: str


@attrs.frozen
class Check:
    """CHECK."""

    tag: str


@attrs.frozen
class Close:
    """CLOSE (expunge silently, deselect)."""

    tag: str


@attrs.frozen
class Unselect:
    """UNSELECT (RFC 3691): deselect without expunging."""

    tag: str


@attrs.frozen
class Expunge:
    """EXPUNGE, or UID EXPUNGE set (UIDPLUS) when ``uid_set`` is given."""

    tag: str
    uid_set: str | None = None


@attrs.frozen
class Search:
    """SEARCH / UID SEARCH.

    ``criteria`` is the token list (str atoms, bytes strings, list groups),
    ``returns`` None for plain SEARCH or the ESEARCH return options
    (``()`` means ``RETURN ()``, i.e. ALL).
    """

    tag: str
    uid: bool
    criteria: tuple[Any, ...]
    charset: str | None = None
    returns: tuple[str, ...] | None = None


@attrs.frozen
class Fetch:
    """FETCH / UID FETCH with CONDSTORE ``CHANGEDSINCE`` and QRESYNC ``VANISHED``."""

    tag: str
    uid: bool
    sequence_set: str
    items: tuple[FetchItem, ...]
    changed_since: int | None = None
    vanished: bool = False


@attrs.frozen
class Store:
    """STORE / UID STORE: ``mode`` is ``""`` (replace), ``"+"`` or ``"-"``."""

    tag: str
    uid: bool
    sequence_set: str
    mode: str
    flags: tuple[str, ...]
    silent: bool = False
    unchanged_since: int | None = None


@attrs.frozen
class Copy:
    """COPY / UID COPY."""

    tag: str
    uid: bool
    sequence_set: str
    mailbox: str


@attrs.frozen
class Move:
    """MOVE / UID MOVE (RFC 6851)."""

    tag: str
    uid: bool
    sequence_set: str
    mailbox: str


Command = (
    Capability
    | Noop
    | Logout
    | StartTls
    | Authenticate
    | Login
    | Enable
    | Id
    | Namespace
    | Select
    | Create
    | Delete
    | Rename
    | Subscribe
    | Unsubscribe
    | List
    | Lsub
    | Status
    | Append
    | Idle
    | Check
    | Close
    | Unselect
    | Expunge
    | Search
    | Fetch
    | Store
    | Copy
    | Move
)
