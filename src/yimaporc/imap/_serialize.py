"""IMAP responses as values, and their bytes: correct by construction.

Strings are encoded safely (quoted only for short printable 7-bit text,
literals for anything with CR, LF, NUL or 8-bit bytes), response text is
forced to printable ASCII, response codes are checked by name, flags and atoms
are validated.  A value that cannot be written correctly raises ``ValueError``
(our bug, never the client's).
"""

from __future__ import annotations

import datetime as _dt
import functools
from collections.abc import Iterable
from typing import Any

import attrs

from ._lexer import ASTRING_CHARS, ATOM_CHARS

_NO_ARG_CODES = frozenset(
    {
        "ALERT", "TRYCREATE", "NONEXISTENT", "ALREADYEXISTS", "TOOBIG", "AUTHENTICATIONFAILED",
        "AUTHORIZATIONFAILED", "UNAVAILABLE", "CANNOT", "READ-ONLY", "READ-WRITE", "NOMODSEQ",
        "CLOSED", "PARSE", "SERVERBUG", "CLIENTBUG", "LIMIT", "OVERQUOTA", "INUSE", "NOPERM",
        "EXPUNGEISSUED", "CONTACTADMIN", "PRIVACYFAILED", "CORRUPTION", "EXPIRED", "HASCHILDREN",
        "UNKNOWN-CTE", "USEATTR", "NOTSAVED", "PRIVACYREQUIRED",
    }
)  # fmt: skip
_NUMBER_CODES = frozenset({"UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ"})
_LIST_CODES = frozenset({"PERMANENTFLAGS", "BADCHARSET"})
STATUSES = frozenset({"OK", "NO", "BAD", "BYE", "PREAUTH"})


#: ATOM-CHAR as a deletion table for ``bytes.translate`` (the check in one C pass).
_ATOM_BYTES = bytes(sorted(ATOM_CHARS))


def _check_atom(value: str, extra: str = "") -> bytes:
    data = value.encode("ascii", "strict") if value.isascii() else b""
    rest = data.translate(None, _ATOM_BYTES)  # the bytes that are not ATOM-CHARs
    if not data or (rest and any(chr(b) not in extra for b in rest)):
        raise ValueError(f"not an atom: {value!r}")
    return data


@functools.lru_cache(maxsize=64)
def _capability_body(names: tuple[Any, ...]) -> bytes:
    """``CAPABILITY name ...``, checked; a connection's list is one of a few, built for
    every greeting and LOGIN: remembered."""
    return _atom_list(names)


def _atom_list(names: tuple[Any, ...]) -> bytes:
    return b"CAPABILITY " + b" ".join(_check_atom(x, "=") for x in names)


def flag_bytes(flag: str) -> bytes:
    """A flag (``\\Seen``, ``\\*`` or a keyword atom), validated."""
    if flag == "\\*":
        return b"\\*"
    if flag.startswith("\\"):
        return b"\\" + _check_atom(flag[1:])
    return _check_atom(flag)


def _seq_set(value: str) -> bytes:
    if not value or any(ch not in "0123456789:,*" for ch in value):
        raise ValueError(f"not a sequence set: {value!r}")
    return value.encode("ascii")


