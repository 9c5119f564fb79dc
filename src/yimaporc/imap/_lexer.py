"""IMAP lexical layer: limits, command framing with literals, and a token reader.

:func:`frame` finds where one command ends in the receive buffer (a line, or
lines joined by literals ``{n}``/``{n+}``) and says when a synchronising
literal needs a ``+`` continuation.  :class:`Reader` reads the tokens of one
framed command; every mistake raises :class:`ParseError`, which the
connection turns into a ``BAD`` (never an exception out of ``receive_data``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

import attrs

T = TypeVar("T")

CTL = bytes(range(32)) + b"\x7f"
#: Bytes allowed in an atom (RFC 3501 ATOM-CHAR): CHAR minus atom-specials.
ATOM_CHARS = frozenset(range(1, 128)) - frozenset(b'(){ %*"\\]' + CTL)
#: ASTRING-CHAR adds resp-specials ("]").
ASTRING_CHARS = ATOM_CHARS | {ord("]")}
#: list-mailbox characters (wildcards and "]").
LIST_CHARS = ASTRING_CHARS | {ord("%"), ord("*")}
#: Tag characters: ASTRING-CHAR except "+".
TAG_CHARS = ASTRING_CHARS - {ord("+")}
#: Search-key atoms also hold sequence sets (``1:*``), so "*" is allowed.
SEARCH_ATOM_CHARS = ATOM_CHARS | {ord("*"), ord("]")}

_LITERAL_AT_END = re.compile(rb"\{([0-9]{1,20})(\+?)\}\r?$")
_SEQ_SET = re.compile(rb"(?:[0-9]+|\*)(?::(?:[0-9]+|\*))?(?:,(?:[0-9]+|\*)(?::(?:[0-9]+|\*))?)*")
_APPEND_HEAD = re.compile(rb"^[^ ]* (?:UID )?APPEND ", re.IGNORECASE)
_TAG_HEAD = re.compile(rb"^([^ \r\n]{1,64})")

MAX_NUMBER = 2**32 - 1
MAX_MODSEQ = 2**63 - 1


@attrs.frozen
class Limits:
    """Hard limits of one IMAP connection (all in bytes unless named otherwise).

    ``max_line``: one line (without its literals); ``max_literal``: a literal
    in any command but APPEND; ``max_append``: the message of an APPEND
    (above it: ``NO [TOOBIG]``); ``max_command``: a whole command with its
    literals; ``max_depth``: parenthesis nesting; ``max_args``: tokens in one
    command (SEARCH keys, FETCH items, flags); ``max_buffer``: unparsed bytes
    held while commands wait.
    """

    max_line: int = 64 * 1024
    max_literal: int = 64 * 1024
    max_append: int = 50 * 1024 * 1024
    max_command: int = 51 * 1024 * 1024
    max_depth: int = 16
    max_args: int = 4096
    max_buffer: int = 52 * 1024 * 1024


DEFAULT_LIMITS = Limits()


class ParseError(Exception):
    """A command that does not parse: answered ``tag BAD text`` (or ``* BAD``).

    ``code`` is a response-code name (``"TOOBIG"``, ``"PARSE"``) or None;
    ``status`` is ``"BAD"`` except for an oversized APPEND (``"NO"``).
    """

    def __init__(
        self, text: str, tag: str | None = None, code: str | None = None, status: str = "BAD"
    ) -> None:
        super().__init__(text)
        self.text = text
        self.tag = tag
        self.code = code
        self.status = status


@attrs.frozen
class Complete:
    """A whole command occupies ``buf[0:end]``; the line terminator ends at ``consumed``."""

    end: int
    consumed: int


@attrs.frozen
class NeedMore:
    """The command is not complete; ``continuation`` is the offset of a synchronising
    literal's announcement still waiting for its ``+`` (None when none is due)."""

    continuation: int | None = None
    need: int = 0


@attrs.frozen
class Refused:
    """The command breaks a limit.

    ``consumed`` bytes are dropped (through the announcing line of a
    synchronising literal, whose data the client will not send); ``fatal``
    means the stream cannot be resynchronised (a line without end, an
    oversized non-synchronising literal): say BYE and close.
    """

    error: ParseError
    consumed: int
    fatal: bool = False


def tag_of(line: bytes) -> str | None:
    """The tag at the start of a (possibly broken) command line, if it is a valid tag."""
    m = _TAG_HEAD.match(line)
    if m is None:
        return None
    tag = m.group(1)
    if all(b in TAG_CHARS for b in tag):
        return tag.decode("ascii")
    return None


