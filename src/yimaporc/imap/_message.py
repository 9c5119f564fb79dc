"""What FETCH shows of one message: ENVELOPE, BODY[STRUCTURE], sections, sizes, dates.

Everything is computed from the message's raw RFC 5322 octets, lazily: the header is
split off on construction, MIME parts only when a structure or a part is asked for.

**Return form.** Structured values are plain nested Python data that the response
serializer renders without knowing what they mean:

- ``None`` -> ``NIL``
- ``bytes`` -> a string (quoted, or a literal when it holds 8-bit octets, CR or LF)
- ``int`` -> a number
- ``tuple`` -> a parenthesised list of the above

Header values are kept as their raw octets, as Dovecot does: an 8-bit UTF-8 subject is
returned as UTF-8 bytes (never decoded, never a ``UnicodeEncodeError``) and RFC 2047
encoded words are left encoded. Case is kept as the message writes it (``"text"
"plain"``, ``"QUOTED-PRINTABLE"``), defaults are Dovecot's (``"7bit"``, ``("charset"
"us-ascii")`` for text/*). Sizes count the octets of a part's body only, not its MIME
header. Each rule was checked against Dovecot 2.3.19 on the messages of
``tests/imap/imapmsg_corpus.py``.

For SEARCH the module also gives decoded text: header values with RFC 2047 words
decoded, and the text of text/* parts with transfer encoding and charset undone.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import email.header
import email.utils
import quopri
import re
from collections.abc import Iterator

import attrs

from ._headers import (
    MIME_SPECIALS,
    MISSING_DOMAIN,
    Nested,
    flat_params,
    params,
    parse_addresses,
    special,
    tokens,
)
from ._parts import Part

_LINE_BREAK = re.compile(rb"\r?\n")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class SectionError(ValueError):
    """A ``section-spec`` that does not parse."""


def _text(value: bytes) -> str:
    """Raw header octets as text: UTF-8 where valid, else Latin-1."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


_FOLD = re.compile(rb"\r?\n[ \t]")
_NEEDS_QUOTES = re.compile(r'[,;:<>@()\[\]\\"]')


def decode_header_value(value: bytes) -> str:
    """A header value for searching: unfolded, 8-bit as UTF-8, RFC 2047 words decoded."""
    text = _text(_LINE_BREAK.sub(b"", _FOLD.sub(b" ", value))).strip()
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (LookupError, ValueError, UnicodeError, binascii.Error):
        return text


# --- ENVELOPE and BODYSTRUCTURE ----------------------------------------------------


def envelope(part: Part) -> tuple[Nested, ...]:
    """RFC 3501 7.4.2 ENVELOPE of a message (a root part or an embedded one)."""
    v = part._value

    def addresses(name: bytes) -> Nested:
        """Every occurrence's addresses, in order (Dovecot joins repeated fields)."""
        found: list[Nested] = []
        for fname, value, _ in part.fields:
            if fname == name:
                found.extend(parse_addresses(value) or ())
        return tuple(found) or None

    sender_from = addresses(b"from")
    sender = addresses(b"sender") or sender_from
    reply_to = addresses(b"reply-to") or sender_from
    return (
        v(b"date"),
        v(b"subject"),
        sender_from,
        sender,
        reply_to,
        addresses(b"to"),
        addresses(b"cc"),
        addresses(b"bcc"),
        v(b"in-reply-to"),
        v(b"message-id"),
    )


def _disposition(part: Part) -> Nested:
    value = part.mime(b"content-disposition")
    if value is None:
        return None
    toks = tokens(value, MIME_SPECIALS)
    semi = next((i for i, t in enumerate(toks) if special(t, b";")), len(toks))
    kind = b"".join(t.text for t in toks[:semi] if t.kind != "comment")
    return (kind, flat_params(params(toks[semi + 1 :])))


def _language(part: Part) -> Nested:
    value = part.mime(b"content-language")
    if value is None:
        return None
    tags = [t.strip() for t in re.sub(rb"\([^)]*\)", b"", value).split(b",")]
    return tuple(t for t in tags if t) or None


def body_structure(part: Part, extended: bool) -> tuple[Nested, ...]:
    """BODY (``extended=False``) or BODYSTRUCTURE of ``part``."""
    kind, sub, params = part.content_type
    if part.is_multipart:
        out: list[Nested] = [body_structure(c, extended) for c in part.children]
        out.append(sub)
        if extended:
            out += [
                flat_params(params),
                _disposition(part),
                _language(part),
                part.mime(b"content-location"),
            ]
        return tuple(out)
    fields: list[Nested] = [
        kind,
        sub,
        flat_params(params),
        part.mime(b"content-id"),
        part.mime(b"content-description"),
        part.mime(b"content-transfer-encoding") or b"7bit",
        part.body_size,
    ]
    inner = part.embedded
    if inner is not None:
        fields += [envelope(inner), body_structure(inner, extended), part.body_lines]
    elif kind.lower() == b"text":
        fields.append(part.body_lines)
    if extended:
        fields += [
            part.mime(b"content-md5"),
            _disposition(part),
            _language(part),
            part.mime(b"content-location"),
        ]
    return tuple(fields)


