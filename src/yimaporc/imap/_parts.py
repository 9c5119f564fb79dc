"""MIME entities as offsets into one message buffer: header fields, body, subparts.

A :class:`Part` never copies the message: a multipart's children and a message/rfc822
part's embedded message are offsets into the same ``bytes``, boundaries are found with
``bytes.find``, and :attr:`Part.raw`/:attr:`Part.head`/:attr:`Part.body` slice only
when asked. Which Content-* fields count, and where a part's octets end, follow
Dovecot 2.3 (see ``_message`` for the FETCH data built on top).
"""

from __future__ import annotations

import re

from ._headers import content_type

_LINE_BREAK = re.compile(rb"\r?\n")


# --- header fields ------------------------------------------------------------


def _header_end(buf: bytes, start: int, end: int) -> int:
    """Where the header of ``buf[start:end]`` ends (after its blank line); ``end`` if none."""
    for blank in (b"\r\n", b"\n"):
        if buf.startswith(blank, start, end):
            return start + len(blank)
    crlf = buf.find(b"\n\r\n", start, end)
    limit = end if crlf < 0 else crlf + 2
    lf = buf.find(b"\n\n", start, limit)
    if lf >= 0:
        return lf + 2
    return end if crlf < 0 else crlf + 3


def _fields(head: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(lower-case name, raw value after the colon, whole raw lines incl. line ends).

    Slices by offsets, so a field folded over many lines costs no more than its length.
    A line without a colon is a field named by the whole line, with an empty value.
    """
    starts: list[tuple[int, int]] = []  # (field start, colon offset or -1)
    pos = 0
    for line in head.splitlines(keepends=True):
        if not line.strip(b"\r\n"):
            break
        if line[:1] not in (b" ", b"\t") or not starts:
            colon = line.find(b":")
            starts.append((pos, pos + colon if colon >= 0 else -1))
        pos += len(line)
    out: list[tuple[bytes, bytes, bytes]] = []
    ends = [start for start, _ in starts[1:]] + [pos]
    for (start, colon), end in zip(starts, ends):
        if colon >= 0:
            name, value = head[start:colon], head[colon + 1 : end]
        else:
            name, value = head[start:end].split(b"\n", 1)[0], b""
        out.append((name.strip().lower(), value, head[start:end]))
    return out


def unfold(value: bytes) -> bytes:
    """An envelope value: leading blanks and line breaks removed, the rest kept."""
    return _LINE_BREAK.sub(b"", value.lstrip(b" \t")).lstrip(b" \t")


# --- MIME parts ------------------------------------------------------------------


#: MIME nesting deeper than this is shown as leaves (a hostile message cannot recurse us out).
MAX_DEPTH = 50


class Part:
    """One MIME entity: ``buf[start:end]``, header and body found by offsets.

    Parts share their message's buffer, so a 20 MB attachment is never copied to
    compute a structure; :attr:`raw`, :attr:`head` and :attr:`body` slice on demand.
    """

    def __init__(
        self,
        buf: bytes,
        start: int = 0,
        end: int | None = None,
        default_type: bytes = b"text/plain",
        depth: int = 0,
        child: bool = False,
    ) -> None:
        self.buf = buf
        self.start = start
        self.end = len(buf) if end is None else max(start, end)
        self.head_end = _header_end(buf, start, self.end)
        self.depth = depth
        self.child = child
        #: Octets of the next boundary's line break this part ran on into (Dovecot quirk).
        self.borrowed = 0
        self._default = default_type
        self._fields: list[tuple[bytes, bytes, bytes]] | None = None
        self._ctype: tuple[bytes, bytes, list[tuple[bytes, bytes]]] | None = None
        self._children: list[Part] | None = None
        self._embedded: Part | None = None

    @property
    def raw(self) -> bytes:
        """Every octet of the entity."""
        if self.start == 0 and self.end == len(self.buf):
            return self.buf
        return self.buf[self.start : self.end]

    @property
    def head(self) -> bytes:
        """The header including its blank line (all of it when there is no blank line)."""
        return self.buf[self.start : self.head_end]

    @property
    def body(self) -> bytes:
        return self.buf[self.head_end : self.end]

    @property
    def body_size(self) -> int:
        return self.end - self.head_end

    @property
    def body_lines(self) -> int:
        return self.buf.count(b"\n", self.head_end, self.end)

    @property
    def fields(self) -> list[tuple[bytes, bytes, bytes]]:
        """(lower-case name, raw value, raw lines) of every header field, in order."""
        if self._fields is None:
            self._fields = _fields(self.head)
        return self._fields

    def header(self, name: bytes, last: bool = True) -> bytes | None:
        """The raw value of the last (or first) ``name`` field, or None."""
        found = None
        for fname, value, _ in self.fields:
            if fname == name:
                if not last:
                    return value
                found = value
        return found

    def _value(self, name: bytes) -> bytes | None:
        """An envelope field: the last occurrence wins, as in Dovecot."""
        v = self.header(name)
        return None if v is None else unfold(v)

    @property
    def is_mime(self) -> bool:
        """Do Content-* fields count? In a multipart child, or with MIME-Version or
        Content-Type in the header; otherwise Dovecot shows only the defaults."""
        return self.child or any(n in (b"mime-version", b"content-type") for n, _, _ in self.fields)

    def mime(self, name: bytes) -> bytes | None:
        """A Content-* field: the first occurrence wins (Dovecot), None if not :attr:`is_mime`."""
        if name != b"content-type" and not self.is_mime:
            return None
        v = self.header(name, last=False)
        return None if v is None else unfold(v)

    @property
    def content_type(self) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
        """(type, subtype, params), with RFC 2045's defaults."""
        if self._ctype is None:
            value = self.mime(b"content-type")
            if value is None and self._default != b"text/plain":
                value = self._default
            kind, sub, params = content_type(value)
            if kind.lower() == b"text" and not any(k.lower() == b"charset" for k, _ in params):
                params.append((b"charset", b"us-ascii"))
            self._ctype = (kind, sub, params)
        return self._ctype

    def is_type(self, kind: bytes, sub: bytes | None = None) -> bool:
        """Does the Content-Type match (case-insensitively)?"""
        k, s, _ = self.content_type
        return k.lower() == kind and (sub is None or s.lower() == sub)

    @property
    def is_multipart(self) -> bool:
        return self.depth < MAX_DEPTH and self.is_type(b"multipart")

    @property
    def is_message(self) -> bool:
        """message/rfc822: the body is a whole message (:attr:`embedded`)."""
        return self.depth < MAX_DEPTH and self.is_type(b"message", b"rfc822")

    def param(self, name: bytes) -> bytes | None:
        for k, v in self.content_type[2]:
            if k.lower() == name:
                return v
        return None

    @property
    def children(self) -> list[Part]:
        """The subparts of a multipart (one empty text/plain when it has no boundary)."""
        if self._children is None:
            self._children = []
            if self.is_multipart:
                default = (
                    b"message/rfc822" if self.is_type(b"multipart", b"digest") else b"text/plain"
                )
                boundary = self.param(b"boundary")
                spans = (
                    _split_multipart(self.buf, self.head_end, self.end, boundary)
                    if boundary
                    else []
                )
                for first, last, longer in spans:
                    part = Part(self.buf, first, last, default, self.depth + 1, True)
                    if part.is_message and _unterminated(self.buf, part.head_end, last):
                        # Dovecot: an embedded header with no blank line runs on through
                        # the line break that belongs to the next boundary.
                        part = Part(self.buf, first, longer, default, self.depth + 1, True)
                        part.borrowed = longer - max(first, last)
                    self._children.append(part)
                self._children = self._children or [Part(b"", depth=self.depth + 1, child=True)]
        return self._children

    @property
    def embedded(self) -> Part | None:
        """The message inside a message/rfc822 part."""
        if self._embedded is None and self.is_message:
            self._embedded = Part(self.buf, self.head_end, self.end, depth=self.depth + 1)
        return self._embedded


def _unterminated(buf: bytes, start: int, end: int) -> bool:
    """Does the message in ``buf[start:end]`` lack the blank line ending its header?"""
    if buf.startswith((b"\r\n", b"\n"), start, end):
        return False
    return buf.find(b"\n\r\n", start, end) < 0 and buf.find(b"\n\n", start, end) < 0


def _split_multipart(
    buf: bytes, start: int, end: int, boundary: bytes
) -> list[tuple[int, int, int]]:
    """Offsets of the parts between ``--boundary`` lines in ``buf[start:end]``.

    Each part is ``(first, last, longer)``: it spans ``first:last``, without the line
    break before the next boundary (that break belongs to the boundary); ``first:longer``
    includes it. Found with ``bytes.find``, so a large body is scanned at C speed.
    """
    delim = b"--" + boundary
    spans: list[tuple[int, int, int]] = []
    first: int | None = None
    pos = start
    while True:
        i = buf.find(delim, pos, end)
        if i < 0:
            break
        pos = i + 1
        if i == start:
            brk = i
        elif buf[i - 1 : i] == b"\n":
            brk = i - 2 if i - 2 >= start and buf[i - 2 : i - 1] == b"\r" else i - 1
        else:
            continue
        j = i + len(delim)
        closing = buf.startswith(b"--", j, end)
        j += 2 if closing else 0
        while j < end and buf[j] in b" \t":
            j += 1
        if j < end and not buf.startswith((b"\n", b"\r\n"), j, end):
            continue
        if first is not None:
            spans.append((first, brk, i))
        if closing:
            return spans
        first = j + (2 if buf.startswith(b"\r\n", j, end) else 1 if j < end else 0)
        pos = max(pos, j)
    if first is not None:
        spans.append((first, end, end))
    return spans
