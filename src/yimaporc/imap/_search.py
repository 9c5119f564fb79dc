"""SEARCH (RFC 3501 6.4.4) as a compiled program, plus CONDSTORE MODSEQ and ESEARCH helpers.

**Input** (what the command parser hands over): the search keys as a token list, atoms
as ``str``, quoted strings and literals as ``bytes``, parenthesised lists as ``list``;
and the ``CHARSET`` argument (None, ``"US-ASCII"``, ``"UTF-8"``, or like Dovecot any
other character set Python has a codec for, e.g. ``ISO-8859-1``; an unknown one is a
:class:`SearchError` with code ``BADCHARSET``, answered ``NO [BADCHARSET (US-ASCII
UTF-8)]``). US-ASCII strings are read as UTF-8, as Dovecot reads them; a string that
does not decode is ``BAD``.

:func:`compile_search` checks the whole expression before anything is evaluated and
raises :class:`SearchError` (answered ``BAD``) for bad syntax or an unknown key. The
program says what it needs (:attr:`SearchProgram.need`): metadata only (flags, UID,
size, dates, modseq), the header, or the full message, so the server loads no more.

Matching follows Dovecot 2.3 (values checked against it on the test corpus):

- dates compare the calendar date only: BEFORE/ON/SINCE the INTERNALDATE in the
  server's zone (:attr:`Scope.utc_offset_minutes`), SENTBEFORE/SENTON/SENTSINCE the
  Date: header's date in its own zone (a message without a valid Date: counts as
  sent on 1-Jan-1970, as in Dovecot);
- text keys are case-insensitive substring matches (Unicode case folding) over header
  values with RFC 2047 words decoded, and over the body's text parts with transfer
  encoding and charset undone (BODY: those parts; TEXT: those parts and every header,
  MIME part headers and embedded messages' headers included); an empty string matches every message (for HEADER:
  every message that has the field);
- ``*`` in a sequence set is the last message (or the highest UID for ``UID``);
  numbers past the end simply match nothing.
"""

from __future__ import annotations

import codecs
import datetime as dt
import enum
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Protocol

import attrs

from ._sequence import SequenceSet, SequenceSetError, format_uid_set

#: Charsets SEARCH advertises (the BADCHARSET response code lists them); others Python
#: knows are accepted too.
CHARSETS = ("US-ASCII", "UTF-8")

#: Nesting deeper than this (lists, NOT, OR) is refused, not recursed into. OR chains
#: and lists flatten for evaluation, so only parsing recurses this deep.
MAX_DEPTH = 128

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")

Token = str | bytes | list["Token"]


class SearchError(Exception):
    """Search keys the server cannot run; ``code`` is an IMAP response code or None."""

    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.code = code

    @property
    def status(self) -> str:
        """The tagged status to answer: ``NO`` for BADCHARSET, else ``BAD``."""
        return "NO" if self.code == "BADCHARSET" else "BAD"

    def response_code(self) -> bytes | None:
        """``BADCHARSET (US-ASCII UTF-8)`` or None, for the serializer's ``[...]``."""
        if self.code == "BADCHARSET":
            return b"BADCHARSET (" + " ".join(CHARSETS).encode() + b")"
        return None if self.code is None else self.code.encode()


class Need(enum.IntEnum):
    """What of a message a search reads: each level includes the ones below."""

    METADATA = 0  # flags, UID, sequence number, size, INTERNALDATE, modseq
    HEADERS = 1
    FULL = 2


class MessageView(Protocol):
    """What the evaluator reads of one message (:class:`View` is the plain one)."""

    @property
    def seq(self) -> int: ...
    @property
    def uid(self) -> int: ...
    @property
    def flags(self) -> Collection[str]: ...
    @property
    def internaldate(self) -> float: ...
    @property
    def size(self) -> int: ...
    @property
    def modseq(self) -> int: ...

    def header_values(self, name: str) -> list[str]: ...
    def address_values(self, name: str) -> list[str]: ...
    def has_header(self, name: str) -> bool: ...
    def body_text(self) -> str: ...
    def full_text(self) -> str: ...
    def sent_date(self) -> dt.date | None: ...