# --- sections ------------------------------------------------------------------------

_SECTION_TEXTS = ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME")


@attrs.frozen
class Section:
    """A ``section-spec``: part numbers, then what of that part (None = all of it)."""

    part: tuple[int, ...] = ()
    text: str | None = None
    fields: tuple[bytes, ...] = ()

    def __attrs_post_init__(self) -> None:
        if self.text is not None and self.text not in _SECTION_TEXTS:
            raise SectionError(f"unknown section text {self.text[:30]!r}")
        if self.text == "MIME" and not self.part:
            raise SectionError("MIME needs a part number")
        if self.text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT") and not self.fields:
            raise SectionError("HEADER.FIELDS needs field names")
        if any(n < 1 for n in self.part):
            raise SectionError("part numbers start at 1")

    def label(self) -> bytes:
        """The section as the response names it: ``1.2.HEADER.FIELDS (A B)`` (names upper-cased)."""
        out = [str(n).encode() for n in self.part]
        if self.text is not None:
            out.append(self.text.encode())
        text = b".".join(out)
        if self.fields:
            text += b" (" + b" ".join(f.upper() for f in self.fields) + b")"
        return text

    def item_name(self, origin: int | None = None) -> bytes:
        """The FETCH response item: ``BODY[1.MIME]``, ``BODY[]<0>`` (also for BODY.PEEK)."""
        name = b"BODY[" + self.label() + b"]"
        return name if origin is None else name + b"<%d>" % origin


_SECTION = re.compile(
    rb"^((?:[1-9][0-9]{0,8})(?:\.[1-9][0-9]{0,8})*)?"
    rb"(?:(?:^|\.)(HEADER\.FIELDS\.NOT|HEADER\.FIELDS|HEADER|TEXT|MIME))?"
    rb"(?: \(([^()]*)\))?$",
    re.IGNORECASE,
)


def parse_section(spec: bytes | str) -> Section:
    """The text between ``[`` and ``]``: ``b"1.2.HEADER.FIELDS (From To)"`` -> Section."""
    if isinstance(spec, str):
        spec = spec.encode("latin-1", "replace")
    m = _SECTION.match(spec)
    if m is None:
        raise SectionError(f"invalid section {spec[:40]!r}")
    nums, text, names = m.groups()
    fields = tuple(names.split()) if names is not None else ()
    if names is not None and (text is None or not text.upper().startswith(b"HEADER.FIELDS")):
        raise SectionError("field names only follow HEADER.FIELDS")
    if nums is None and text is not None and spec[:1] == b".":
        raise SectionError(f"invalid section {spec[:40]!r}")
    part = tuple(int(n) for n in nums.split(b".")) if nums else ()
    return Section(part, text.upper().decode() if text else None, fields)


def _locate(root: Part, numbers: tuple[int, ...]) -> Part | None:
    """Walk part numbers into multipart children and message/rfc822 bodies.

    Part 1 of a non-multipart message (the root or an embedded one) is that message's
    body, and has no subparts. As in Dovecot 2.3, a non-multipart part of a multipart
    answers to ``.1`` as itself (``2.1.1`` is leaf ``2.1``).
    """
    current, state = root, "message"
    for n in numbers:
        if current.embedded is not None and state != "message":
            current, state = current.embedded, "message"
        if current.is_multipart and state != "body":
            if n > len(current.children):
                return None
            current, state = current.children[n - 1], "child"
        elif n == 1 and state != "body":
            state = "body" if state == "message" else "child"
        else:
            return None
    return current


def _header_fields(part: Part, names: tuple[bytes, ...], negate: bool) -> bytes:
    wanted = {n.lower() for n in names}
    kept = [lines for name, _, lines in part.fields if (name in wanted) != negate]
    kept = [x if x.endswith(b"\n") else x + b"\r\n" for x in kept]
    ended = part.head.endswith((b"\n\r\n", b"\n\n")) or part.head in (b"\r\n", b"\n")
    return b"".join(kept) + (b"\r\n" if ended else b"")


def extract(root: Part, section: Section) -> bytes:
    """The octets of ``BODY[section]``; empty when the part does not exist."""
    part = _locate(root, section.part)
    if part is None:
        return b""
    if section.text is None:
        return part.raw if not section.part else part.body
    if section.text == "MIME":
        return part.head
    message = part if not section.part else part.embedded
    if message is None:
        return b""
    if section.text == "HEADER":
        return message.head[: len(message.head) - part.borrowed]
    if section.text == "TEXT":
        return message.body
    return _header_fields(message, section.fields, section.text == "HEADER.FIELDS.NOT")