@attrs.frozen
class ResponseCode:
    """A response code ``[NAME args]``; build with the class methods or ``ResponseCode("TRYCREATE")``."""

    name: str
    args: tuple[Any, ...] = ()

    def __attrs_post_init__(self) -> None:
        self.to_bytes()  # refuse what cannot be written at construction

    @classmethod
    def number(cls, name: str, value: int) -> ResponseCode:
        """UIDNEXT, UIDVALIDITY, UNSEEN, HIGHESTMODSEQ."""
        return cls(name, (value,))

    @classmethod
    def appenduid(cls, uidvalidity: int, uids: str) -> ResponseCode:
        """``[APPENDUID validity uid-set]`` (UIDPLUS)."""
        return cls("APPENDUID", (uidvalidity, uids))

    @classmethod
    def copyuid(cls, uidvalidity: int, source: str, dest: str) -> ResponseCode:
        """``[COPYUID validity source-set dest-set]`` (UIDPLUS)."""
        return cls("COPYUID", (uidvalidity, source, dest))

    def to_bytes(self) -> bytes:
        """``[...]`` bytes."""
        name = self.name
        a = self.args
        if name in _NO_ARG_CODES and not a:
            body = name.encode("ascii")
        elif name in _NUMBER_CODES and len(a) == 1 and _is_uint(a[0]):
            body = b"%s %d" % (name.encode(), a[0])
        elif name == "PERMANENTFLAGS":
            body = b"PERMANENTFLAGS (" + b" ".join(flag_bytes(f) for f in a) + b")"
        elif name == "BADCHARSET":
            body = b"BADCHARSET" + (b" (" + b" ".join(astring(x) for x in a) + b")" if a else b"")
        elif name == "CAPABILITY" and a:
            body = _capability_body(a) if all(type(x) is str for x in a) else _atom_list(a)
        elif name == "APPENDUID" and len(a) == 2 and _is_uint(a[0]):
            body = b"APPENDUID %d %s" % (a[0], _seq_set(a[1]))
        elif name == "COPYUID" and len(a) == 3 and _is_uint(a[0]):
            body = b"COPYUID %d %s %s" % (a[0], _seq_set(a[1]), _seq_set(a[2]))
        elif name == "MODIFIED" and len(a) == 1:
            body = b"MODIFIED " + _seq_set(a[0])
        else:
            raise ValueError(f"bad response code {name!r} {a!r}")
        return b"[" + body + b"]"


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63


def safe_text(text: str) -> bytes:
    """Human-readable response text: printable ASCII only (others become ``?``)."""
    out = "".join(ch if " " <= ch <= "~" else "?" for ch in text).strip()
    if out.startswith("["):
        out = "(" + out[1:]
    return out.encode("ascii") or b"done"


def string(data: bytes | str) -> bytes:
    """An IMAP string: quoted when safe (short printable 7-bit), else a literal."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if len(data) <= 1000 and all(32 <= b < 127 for b in data):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(data) + data


def nstring(data: bytes | str | None) -> bytes:
    """A string or NIL."""
    return b"NIL" if data is None else string(data)


def astring(data: bytes | str) -> bytes:
    """An atom when allowed (and not NIL), else a string."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if raw and raw.upper() != b"NIL" and all(b in ASTRING_CHARS for b in raw):
        return raw
    return string(raw)


def nested(value: Any, depth: int = 0) -> bytes:
    """ENVELOPE/BODYSTRUCTURE trees: None=NIL, bytes/str=string, int=number, tuple/list=list."""
    if depth > 64:
        raise ValueError("structure nested too deeply")
    if value is None:
        return b"NIL"
    if isinstance(value, bool):
        raise ValueError("booleans have no IMAP form")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("negative number")
        return b"%d" % value
    if isinstance(value, bytes | str):
        return string(value)
    if isinstance(value, tuple | list):
        return b"(" + b" ".join(nested(v, depth + 1) for v in value) + b")"
    raise ValueError(f"cannot write {type(value).__name__} in a structure")


_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()


def internal_date(when: float | _dt.datetime) -> bytes:
    """``"17-Jul-1996 02:44:25 +0000"`` (date-time)."""
    if not isinstance(when, _dt.datetime):
        when = _dt.datetime.fromtimestamp(when, _dt.UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.UTC)
    off = when.utcoffset() or _dt.timedelta(0)
    minutes = int(off.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    text = (
        f"{when.day:2d}-{_MONTHS[when.month - 1]}-{when.year:04d} "
        f"{when.hour:02d}:{when.minute:02d}:{when.second:02d} {sign}{minutes // 60:02d}{minutes % 60:02d}"
    )
    return b'"' + text.encode("ascii") + b'"'


# -- responses ----------------------------------------------------------------------


@attrs.frozen
class StatusResponse:
    """``tag OK/NO/BAD [code] text``, or untagged (``tag=None``) including BYE/PREAUTH."""

    status: str
    text: str = ""
    code: ResponseCode | None = None
    tag: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"bad status {self.status!r}")
        if self.tag is not None and (self.status in ("BYE", "PREAUTH") or not self.tag):
            raise ValueError("BYE and PREAUTH are untagged")
        if self.tag is not None:
            _check_atom(self.tag.replace("]", "a"))