class _MessageLike(Protocol):
    def header_values(self, name: str) -> list[str]: ...
    def address_values(self, name: str) -> list[str]: ...
    def has_header(self, name: str) -> bool: ...
    def body_text(self) -> str: ...
    def full_text(self) -> str: ...
    def sent_date(self) -> dt.date | None: ...


@attrs.frozen
class View:
    """A message as SEARCH sees it: metadata plus, when needed, a parsed ``Message``.

    ``flags`` holds this session's view, ``\\Recent`` included (RECENT, NEW, OLD read
    it). For :attr:`Need.HEADERS` a ``Message`` of the header octets alone is enough;
    for :attr:`Need.METADATA` leave ``message`` None. A search that needs the message
    on a view without one raises ValueError (a server bug, not a client's).
    """

    seq: int
    uid: int
    flags: Collection[str] = ()
    internaldate: float = 0.0
    size: int = 0
    modseq: int = 0
    message: _MessageLike | None = None

    def _m(self) -> _MessageLike:
        if self.message is None:
            raise ValueError("this search needs the message, and it was not loaded")
        return self.message

    def header_values(self, name: str) -> list[str]:
        return self._m().header_values(name)

    def address_values(self, name: str) -> list[str]:
        return self._m().address_values(name)

    def has_header(self, name: str) -> bool:
        return self._m().has_header(name)

    def full_text(self) -> str:
        return self._m().full_text()

    def body_text(self) -> str:
        return self._m().body_text()

    def sent_date(self) -> dt.date | None:
        return self._m().sent_date()


@attrs.frozen
class Scope:
    """The mailbox around a search: ``*`` values and the server's time zone."""

    last_seq: int
    last_uid: int
    utc_offset_minutes: int = 0


class _Eval:
    """One message under evaluation: flags folded once, texts decoded once."""

    def __init__(self, view: MessageView, scope: Scope) -> None:
        self.view = view
        self.scope = scope
        self.flags = {f.lower() for f in view.flags}
        self._texts: dict[str, str] = {}

    def text(self, which: str) -> str:
        if which not in self._texts:
            value = self.view.body_text() if which == "body" else self.view.full_text()
            self._texts[which] = value.casefold()
        return self._texts[which]

    def internal_date(self) -> dt.date:
        zone = dt.timezone(dt.timedelta(minutes=self.scope.utc_offset_minutes))
        return dt.datetime.fromtimestamp(self.view.internaldate, zone).date()


#: The sent date of a message without a valid Date: header (Dovecot's: time 0).
_NO_DATE = dt.date(1970, 1, 1)

_Test = Callable[[_Eval], bool]


@attrs.frozen
class _Node:
    test: _Test
    need: Need = Need.METADATA
    modseq: bool = False
    #: For AND/OR nodes: the operator and its operands, so chains flatten (an ``OR a OR
    #: b OR c ...`` of any length evaluates without nesting calls).
    op: str = ""
    parts: tuple[_Test, ...] = ()


def _join(op: str, nodes: list[_Node]) -> _Node:
    """AND (``all``) or OR (``any``) of nodes, merging operands of the same operator."""
    tests: list[_Test] = []
    for n in nodes:
        tests.extend(n.parts if n.op == op else (n.test,))
    combine = all if op == "and" else any
    frozen = tuple(tests)
    return _Node(
        lambda e: combine(t(e) for t in frozen),
        max((n.need for n in nodes), default=Need.METADATA),
        any(n.modseq for n in nodes),
        op,
        frozen,
    )


def _all(nodes: list[_Node]) -> _Node:
    return _join("and", nodes)


# --- argument readers -------------------------------------------------------------