class UnknownEncoding(ValueError):
    """BINARY of a part whose Content-Transfer-Encoding is not one we can undo."""


def binary_content(root: Part, numbers: tuple[int, ...]) -> bytes | None:
    """``BINARY[numbers]`` (RFC 3516): the part's body with its Content-Transfer-Encoding
    undone (7bit/8bit/binary as they are, base64, quoted-printable); ``BINARY[]`` is the
    whole message, a multipart or message/rfc822 part its body as stored. None when the
    part does not exist; :class:`UnknownEncoding` for any other encoding."""
    if not numbers:
        return root.raw
    part = _locate(root, numbers)
    if part is None:
        return None
    data = part.body
    if part.is_multipart or part.embedded is not None:
        return data
    encoding = (part.mime(b"content-transfer-encoding") or b"7bit").strip().lower()
    if encoding in (b"7bit", b"8bit", b"binary"):
        return data
    if encoding == b"base64":
        return _unbase64(data)
    if encoding == b"quoted-printable":
        return quopri.decodestring(data)
    raise UnknownEncoding(encoding.decode("ascii", "replace")[:40])


def partial(data: bytes, origin: int, count: int) -> bytes:
    """``BODY[...]<origin.count>``: the octets from ``origin``, at most ``count`` of them."""
    return data[origin : origin + count]


# --- decoded text for SEARCH ------------------------------------------------------------


def _unbase64(data: bytes) -> bytes:
    """Lenient base64: stray characters skipped, a broken tail dropped (never the raw text)."""
    clean = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
    clean = clean[: len(clean) - len(clean) % 4] if len(clean) % 4 == 1 else clean
    return base64.b64decode(clean + b"=" * (-len(clean) % 4))


def _decode_body(part: Part) -> str:
    """A text part's content as text: transfer encoding undone, then its charset
    (us-ascii or none is read as UTF-8, as Dovecot does; unknown charsets likewise)."""
    # Unlike BODYSTRUCTURE, Dovecot's search decodes a non-MIME entity's encoding too.
    encoding = (part.header(b"content-transfer-encoding", last=False) or b"").strip().lower()
    data = part.body
    if encoding == b"base64":
        data = _unbase64(data)
    elif encoding == b"quoted-printable":
        data = quopri.decodestring(data)
    charset = (part.param(b"charset") or b"").decode("ascii", "replace").strip().lower()
    if charset in ("", "us-ascii", "ascii", "utf-8", "utf8"):
        return data.decode("utf-8", "replace")
    try:
        return data.decode(charset, "replace")
    except LookupError:
        return _text(data)


def _texts(part: Part, headers: bool) -> Iterator[str]:
    if headers:
        yield header_text(part)
    if part.embedded is not None:
        yield from _texts(part.embedded, headers)
    elif part.is_multipart:
        for c in part.children:
            yield from _texts(c, headers)
    elif part.is_type(b"text"):
        yield _decode_body(part)


def header_text(part: Part) -> str:
    """The whole header, each value decoded, one field per line (SEARCH TEXT)."""
    return "\n".join(
        f"{_text(name)}: {decode_header_value(value)}" for name, value, _ in part.fields
    )