def frame(data: bytes | bytearray, limits: Limits, pos: int = 0) -> Complete | NeedMore | Refused:
    """Find the end of the first command in ``data`` (lines joined by literals).

    ``NeedMore.need`` is the buffer length below which framing again is pointless
    (the rest of a literal has not arrived), so a big APPEND costs O(n) in all.
    Offsets are absolute; the command starts at ``pos``.
    """
    start = pos
    head = bytes(data[start : start + 64])
    while True:
        nl = data.find(b"\n", pos, pos + limits.max_line + 2)
        if nl < 0:
            if len(data) - pos > limits.max_line:
                return Refused(ParseError("line too long", tag_of(head)), len(data), True)
            return NeedMore()
        line_end = nl - 1 if nl > pos and data[nl - 1] == 0x0D else nl
        if line_end - pos > limits.max_line:
            return Refused(ParseError("line too long", tag_of(head)), nl + 1, fatal=True)
        m = _LITERAL_AT_END.search(data, pos, nl + 1)
        if m is None:
            return Complete(line_end, nl + 1)
        size = int(m.group(1))
        sync = not m.group(2)
        is_append = _APPEND_HEAD.match(head) is not None
        cap = limits.max_append if is_append else limits.max_literal
        if size > cap or nl + 1 + size - start > limits.max_command:
            tag = tag_of(head)
            err = (
                ParseError("message too big", tag, "TOOBIG", "NO")
                if is_append and size > cap
                else ParseError("literal too big", tag, "TOOBIG")
            )
            return Refused(err, nl + 1, fatal=not sync)
        if len(data) < nl + 1 + size:
            return NeedMore(m.start() if sync else None, nl + 1 + size)
        pos = nl + 1 + size


_RUNS: dict[frozenset[int], re.Pattern[bytes]] = {}


def _run_regex(chars: frozenset[int]) -> re.Pattern[bytes]:
    pattern = _RUNS.get(chars)
    if pattern is None:
        body = b"".join(re.escape(bytes([ch])) for ch in sorted(chars))
        pattern = _RUNS[chars] = re.compile(b"[" + body + b"]+")
    return pattern