class _Reader:
    def __init__(self, tokens: list[Token], depth: int, codec: str = "utf-8") -> None:
        self.codec = codec
        self.tokens = tokens
        self.i = 0
        self.depth = depth - 1
        self.enter()

    def enter(self) -> None:
        """One level deeper (a list, NOT or OR); too deep is an error, not a recursion."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise SearchError("search keys nested too deeply")

    def more(self) -> bool:
        return self.i < len(self.tokens)

    def next(self, what: str) -> Token:
        if self.i >= len(self.tokens):
            raise SearchError(f"missing {what}")
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def string(self, what: str = "search string") -> str:
        tok = self.next(what)
        if isinstance(tok, list):
            raise SearchError(f"expected {what}, got a list")
        if isinstance(tok, str):
            return tok
        try:
            return tok.decode(self.codec)
        except UnicodeDecodeError:
            raise SearchError(f"{what} is not valid {self.codec}") from None

    def atom(self, what: str) -> str:
        tok = self.next(what)
        if isinstance(tok, list):
            raise SearchError(f"expected {what}, got a list")
        return tok if isinstance(tok, str) else tok.decode("ascii", "replace")

    def number(self, what: str = "number") -> int:
        text = self.atom(what)
        if not text.isascii() or not text.isdigit() or len(text) > 19:
            raise SearchError(f"invalid {what} {text[:30]!r}")
        return int(text)

    def date(self) -> dt.date:
        text = self.atom("date")
        day, _, rest = text.partition("-")
        mon, _, year = rest.partition("-")
        try:
            if not (day.isdigit() and len(day) <= 2 and year.isdigit() and len(year) == 4):
                raise ValueError(text)
            return dt.date(int(year), _MONTHS.index(mon.lower()) + 1, int(day))
        except ValueError:
            raise SearchError(f"invalid date {text[:30]!r}") from None


# --- keys ----------------------------------------------------------------------------

_FLAG_KEYS = {
    "ANSWERED": ("\\answered", True),
    "DELETED": ("\\deleted", True),
    "DRAFT": ("\\draft", True),
    "FLAGGED": ("\\flagged", True),
    "RECENT": ("\\recent", True),
    "SEEN": ("\\seen", True),
    "OLD": ("\\recent", False),
    "UNANSWERED": ("\\answered", False),
    "UNDELETED": ("\\deleted", False),
    "UNDRAFT": ("\\draft", False),
    "UNFLAGGED": ("\\flagged", False),
    "UNSEEN": ("\\seen", False),
}

_ADDRESS_KEYS = {"BCC": "bcc", "CC": "cc", "FROM": "from", "TO": "to"}


def _flag(name: str, present: bool) -> _Node:
    return _Node(lambda e: (name in e.flags) == present)


def _header_search(field: str, needle: str) -> _Node:
    folded = needle.casefold()
    if not folded:
        return _Node(lambda e: e.view.has_header(field), Need.HEADERS)
    return _Node(
        lambda e: any(folded in v.casefold() for v in e.view.header_values(field)), Need.HEADERS
    )


def _address_search(field: str, needle: str) -> _Node:
    """FROM/TO/CC/BCC: each address on its own (``"Doe, J" <j@x.org>``), as Dovecot."""
    folded = needle.casefold()
    if not folded:
        return _Node(lambda e: e.view.has_header(field), Need.HEADERS)
    return _Node(
        lambda e: any(folded in v.casefold() for v in e.view.address_values(field)), Need.HEADERS
    )


def _date_test(when: dt.date, op: str, sent: bool) -> _Node:
    compare: Callable[[dt.date], bool] = {
        "BEFORE": lambda d: d < when,
        "ON": lambda d: d == when,
        "SINCE": lambda d: d >= when,
    }[op]
    if not sent:
        return _Node(lambda e: compare(e.internal_date()))

    def test(e: _Eval) -> bool:
        return compare(e.view.sent_date() or _NO_DATE)

    return _Node(test, Need.HEADERS)


def _modseq(r: _Reader) -> _Node:
    """``MODSEQ ["/flags/\\seen" all] n`` (RFC 7162): all flags share one modseq here."""
    if r.more() and isinstance(r.tokens[r.i], bytes):
        r.next("entry name")
        entry_type = r.atom("entry type").lower()
        if entry_type not in ("priv", "shared", "all"):
            raise SearchError(f"invalid MODSEQ entry type {entry_type[:20]!r}")
    value = r.number("mod-sequence value")
    return _Node(lambda e: e.view.modseq >= value, Need.METADATA, modseq=True)


def _sequence(text: str, uid: bool) -> _Node:
    try:
        seqset = SequenceSet.parse(text)
    except SequenceSetError as e:
        raise SearchError(str(e)) from None
    if uid:
        return _Node(lambda e: seqset.contains(e.view.uid, e.scope.last_uid))
    return _Node(lambda e: seqset.contains(e.view.seq, e.scope.last_seq))


def _key(r: _Reader) -> _Node:
    tok = r.next("search key")
    if isinstance(tok, list):
        if not tok:
            raise SearchError("empty parenthesised search keys")
        return _keys(_Reader(tok, r.depth + 1, r.codec))
    if isinstance(tok, bytes):
        raise SearchError(f"unexpected string {tok[:30]!r} where a search key belongs")
    key = tok.upper()
    if key == "ALL":
        return _Node(lambda e: True)
    if key in _FLAG_KEYS:
        return _flag(*_FLAG_KEYS[key])
    if key == "NEW":
        return _Node(lambda e: "\\recent" in e.flags and "\\seen" not in e.flags)
    if key in ("KEYWORD", "UNKEYWORD"):
        name = r.atom("flag keyword").lower()
        if name.startswith("\\"):  # a system flag is no keyword: KEYWORD \Seen matches none
            return _Node(lambda e: key == "UNKEYWORD")
        return _flag(name, key == "KEYWORD")
    if key == "SUBJECT":
        return _header_search("subject", r.string())
    if key in _ADDRESS_KEYS:
        return _address_search(_ADDRESS_KEYS[key], r.string())
    if key == "HEADER":
        field = r.string("header field name")
        if not field or any(c <= " " or c == ":" or c > "~" for c in field):
            raise SearchError(f"invalid header field name {field[:30]!r}")
        return _header_search(field.lower(), r.string())
    if key in ("BODY", "TEXT"):
        folded = r.string().casefold()
        which = key.lower()
        return _Node(lambda e: folded in e.text(which), Need.FULL)
    if key in ("BEFORE", "ON", "SINCE"):
        return _date_test(r.date(), key, sent=False)
    if key in ("SENTBEFORE", "SENTON", "SENTSINCE"):
        return _date_test(r.date(), key[4:], sent=True)
    if key == "LARGER":
        n = r.number()
        return _Node(lambda e: e.view.size > n)
    if key == "SMALLER":
        n = r.number()
        return _Node(lambda e: e.view.size < n)
    if key == "NOT":
        r.enter()
        inner = _key(r)
        r.depth -= 1
        return _Node(lambda e: not inner.test(e), inner.need, inner.modseq)
    if key == "OR":
        r.enter()
        a, b = _key(r), _key(r)
        r.depth -= 1
        return _join("or", [a, b])
    if key == "UID":
        return _sequence(r.atom("UID set"), uid=True)
    if key == "MODSEQ":
        return _modseq(r)
    if tok[:1].isdigit() or tok[:1] == "*":
        return _sequence(tok, uid=False)
    raise SearchError(f"unknown search key {tok[:30]!r}")


def _keys(r: _Reader) -> _Node:
    nodes = [_key(r)]
    while r.more():
        nodes.append(_key(r))
    return nodes[0] if len(nodes) == 1 else _all(nodes)


# --- the program -----------------------------------------------------------------------


@attrs.frozen
class SearchProgram:
    """Compiled search keys: what they need, and a test per message."""

    root: _Node = attrs.field(repr=False)
    charset: str
    need: Need
    uses_modseq: bool

    def matches(self, view: MessageView, scope: Scope) -> bool:
        """Does ``view`` match? (A message the search needs but lacks raises ValueError.)"""
        return self.root.test(_Eval(view, scope))

    def search(self, views: Iterable[MessageView], scope: Scope) -> list[MessageView]:
        """The matching views, in the given order."""
        return [v for v in views if self.matches(v, scope)]


def _codec(charset: str) -> str:
    """The Python codec for a CHARSET; US-ASCII reads UTF-8 (as Dovecot); unknown ones
    are BADCHARSET. Any charset Python knows is accepted, as Dovecot accepts iconv's."""
    if charset in CHARSETS:
        return "utf-8"
    try:
        info = codecs.lookup(charset)
    except LookupError:
        raise SearchError(f"unsupported charset {charset[:40]!r}", code="BADCHARSET") from None
    if info.name in _NOT_TEXT:
        raise SearchError(f"unsupported charset {charset[:40]!r}", code="BADCHARSET")
    return info.name