@attrs.frozen
class Continuation:
    """``+ text`` (or ``+ base64`` of a SASL challenge when ``data`` is given)."""

    text: str = "Ready"
    data: bytes | None = None


@attrs.frozen
class Data:
    """An untagged data response built by the functions below: ``* <body>``."""

    body: bytes


def capability(caps: Iterable[str]) -> Data:
    """``* CAPABILITY IMAP4rev1 ...``."""
    return Data(b"CAPABILITY " + b" ".join(_check_atom(c, "=") for c in caps))


def enabled(caps: Iterable[str]) -> Data:
    """``* ENABLED ...`` (RFC 5161)."""
    return Data(b" ".join([b"ENABLED", *(_check_atom(c, "=") for c in caps)]))


def exists(n: int) -> Data:
    """``* n EXISTS``."""
    return Data(b"%d EXISTS" % n)


def recent(n: int) -> Data:
    """``* n RECENT``."""
    return Data(b"%d RECENT" % n)


def expunge(seq: int) -> Data:
    """``* seq EXPUNGE``."""
    if seq < 1:
        raise ValueError("sequence numbers start at 1")
    return Data(b"%d EXPUNGE" % seq)


def vanished(uids: str, earlier: bool = False) -> Data:
    """``* VANISHED [(EARLIER)] uid-set`` (QRESYNC)."""
    return Data(b"VANISHED " + (b"(EARLIER) " if earlier else b"") + _seq_set(uids))


def flags(flag_list: Iterable[str]) -> Data:
    """``* FLAGS (...)``."""
    return Data(b"FLAGS (" + b" ".join(flag_bytes(f) for f in flag_list) + b")")


def list_item(
    attributes: Iterable[str],
    delimiter: str | None,
    name: str,
    lsub: bool = False,
    extended: Iterable[tuple[str, Any]] = (),
) -> Data:
    """``* LIST (\\HasNoChildren) "/" "name"`` (or LSUB), with extended items."""
    attrs_b = b" ".join(flag_bytes(a) for a in attributes)
    delim = b"NIL" if delimiter is None else string(delimiter)
    out = b"LSUB (" if lsub else b"LIST ("
    out += attrs_b + b") " + delim + b" " + string(name)
    ext = list(extended)
    if ext:
        out += b" (" + b" ".join(_check_atom(k) + b" " + nested(v) for k, v in ext) + b")"
    return Data(out)


def status(mailbox: str, items: Iterable[tuple[str, int]]) -> Data:
    """``* STATUS name (MESSAGES n ...)``."""
    parts = [_check_atom(k) + b" %d" % v for k, v in items]
    return Data(b"STATUS " + astring(mailbox) + b" (" + b" ".join(parts) + b")")


def search(numbers: Iterable[int], modseq: int | None = None) -> Data:
    """``* SEARCH 1 2 3`` [``(MODSEQ n)``]."""
    out = b"SEARCH" + b"".join(b" %d" % n for n in numbers)
    if modseq is not None:
        out += b" (MODSEQ %d)" % modseq
    return Data(out)


def esearch(tag: str | None, uid: bool, items: Iterable[tuple[str, int | str]]) -> Data:
    """``* ESEARCH (TAG "a") UID MIN 1 ALL 1:3`` (RFC 4731)."""
    out = b"ESEARCH"
    if tag is not None:
        out += b" (TAG " + string(tag) + b")"
    if uid:
        out += b" UID"
    for k, v in items:
        out += b" " + _check_atom(k) + b" " + (b"%d" % v if isinstance(v, int) else _seq_set(v))
    return Data(out)