def _address_texts(value: bytes) -> list[str]:
    out: list[str] = []
    for addr in parse_addresses(value, collapse=False) or ():
        name, _, mailbox, host = addr  # type: ignore[misc]
        if not isinstance(mailbox, bytes):
            continue  # end of a group
        if host is None:
            out.append(decode_header_value(mailbox) + ":")
            continue
        spec = _text(mailbox)
        if isinstance(host, bytes) and host != MISSING_DOMAIN:
            spec += "@" + _text(host)
        if not isinstance(name, bytes):
            out.append(spec)
            continue
        text = decode_header_value(name)
        if _NEEDS_QUOTES.search(text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(f"{text} <{spec}>")
    return out


# --- the message ----------------------------------------------------------------------------


class Message:
    """One stored message, answering FETCH items from its raw octets (cached per item)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.root = Part(raw)
        self._envelope: tuple[Nested, ...] | None = None
        self._structures: dict[bool, tuple[Nested, ...]] = {}

    @property
    def size(self) -> int:
        """RFC822.SIZE: every octet."""
        return len(self.raw)

    def envelope(self) -> tuple[Nested, ...]:
        """ENVELOPE (RFC 3501 7.4.2)."""
        if self._envelope is None:
            self._envelope = envelope(self.root)
        return self._envelope

    def body_structure(self, extended: bool = True) -> tuple[Nested, ...]:
        """BODYSTRUCTURE, or BODY with ``extended=False``."""
        if extended not in self._structures:
            self._structures[extended] = body_structure(self.root, extended)
        return self._structures[extended]

    def section(
        self, section: Section, origin: int | None = None, count: int | None = None
    ) -> bytes:
        """``BODY[section]`` or ``BODY[section]<origin.count>``."""
        data = extract(self.root, section)
        if origin is None:
            return data
        return partial(data, origin, len(data) if count is None else count)

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name``, decoded (SEARCH FROM/SUBJECT/HEADER)."""
        key = name.lower().encode("ascii", "replace")
        return [decode_header_value(v) for n, v, _ in self.root.fields if n == key]

    def address_values(self, name: str) -> list[str]:
        """Each address of every ``name`` field as Dovecot's SEARCH FROM/TO/CC/BCC sees it:
        ``"Doe, J" <j@x.org>``, ``Jörg <j@x>``, ``j@x.org``, ``group:`` (names decoded)."""
        key = name.lower().encode("ascii", "replace")
        out: list[str] = []
        for fname, value, _ in self.root.fields:
            if fname == key:
                out += _address_texts(value)
        return out

    def has_header(self, name: str) -> bool:
        key = name.lower().encode("ascii", "replace")
        return any(n == key for n, _, _ in self.root.fields)

    def body_text(self) -> str:
        """The decoded text of every text/* part, nested messages included (SEARCH BODY).

        Preamble, epilogue and non-text parts are not searched (nor by Dovecot).
        """
        return "\n".join(_texts(self.root, headers=False))

    def full_text(self) -> str:
        """:meth:`body_text` plus every header: the message's, each MIME part's and each
        embedded message's, decoded (SEARCH TEXT, as Dovecot searches it)."""
        return "\n".join(_texts(self.root, headers=True))

    def sent_date(self) -> dt.date | None:
        """The Date: header's calendar date in its own zone (SENTBEFORE/SENTON/SENTSINCE)."""
        value = self.root._value(b"date")
        if value is None:
            return None
        parsed = email.utils.parsedate_tz(value.decode("latin-1"))
        if parsed is None:
            return None
        try:
            return dt.date(parsed[0], parsed[1], parsed[2])
        except ValueError:
            return None


_BARE_LINE_END = re.compile(rb"\r?\n|\r(?!\n)")


def canonical_crlf(raw: bytes) -> bytes:
    """Every line end as CRLF (bare LF or CR made CRLF), as messages should be stored.

    IMAP sizes and sections count the stored octets, so a message kept with bare LFs
    would show sizes that disagree with the CRLF text a client receives; Dovecot
    presents such mail with CRLF. Apply this on APPEND and delivery.
    """
    pairs = raw.count(b"\r\n")
    if raw.count(b"\n") == pairs and raw.count(b"\r") == pairs:
        return raw  # already canonical: no copy
    return _BARE_LINE_END.sub(b"\r\n", raw)


# --- INTERNALDATE ----------------------------------------------------------------------------


def format_internaldate(timestamp: float, utc_offset_minutes: int = 0) -> bytes:
    """POSIX time -> ``b"17-Jul-1996 02:44:25 -0700"`` in the given zone."""
    zone = dt.timezone(dt.timedelta(minutes=utc_offset_minutes))
    d = dt.datetime.fromtimestamp(timestamp, zone)
    sign = "-" if utc_offset_minutes < 0 else "+"
    hh, mm = divmod(abs(utc_offset_minutes), 60)
    return (
        f"{d.day:02d}-{_MONTHS[d.month - 1]}-{d.year:04d} "
        f"{d.hour:02d}:{d.minute:02d}:{d.second:02d} {sign}{hh:02d}{mm:02d}"
    ).encode("ascii")


_INTERNALDATE = re.compile(
    rb"^ ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)$"
)


def parse_internaldate(text: bytes) -> float:
    """``b"17-Jul-1996 02:44:25 -0700"`` (APPEND date-time) -> POSIX time; ValueError if bad."""
    m = _INTERNALDATE.match(text)
    if m is None:
        raise ValueError("invalid date-time")
    day, mon, year, hh, mi, ss, sign, zh, zm = m.groups()
    months = [x.lower() for x in _MONTHS]
    if mon.decode().lower() not in months:
        raise ValueError("invalid month")
    offset = dt.timedelta(hours=int(zh), minutes=int(zm)) * (-1 if sign == b"-" else 1)
    d = dt.datetime(
        int(year), months.index(mon.decode().lower()) + 1, int(day),
        int(hh), int(mi), int(ss), tzinfo=dt.timezone(offset),
    )  # fmt: skip
    return d.timestamp()