#: Python codecs that are not character sets (``CHARSET base64`` is not a charset).
_NOT_TEXT = {"base64", "bz2", "hex", "quopri", "rot-13", "uu", "zlib", "idna", "punycode"}


def compile_search(tokens: Sequence[Token], charset: str | None = None) -> SearchProgram:
    """Check and compile SEARCH keys (see the module docstring for the token form)."""
    name = "US-ASCII" if charset is None else charset.upper()
    codec = _codec(name)
    if not tokens:
        raise SearchError("missing search keys")
    try:
        root = _keys(_Reader(list(tokens), 0, codec))
    except RecursionError:
        raise SearchError("search keys nested too deeply") from None
    return SearchProgram(root, name, root.need, root.modseq)


# --- responses: SEARCH and ESEARCH ------------------------------------------------------------

#: ESEARCH RETURN options (RFC 4731) this module computes.
RETURN_OPTIONS = ("MIN", "MAX", "COUNT", "ALL")


def parse_return_options(tokens: Sequence[Token]) -> tuple[str, ...]:
    """The list after ``RETURN``: ``["MIN", "COUNT"]`` -> options; empty means ``ALL``."""
    out: list[str] = []
    for tok in tokens:
        name = tok.upper() if isinstance(tok, str) else ""
        if name not in RETURN_OPTIONS:
            raise SearchError(f"unknown RETURN option {str(tok)[:30]!r}")
        if name not in out:
            out.append(name)
    return tuple(out) or ("ALL",)