def id_response(params: Iterable[tuple[str, str | None]] | None) -> Data:
    """``* ID (...)`` or ``* ID NIL``."""
    if params is None:
        return Data(b"ID NIL")
    parts = []
    for k, v in params:
        parts += [string(k), nstring(v)]
    return Data(b"ID (" + b" ".join(parts) + b")")


def namespace(
    personal: Iterable[tuple[str, str | None]] | None,
    other: Iterable[tuple[str, str | None]] | None = None,
    shared: Iterable[tuple[str, str | None]] | None = None,
) -> Data:
    """``* NAMESPACE (("" "/")) NIL NIL``."""

    def one(ns: Iterable[tuple[str, str | None]] | None) -> bytes:
        if ns is None:
            return b"NIL"
        return b"(" + b"".join(b"(" + string(p) + b" " + nstring(d) + b")" for p, d in ns) + b")"

    return Data(b"NAMESPACE " + one(personal) + b" " + one(other) + b" " + one(shared))


_NSTRING_ITEMS = ("RFC822", "RFC822.HEADER", "RFC822.TEXT")


def fetch(seq: int, items: Iterable[tuple[str, Any]]) -> Data:
    """``* seq FETCH (...)``: the value's form follows the item name.

    FLAGS: flags; UID, RFC822.SIZE: number; MODSEQ: ``(n)``; INTERNALDATE:
    POSIX time or datetime; ENVELOPE, BODY, BODYSTRUCTURE: nested values;
    RFC822*, ``BODY[...]``, ``BINARY[...]``: nstring (a literal for any
    message content).
    """
    parts = []
    for name, value in items:
        key = name.upper()
        if key == "FLAGS":
            v = b"(" + b" ".join(flag_bytes(f) for f in value) + b")"
        elif key in ("UID", "RFC822.SIZE"):
            if not _is_uint(value):
                raise ValueError(f"{key} needs a number")
            v = b"%d" % value
        elif key == "MODSEQ":
            if not _is_uint(value):
                raise ValueError("MODSEQ needs a number")
            v = b"(%d)" % value
        elif key == "INTERNALDATE":
            v = internal_date(value)
        elif key in ("ENVELOPE", "BODY", "BODYSTRUCTURE"):
            v = nested(value)
        elif key in _NSTRING_ITEMS or key.startswith(("BODY[", "BINARY[", "BINARY.SIZE[")):
            if key.startswith("BINARY.SIZE["):
                v = b"%d" % value
            elif value is None:
                v = b"NIL"
            elif key.startswith("BINARY["):
                # Always a literal8 (RFC 3516: required when it holds NUL), as Dovecot.
                v = b"~{%d}\r\n" % len(value) + value
            else:
                v = b"{%d}\r\n" % len(value) + value if _needs_literal(value) else string(value)
            if "\r" in name or "\n" in name or not name.isascii():
                raise ValueError("bad item name")
        else:
            raise ValueError(f"unknown FETCH item {name!r}")
        parts.append(name.encode("ascii") + b" " + v)
    if seq < 1:
        raise ValueError("sequence numbers start at 1")
    return Data(b"%d FETCH (" % seq + b" ".join(parts) + b")")


def _needs_literal(value: bytes) -> bool:
    return len(value) > 1000 or any(not 32 <= b < 127 for b in value)


Response = StatusResponse | Continuation | Data


def serialize(response: Response) -> bytes:
    """The bytes of one response, CRLF included."""
    import base64

    if isinstance(response, Data):
        return b"* " + response.body + b"\r\n"
    if isinstance(response, Continuation):
        if response.data is not None:
            return b"+ " + base64.b64encode(response.data) + b"\r\n"
        return b"+ " + safe_text(response.text) + b"\r\n"
    head = b"*" if response.tag is None else response.tag.encode("ascii")
    out = head + b" " + response.status.encode("ascii") + b" "
    if response.code is not None:
        out += response.code.to_bytes() + b" "
    return out + safe_text(response.text) + b"\r\n"
