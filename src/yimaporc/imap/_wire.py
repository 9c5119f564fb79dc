"""The IMAP command grammar (RFC 3501/9051 plus UIDPLUS, MOVE, UNSELECT, ID, ENABLE,
NAMESPACE, IDLE, LITERAL+, SASL-IR, ESEARCH, LIST-EXTENDED/STATUS, SPECIAL-USE,
CONDSTORE and QRESYNC): one framed command's bytes -> a command value.

:func:`parse_command` raises :class:`~._lexer.ParseError` (carrying the tag
when it was readable) for anything outside the grammar or the limits.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any

from . import _commands as c
from ._lexer import (
    DEFAULT_LIMITS,
    MAX_MODSEQ,
    SEARCH_ATOM_CHARS,
    Limits,
    ParseError,
    Reader,
)

_DATE_TIME = re.compile(
    r"^[ 0-9][0-9]-(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)-[0-9]{4} "
    r"[0-9]{2}:[0-9]{2}:[0-9]{2} [+-][0-9]{4}$"
)
STATUS_ITEMS = frozenset(
    {"MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ", "SIZE", "DELETED"}
)
LIST_SELECTION = frozenset({"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"})
LIST_RETURN = frozenset({"SUBSCRIBED", "CHILDREN", "SPECIAL-USE", "STATUS"})
SEARCH_RETURN = frozenset({"MIN", "MAX", "COUNT", "ALL", "SAVE"})
_SECTION_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.")
_ITEM_CHARS = _SECTION_CHARS | frozenset(b"0123456789-")


def parse_command(data: bytes, limits: Limits = DEFAULT_LIMITS) -> c.Command:
    """Parse one framed command (``data`` without its final CRLF)."""
    r = Reader(data, limits)
    tag = r.tag_token()
    r.sp()
    name = r.atom().upper()
    uid = False
    if name == "UID":
        r.sp()
        uid = True
        name = r.atom().upper()
        handler = _UID_COMMANDS.get(name)
        if handler is None:
            raise r.error(f"unknown UID command {name[:20]}")
        cmd = handler(r, tag, uid)
    else:
        simple = _NO_ARGS.get(name)
        if simple is not None:
            cmd = simple(tag)
        else:
            handler = _COMMANDS.get(name) or _UID_COMMANDS.get(name)
            if handler is None:
                raise r.error(f"unknown command {name[:20]}")
            cmd = handler(r, tag, uid)
    r.end()
    return cmd


def parse_tagged_error(data: bytes) -> str | None:
    """The tag of a command line that failed to parse, when it is a valid tag."""
    from ._lexer import tag_of

    return tag_of(data[:64])


# -- commands with arguments -------------------------------------------------------


def _authenticate(r: Reader, tag: str, uid: bool) -> c.Authenticate:
    r.sp()
    mech = r.atom().upper()
    initial = None
    if r.maybe_sp():
        raw = r.run(SEARCH_ATOM_CHARS | {ord("=")}, "an initial response")
        initial = decode_base64(raw, tag)
    return c.Authenticate(tag, mech, initial)


def decode_base64(raw: bytes, tag: str | None = None) -> bytes:
    """A SASL response line: ``=`` is empty; anything not base64 is a ParseError."""
    if raw == b"=":
        return b""
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ParseError("invalid base64", tag) from None


def _login(r: Reader, tag: str, uid: bool) -> c.Login:
    r.sp()
    user = r.astring_text("user name")
    r.sp()
    password = r.astring_text("password")
    return c.Login(tag, user, password)


def _enable(r: Reader, tag: str, uid: bool) -> c.Enable:
    caps = []
    while r.maybe_sp():
        caps.append(r.atom().upper())
    if not caps:
        raise r.error("ENABLE needs a capability")
    return c.Enable(tag, tuple(caps))


def _id(r: Reader, tag: str, uid: bool) -> c.Id:
    r.sp()
    if r.accept(b"NIL"):
        return c.Id(tag, None)
    items: list[Any] = r.paren_list(lambda: r.nstring())
    if len(items) % 2 or len(items) > 60:
        raise r.error("ID needs field/value pairs (at most 30)")
    pairs = []
    for i in range(0, len(items), 2):
        key = items[i]
        if key is None:
            raise r.error("ID field name cannot be NIL")
        value = items[i + 1]
        pairs.append(
            (r.text(key, "ID field"), None if value is None else r.text(value, "ID value"))
        )
    return c.Id(tag, tuple(pairs))


def _select(r: Reader, tag: str, uid: bool, readonly: bool = False) -> c.Select:
    r.sp()
    mailbox = r.mailbox()
    condstore = False
    qresync = None
    if r.maybe_sp():
        r.open_paren()
        while not r.close_paren():
            name = r.atom().upper()
            if name == "CONDSTORE":
                condstore = True
            elif name == "QRESYNC":
                r.sp()
                qresync = _qresync(r)
            else:
                raise r.error(f"unknown select parameter {name[:20]}")
            if r.peek() != 0x29:
                r.sp()
    return c.Select(tag, mailbox, readonly, condstore, qresync)


def _qresync(r: Reader) -> c.Qresync:
    r.open_paren()
    validity = r.nz_number()
    r.sp()
    modseq = r.nz_number(MAX_MODSEQ)
    known = None
    match = None
    if r.maybe_sp():
        if r.peek() != 0x28:
            known = r.sequence_set()
            r.maybe_sp()
        if r.peek() == 0x28:
            r.open_paren()
            seqs = r.sequence_set()
            r.sp()
            uids = r.sequence_set()
            if not r.close_paren():
                raise r.error("expected )")
            match = (seqs, uids)
    if not r.close_paren():
        raise r.error("expected ) after QRESYNC parameters")
    return c.Qresync(validity, modseq, known, match)


def _examine(r: Reader, tag: str, uid: bool) -> c.Select:
    return _select(r, tag, uid, readonly=True)


def _create(r: Reader, tag: str, uid: bool) -> c.Create:
    r.sp()
    mailbox = r.mailbox()
    uses: list[str] = []
    if r.maybe_sp():
        r.open_paren()
        r.expect(b"USE")
        r.sp()
        uses = r.paren_list(r.flag)
        if not r.close_paren():
            raise r.error("expected ) after USE")
    return c.Create(tag, mailbox, tuple(uses))


def _one_mailbox(cls: Callable[[str, str], c.Command]) -> Callable[[Reader, str, bool], Any]:
    def parse(r: Reader, tag: str, uid: bool) -> c.Command:
        r.sp()
        return cls(tag, r.mailbox())

    return parse


def _rename(r: Reader, tag: str, uid: bool) -> c.Rename:
    r.sp()
    old = r.mailbox()
    r.sp()
    return c.Rename(tag, old, r.mailbox())


def _atoms_upper(r: Reader) -> list[str]:
    return [a.upper() for a in r.paren_list(r.atom)]


def _list(r: Reader, tag: str, uid: bool) -> c.List:
    r.sp()
    selection: list[str] = []
    if r.peek() == 0x28:
        selection = _atoms_upper(r)
        if any(s not in LIST_SELECTION for s in selection):
            raise r.error("unknown LIST selection option")
        r.sp()
    reference = r.astring_text("reference")
    r.sp()
    if r.peek() == 0x28:
        patterns = tuple(r.paren_list(r.list_mailbox))
        if not patterns:
            raise r.error("LIST needs a pattern")
    else:
        patterns = (r.list_mailbox(),)
    returns: list[str] = []
    status: tuple[str, ...] = ()
    if r.maybe_sp():
        r.expect(b"RETURN")
        r.sp()
        r.open_paren()
        while not r.close_paren():
            opt = r.atom().upper()
            if opt not in LIST_RETURN:
                raise r.error(f"unknown LIST return option {opt[:20]}")
            returns.append(opt)
            if opt == "STATUS":
                r.sp()
                status = _status_items(r)
            if r.peek() != 0x29:
                r.sp()
    return c.List(tag, reference, patterns, tuple(selection), tuple(returns), status)


def _lsub(r: Reader, tag: str, uid: bool) -> c.Lsub:
    r.sp()
    reference = r.astring_text("reference")
    r.sp()
    return c.Lsub(tag, reference, r.list_mailbox())


def _status_items(r: Reader) -> tuple[str, ...]:
    items = _atoms_upper(r)
    if not items or any(i not in STATUS_ITEMS for i in items):
        raise r.error("bad STATUS items")
    return tuple(items)


def _status(r: Reader, tag: str, uid: bool) -> c.Status:
    r.sp()
    mailbox = r.mailbox()
    r.sp()
    return c.Status(tag, mailbox, _status_items(r))


def _append(r: Reader, tag: str, uid: bool) -> c.Append:
    r.sp()
    mailbox = r.mailbox()
    r.sp()
    first = _append_message(r)
    more = []
    while not r.at_end():  # MULTIAPPEND (RFC 3502)
        r.sp()
        more.append(_append_message(r))
    return c.Append(
        tag, mailbox, first.message, first.flags, first.date, tuple(more), first.binary,
        first.utf8,
    )  # fmt: skip


def _append_message(r: Reader) -> c.AppendMessage:
    flags: tuple[str, ...] = ()
    date = None
    if r.peek() == 0x28:
        flags = tuple(r.paren_list(r.flag))
        r.sp()
    if r.peek() == 0x22:
        date = r.text(r.quoted(), "date")
        if not _DATE_TIME.match(date):
            raise r.error("bad APPEND date-time")
        r.sp()
    if r.data[r.pos : r.pos + 6].upper() == b"UTF8 (":  # UTF8=ACCEPT: UTF8 (literal8)
        r.pos += 6
        if r.peek() != 0x7E:
            raise r.error("UTF8 needs a literal8")
        message = r.literal(allow8=True)
        r.expect(b")")
        return c.AppendMessage(message, flags, date, utf8=True)
    binary = r.peek() == 0x7E  # literal8 (BINARY)
    if r.peek() != 0x7B and not binary:
        raise r.error("APPEND needs the message as a literal")
    return c.AppendMessage(r.literal(allow8=binary), flags, date, binary)


def _expunge(r: Reader, tag: str, uid: bool) -> c.Expunge:
    if uid:
        r.sp()
        return c.Expunge(tag, r.sequence_set())
    return c.Expunge(tag)


def _search(r: Reader, tag: str, uid: bool) -> c.Search:
    r.sp()
    returns = None
    charset = None
    if r.accept(b"RETURN "):
        returns = tuple(_atoms_upper(r))
        if any(x not in SEARCH_RETURN for x in returns):
            raise r.error("unknown SEARCH return option")
        r.sp()
    start = r.pos
    if r.accept(b"CHARSET") and r.peek() == 0x20:
        r.sp()
        charset = r.astring_text("charset").upper()
        r.sp()
    else:
        r.pos = start
    criteria = _search_tokens(r)
    if not criteria:
        raise r.error("SEARCH needs a criterion")
    return c.Search(tag, uid, tuple(criteria), charset, returns)


def _search_tokens(r: Reader, nested: bool = False) -> list[Any]:
    out: list[Any] = []
    while True:
        b = r.peek()
        if b is None or (nested and b == 0x29):
            return out
        if b == 0x28:
            r.open_paren()
            group = _search_tokens(r, nested=True)
            if not r.close_paren():
                raise r.error("unbalanced parentheses in SEARCH")
            if not group:
                raise r.error("empty parentheses in SEARCH")
            out.append(group)
        elif b in (0x22, 0x7B):
            out.append(r.string())
        elif b == 0x5C:  # a flag-like atom (e.g. KEYWORD \Seen)
            r.pos += 1
            out.append("\\" + r.run(SEARCH_ATOM_CHARS, "a search key").decode("ascii"))
        else:
            out.append(r.run(SEARCH_ATOM_CHARS, "a search key").decode("ascii"))
        nxt = r.peek()
        if nxt is None or (nested and nxt == 0x29):
            return out
        r.sp()


def _fetch(r: Reader, tag: str, uid: bool) -> c.Fetch:
    r.sp()
    seq = r.sequence_set()
    r.sp()
    items: list[c.FetchItem]
    if r.peek() == 0x28:
        items = r.paren_list(lambda: _fetch_item(r))
        if not items:
            raise r.error("FETCH needs an item")
    else:
        start = r.pos
        word = r.atom().upper()
        if word in c.FETCH_MACROS:
            items = [c.FetchAtt(n) for n in c.FETCH_MACROS[word]]
        else:
            r.pos = start
            items = [_fetch_item(r)]
    changed = None
    vanished = False
    if r.maybe_sp():
        r.open_paren()
        while not r.close_paren():
            mod = r.atom().upper()
            if mod == "CHANGEDSINCE":
                r.sp()
                changed = r.number(MAX_MODSEQ)
            elif mod == "VANISHED" and uid:
                vanished = True
            else:
                raise r.error(f"unknown FETCH modifier {mod[:20]}")
            if r.peek() != 0x29:
                r.sp()
        if vanished and changed is None:
            raise r.error("VANISHED needs CHANGEDSINCE")
    return c.Fetch(tag, uid, seq, tuple(items), changed, vanished)


def _fetch_item(r: Reader) -> c.FetchItem:
    start = r.pos
    name = r.run(_ITEM_CHARS, "a FETCH item").decode("ascii")
    upper = name.upper()
    if upper in ("BODY", "BODY.PEEK") and r.peek() == 0x5B:
        return _body_section(r, upper == "BODY.PEEK")
    if upper in ("BINARY", "BINARY.PEEK", "BINARY.SIZE") and r.peek() == 0x5B:
        return _binary_section(r, upper)
    if upper in c.FETCH_ATTS:
        return c.FetchAtt(upper)
    r.pos = start
    raise r.error(f"unknown FETCH item {name[:30]}")


def _binary_section(r: Reader, name: str) -> c.BinarySection:
    """``[part]<o.n>`` of BINARY (no HEADER/TEXT/MIME; no partial for BINARY.SIZE)."""
    r.expect(b"[")
    part: list[int] = []
    while r.peek() != 0x5D:
        part.append(r.nz_number())
        if r.peek() != 0x5D:
            r.expect(b".")
    r.expect(b"]")
    partial = None
    if name != "BINARY.SIZE" and r.accept(b"<"):
        origin = r.number()
        r.expect(b".")
        count = r.nz_number()
        r.expect(b">")
        partial = (origin, count)
    return c.BinarySection(name == "BINARY.PEEK", tuple(part), partial, name == "BINARY.SIZE")


def _body_section(r: Reader, peek: bool) -> c.BodySection:
    r.expect(b"[")
    part: list[int] = []
    text = None
    fields: tuple[str, ...] = ()
    while r.peek() is not None and 0x30 <= r.data[r.pos] <= 0x39:
        part.append(r.nz_number())
        if not r.accept(b"."):
            break
        if r.peek() is not None and not 0x30 <= r.data[r.pos] <= 0x39:
            break
    if r.peek() != 0x5D:
        word = r.run(_SECTION_CHARS, "a section")
        text = word.decode("ascii").upper()
        if text not in c.SECTION_TEXTS or (text == "MIME" and not part):
            raise r.error("bad body section")
        if text.startswith("HEADER.FIELDS"):
            r.sp()
            fields = tuple(r.text(f, "header field") for f in r.paren_list(r.astring))
            if not fields:
                raise r.error("HEADER.FIELDS needs a field name")
    elif part and r.data[r.pos - 1] == 0x2E:
        raise r.error("bad body section")
    r.expect(b"]")
    partial = None
    if r.accept(b"<"):
        origin = r.number()
        r.expect(b".")
        count = r.nz_number()
        r.expect(b">")
        partial = (origin, count)
    return c.BodySection(peek, tuple(part), text, fields, partial)


def _store(r: Reader, tag: str, uid: bool) -> c.Store:
    r.sp()
    seq = r.sequence_set()
    r.sp()
    unchanged = None
    if r.peek() == 0x28:
        r.open_paren()
        r.expect(b"UNCHANGEDSINCE")
        r.sp()
        unchanged = r.number(MAX_MODSEQ)
        if not r.close_paren():
            raise r.error("expected ) after UNCHANGEDSINCE")
        r.sp()
    mode = ""
    if r.peek() in (0x2B, 0x2D):
        mode = chr(r.data[r.pos])
        r.pos += 1
    r.expect(b"FLAGS")
    silent = r.accept(b".SILENT")
    r.sp()
    if r.peek() == 0x28:
        flags = tuple(r.paren_list(r.flag))
    else:
        flags_list = [r.flag()]
        while r.maybe_sp():
            flags_list.append(r.flag())
        flags = tuple(flags_list)
    return c.Store(tag, uid, seq, mode, flags, silent, unchanged)


def _copy_or_move(cls: type[c.Copy] | type[c.Move]) -> Callable[[Reader, str, bool], Any]:
    def parse(r: Reader, tag: str, uid: bool) -> c.Copy | c.Move:
        r.sp()
        seq = r.sequence_set()
        r.sp()
        return cls(tag, uid, seq, r.mailbox())

    return parse


_NO_ARGS: dict[str, Callable[[str], c.Command]] = {
    "CAPABILITY": c.Capability,
    "NOOP": c.Noop,
    "LOGOUT": c.Logout,
    "STARTTLS": c.StartTls,
    "NAMESPACE": c.Namespace,
    "IDLE": c.Idle,
    "CHECK": c.Check,
    "CLOSE": c.Close,
    "UNSELECT": c.Unselect,
}

_COMMANDS: dict[str, Callable[[Reader, str, bool], Any]] = {
    "AUTHENTICATE": _authenticate,
    "LOGIN": _login,
    "ENABLE": _enable,
    "ID": _id,
    "SELECT": _select,
    "EXAMINE": _examine,
    "CREATE": _create,
    "DELETE": _one_mailbox(c.Delete),
    "RENAME": _rename,
    "SUBSCRIBE": _one_mailbox(c.Subscribe),
    "UNSUBSCRIBE": _one_mailbox(c.Unsubscribe),
    "LIST": _list,
    "LSUB": _lsub,
    "STATUS": _status,
    "APPEND": _append,
}

_UID_COMMANDS: dict[str, Callable[[Reader, str, bool], Any]] = {
    "FETCH": _fetch,
    "STORE": _store,
    "COPY": _copy_or_move(c.Copy),
    "MOVE": _copy_or_move(c.Move),
    "SEARCH": _search,
    "EXPUNGE": _expunge,
}