def esearch_items(numbers: Sequence[int], options: Iterable[str]) -> list[tuple[str, int | bytes]]:
    """``[(name, value)]`` for an ESEARCH response, in Dovecot's order (MIN MAX ALL COUNT).

    Values are numbers, or for ALL the sequence set as atom octets (``b"1:3,5"``). MIN,
    MAX and ALL are left out when nothing matched; COUNT is always given.
    """
    wanted = set(options)
    out: list[tuple[str, int | bytes]] = []
    if numbers and "MIN" in wanted:
        out.append(("MIN", min(numbers)))
    if numbers and "MAX" in wanted:
        out.append(("MAX", max(numbers)))
    if numbers and "ALL" in wanted:
        out.append(("ALL", format_uid_set(numbers)))
    if "COUNT" in wanted:
        out.append(("COUNT", len(numbers)))
    return out


def format_esearch(
    tag: bytes,
    numbers: Sequence[int],
    options: Iterable[str],
    uid: bool = False,
    modseq: int | None = None,
) -> bytes:
    """``ESEARCH (TAG "a1") UID MIN 2 COUNT 3 [MODSEQ n]`` (without the leading ``* ``)."""
    parts = [b'ESEARCH (TAG "' + tag + b'")']
    if uid:
        parts.append(b"UID")
    for name, value in esearch_items(numbers, options):
        parts.append(name.encode() + b" " + (value if isinstance(value, bytes) else b"%d" % value))
    if modseq is not None and numbers:
        parts.append(b"MODSEQ %d" % modseq)
    return b" ".join(parts)


def format_search(numbers: Iterable[int], modseq: int | None = None) -> bytes:
    """``SEARCH 2 3 (MODSEQ n)`` (without ``* ``); MODSEQ only when something matched."""
    numbers = list(numbers)
    out = b" ".join([b"SEARCH", *(b"%d" % n for n in numbers)])
    if modseq is not None and numbers:
        out += b" (MODSEQ %d)" % modseq
    return out