class Reader:
    """Reads the tokens of one framed command (``data`` ends before its final CRLF)."""

    def __init__(self, data: bytes, limits: Limits = DEFAULT_LIMITS) -> None:
        self.data = data
        self.pos = 0
        self.limits = limits
        self.depth = 0
        self.args = 0
        self.tag: str | None = None

    def error(self, text: str) -> ParseError:
        """A :class:`ParseError` for this command, carrying its tag."""
        return ParseError(text, self.tag)

    def peek(self) -> int | None:
        """The next byte, or None at the end."""
        return self.data[self.pos] if self.pos < len(self.data) else None

    def at_end(self) -> bool:
        """True when every byte has been read."""
        return self.pos >= len(self.data)

    def end(self) -> None:
        """Require the end of the command."""
        if not self.at_end():
            raise self.error("unexpected text after the command arguments")

    def sp(self) -> None:
        """Require one space."""
        if self.peek() != 0x20:
            raise self.error("expected a space")
        self.pos += 1

    def maybe_sp(self) -> bool:
        """Consume a space if there is one."""
        if self.peek() == 0x20:
            self.pos += 1
            return True
        return False

    def expect(self, text: bytes) -> None:
        """Require ``text`` (case-insensitive)."""
        got = self.data[self.pos : self.pos + len(text)]
        if got.upper() != text.upper():
            raise self.error(f"expected {text.decode()}")
        self.pos += len(text)

    def accept(self, text: bytes) -> bool:
        """Consume ``text`` (case-insensitive) if it is next."""
        if self.data[self.pos : self.pos + len(text)].upper() == text.upper():
            self.pos += len(text)
            return True
        return False

    def _count(self) -> None:
        self.args += 1
        if self.args > self.limits.max_args:
            raise self.error("too many arguments")

    def run(self, chars: frozenset[int], what: str) -> bytes:
        """A non-empty run of bytes from ``chars``."""
        m = _run_regex(chars).match(self.data, self.pos)
        if m is None:
            raise self.error(f"expected {what}")
        self.pos = m.end()
        self._count()
        return m.group(0)

    def atom(self) -> str:
        """An atom, as text."""
        return self.run(ATOM_CHARS, "an atom").decode("ascii")

    def tag_token(self) -> str:
        """The command tag."""
        tag = self.run(TAG_CHARS, "a tag").decode("ascii")
        if self.peek() not in (0x20, None):
            # 'a"b NOOP': answering "a BAD" could hit another command tagged "a".
            raise ParseError("bad tag")
        self.tag = tag
        return tag

    def number(self, limit: int = MAX_NUMBER) -> int:
        """A decimal number no larger than ``limit``."""
        start = self.pos
        while self.pos < len(self.data) and 0x30 <= self.data[self.pos] <= 0x39:
            self.pos += 1
        digits = self.data[start : self.pos]
        if not digits or len(digits) > 20:
            raise self.error("expected a number")
        value = int(digits)
        if value > limit:
            raise self.error("number out of range")
        return value

    def nz_number(self, limit: int = MAX_NUMBER) -> int:
        """A non-zero number."""
        value = self.number(limit)
        if value == 0:
            raise self.error("expected a non-zero number")
        return value

    def quoted(self) -> bytes:
        """A quoted string with ``\\"`` and ``\\\\`` unescaped."""
        if self.peek() != 0x22:
            raise self.error("expected a quoted string")
        self.pos += 1
        out = bytearray()
        data = self.data
        n = len(data)
        while True:
            if self.pos >= n:
                raise self.error("unterminated quoted string")
            b = data[self.pos]
            if b == 0x22:
                self.pos += 1
                break
            if b == 0x5C:
                if self.pos + 1 >= n or data[self.pos + 1] not in b'"\\':
                    raise self.error("bad escape in quoted string")
                out.append(data[self.pos + 1])
                self.pos += 2
                continue
            if b in b"\r\n\x00":
                raise self.error("CR, LF or NUL in a quoted string")
            out.append(b)
            self.pos += 1
        self._count()
        return bytes(out)

    def literal(self, allow8: bool = False) -> bytes:
        """A literal ``{n}`` or ``{n+}`` (the framing already checked its size); with
        ``allow8`` also a literal8 ``~{n}`` (BINARY: only APPEND takes one)."""
        if self.peek() == 0x7E:
            if not allow8:
                raise self.error("a binary literal is only allowed in APPEND")
            self.pos += 1
        self.expect(b"{")
        size = self.number(MAX_MODSEQ)
        self.accept(b"+")
        self.expect(b"}")
        self.accept(b"\r")
        self.expect(b"\n")
        if self.pos + size > len(self.data):
            raise self.error("literal shorter than announced")
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        self._count()
        return out

    def string(self) -> bytes:
        """A quoted string or a literal."""
        b = self.peek()
        if b == 0x22:
            return self.quoted()
        if b == 0x7B or self._literal8():
            return self.literal()
        raise self.error("expected a string")

    def _literal8(self) -> bool:
        return self.data[self.pos : self.pos + 2] == b"~{"

    def astring(self) -> bytes:
        """An atom (ASTRING-CHARs) or a string."""
        b = self.peek()
        if b in (0x22, 0x7B) or self._literal8():
            return self.string()
        return self.run(ASTRING_CHARS, "an astring")

    def nstring(self) -> bytes | None:
        """A string or NIL."""
        if self.peek() in (0x4E, 0x6E) and self.accept(b"NIL"):
            return None
        return self.string()

    def text(self, raw: bytes, what: str) -> str:
        """``raw`` decoded as UTF-8 (RFC 9051 allows UTF-8 in strings)."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not valid UTF-8") from None

    def astring_text(self, what: str = "argument") -> str:
        """An astring decoded as UTF-8."""
        return self.text(self.astring(), what)

    def mailbox(self) -> str:
        """A mailbox name (``INBOX`` in any case is INBOX)."""
        name = self.astring_text("mailbox name")
        return "INBOX" if name.upper() == "INBOX" else name

    def list_mailbox(self) -> str:
        """A LIST pattern: list-chars or a string."""
        if self.peek() in (0x22, 0x7B):
            return self.text(self.string(), "pattern")
        return self.text(self.run(LIST_CHARS, "a mailbox pattern"), "pattern")

    def sequence_set(self) -> str:
        """A sequence set (``1:3,5:*``) or ``$`` (SEARCHRES)."""
        if self.peek() == 0x24:
            self.pos += 1
            return "$"
        m = _SEQ_SET.match(self.data, self.pos)
        if m is None:
            raise self.error("expected a sequence set")
        self.pos = m.end()
        nxt = self.peek()
        if nxt is not None and nxt not in b" )":
            raise self.error("bad sequence set")
        self._count()
        text = m.group(0).decode("ascii")
        for p in re.split("[:,]", text):
            if p != "*" and not 0 < int(p) <= MAX_NUMBER:
                raise self.error("sequence number out of range")
        return text

    def flag(self) -> str:
        """A flag: ``\\Atom`` or a keyword atom."""
        if self.peek() == 0x5C:
            self.pos += 1
            return "\\" + self.atom()
        return self.atom()

    def open_paren(self) -> None:
        """Require ``(`` and count the nesting depth."""
        self.expect(b"(")
        self.depth += 1
        if self.depth > self.limits.max_depth:
            raise self.error("parentheses nested too deeply")

    def close_paren(self) -> bool:
        """Consume ``)`` if next (ending a list)."""
        if self.peek() == 0x29:
            self.pos += 1
            self.depth -= 1
            return True
        return False

    def paren_list(self, item: Callable[[], T]) -> list[T]:
        """``( item *(SP item) )`` (possibly empty) with ``item`` a reader method."""
        self.open_paren()
        out: list[T] = []
        if self.close_paren():
            return out
        while True:
            out.append(item())
            if self.close_paren():
                return out
            self.sp()
