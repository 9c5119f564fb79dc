"""RTSP 1.0 (RFC 2326) messages on the wire: pure parse/serialize, and the reader.

Messages are read from an O(n) :class:`ReceiveBuffer` by :class:`MessageReader`
under hard :class:`Limits` (line, header count, header bytes, body).  Binary
data interleaved on the same TCP connection (RFC 2326 §10.12: ``$``, channel
u8, length u16, data) is read by the same reader.  Header values: :mod:`._wire`.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Iterator

import attrs

from ._errors import LocalProtocolError, MalformedHeader, RemoteProtocolError
from ._status import reason_phrase

RTSP_VERSION = "RTSP/1.0"
DEFAULT_PORT = 554

# --- messages ---------------------------------------------------------------------------

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _check_field(name: str, value: str) -> None:
    if not _TOKEN.match(name):
        raise LocalProtocolError(f"bad header name {name!r}")
    if "\r" in value or "\n" in value or "\0" in value:
        raise LocalProtocolError(f"line break in header {name}")


@attrs.frozen
class Headers:
    """Ordered header fields, looked up case-insensitively."""

    fields: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, *pairs: tuple[str, str], **named: str) -> Headers:
        """Headers from pairs, then keyword arguments (``_`` becomes ``-``)."""
        return cls((*pairs, *((k.replace("_", "-"), v) for k, v in named.items())))

    def get(self, name: str) -> str | None:
        """The first value of ``name``, or None."""
        low = name.lower()
        for k, v in self.fields:
            if k.lower() == low:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, in order."""
        low = name.lower()
        return [v for k, v in self.fields if k.lower() == low]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def with_field(self, name: str, value: str) -> Headers:
        """These headers with ``name`` set to ``value`` (replacing every earlier value)."""
        low = name.lower()
        return Headers((*(f for f in self.fields if f[0].lower() != low), (name, value)))

    def without(self, name: str) -> Headers:
        """These headers without ``name``."""
        low = name.lower()
        return Headers(tuple(f for f in self.fields if f[0].lower() != low))


def _headers(value: Headers | Iterable[tuple[str, str]]) -> Headers:
    return value if isinstance(value, Headers) else Headers(tuple(value))


@attrs.frozen
class Request:
    """An RTSP request."""

    method: str
    url: str
    headers: Headers = attrs.field(default=Headers(), converter=_headers)
    body: bytes = b""
    version: str = RTSP_VERSION

    @property
    def cseq(self) -> int | None:
        """The CSeq, or None if missing or malformed."""
        return _cseq_or_none(self.headers.get("CSeq"))

    @property
    def session_id(self) -> str | None:
        """The session identifier of the Session header, if any."""
        value = self.headers.get("Session")
        return value.split(";", 1)[0].strip() if value is not None else None


@attrs.frozen
class Response:
    """An RTSP response."""

    status: int
    reason: str = ""
    headers: Headers = attrs.field(default=Headers(), converter=_headers)
    body: bytes = b""
    version: str = RTSP_VERSION

    @property
    def cseq(self) -> int | None:
        """The CSeq, or None if missing or malformed."""
        return _cseq_or_none(self.headers.get("CSeq"))

    @property
    def ok(self) -> bool:
        """True for 2xx."""
        return 200 <= self.status < 300


@attrs.frozen
class InterleavedFrame:
    """Binary data on channel ``channel`` of the RTSP TCP connection (RFC 2326 §10.12)."""

    channel: int
    data: bytes


def _cseq_or_none(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_cseq(value)
    except MalformedHeader:
        return None


def parse_cseq(value: str) -> int:
    """A CSeq header value: a non-negative decimal integer."""
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        raise MalformedHeader(f"bad CSeq {value!r}")
    return int(text)


def _head(first: str, headers: Headers, body: bytes) -> bytes:
    lines = [first]
    has_length = False
    for name, value in headers:
        _check_field(name, value)
        if name.lower() == "content-length":
            has_length = True
            if value.strip() != str(len(body)):
                raise LocalProtocolError("Content-Length does not match the body")
        lines.append(f"{name}: {value}")
    if body and not has_length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


def serialize_request(request: Request) -> bytes:
    """The bytes of ``request`` (Content-Length added for a body)."""
    if not _TOKEN.match(request.method):
        raise LocalProtocolError(f"bad method {request.method!r}")
    if not request.url or any(ch in request.url for ch in " \r\n\t\0"):
        raise LocalProtocolError(f"bad request URL {request.url!r}")
    return _head(f"{request.method} {request.url} {request.version}", request.headers, request.body)


def serialize_response(response: Response) -> bytes:
    """The bytes of ``response`` (Content-Length added for a body)."""
    if not 100 <= response.status <= 999:
        raise LocalProtocolError(f"bad status {response.status}")
    reason = response.reason or reason_phrase(response.status)
    if "\r" in reason or "\n" in reason:
        raise LocalProtocolError("line break in the reason phrase")
    return _head(f"{response.version} {response.status} {reason}", response.headers, response.body)


_FRAME = struct.Struct("!cBH")


def serialize_interleaved(channel: int, data: bytes) -> bytes:
    """One interleaved frame: ``$``, channel, 16-bit length, data."""
    if not 0 <= channel <= 255:
        raise LocalProtocolError(f"interleaved channel out of range: {channel}")
    if len(data) > 0xFFFF:
        raise LocalProtocolError("interleaved frame longer than 65535 bytes")
    return _FRAME.pack(b"$", channel, len(data)) + data


# --- limits and the receive buffer -----------------------------------------------------


@attrs.frozen
class Limits:
    """Hard limits on what a peer may send (docs/wire.md, "RTSP limits")."""

    max_line: int = 4096  # request or status line (414 when a request line exceeds it)
    max_header_bytes: int = 16 * 1024  # whole message head (400)
    max_headers: int = 64  # header fields per message (400)
    max_body: int = 64 * 1024  # Content-Length cap (413)
    max_buffer: int = 1024 * 1024  # unprocessed bytes before reading pauses
    # Server: interleaved bytes written while the client does not read (its TCP window and
    # our transport buffer full) before further frames are dropped.
    max_unread_output: int = 4 * 1024 * 1024


DEFAULT_LIMITS = Limits()


class ReceiveBuffer:
    """Bytes received and not yet consumed: amortised O(n), no quadratic copying.

    Consumed bytes are skipped with an offset and compacted away only when they
    are the larger part, so extracting many small frames from one big read
    costs O(n) in total.  The search for the end of a head resumes where the
    previous search stopped.
    """

    _HEAD_END = re.compile(rb"\r?\n\r?\n")

    def __init__(self) -> None:
        self._data = bytearray()
        self._start = 0
        self._scanned = 0  # bytes from _start already known not to end a head

    def __len__(self) -> int:
        return len(self._data) - self._start

    def __bool__(self) -> bool:
        return len(self._data) > self._start

    def append(self, data: bytes) -> None:
        """Add received bytes."""
        self._data += data

    def byte_at(self, i: int) -> int:
        """The ``i``-th unconsumed byte."""
        return self._data[self._start + i]

    def peek(self, n: int) -> bytes:
        """The first ``n`` unconsumed bytes (fewer if not there)."""
        return bytes(self._data[self._start : self._start + n])

    def extract(self, n: int) -> bytes:
        """Consume and return ``n`` bytes."""
        out = bytes(self._data[self._start : self._start + n])
        self._start += len(out)
        self._scanned = 0
        if self._start > 65536 and self._start * 2 > len(self._data):
            del self._data[: self._start]
            self._start = 0
        return out

    def find_head_end(self) -> int | None:
        """Length of the head (through its blank line) at the front, or None."""
        begin = self._start + max(0, self._scanned - 3)
        match = self._HEAD_END.search(self._data, begin)
        if match is None:
            self._scanned = len(self)
            return None
        return match.end() - self._start

    def find_line_end(self, limit: int) -> int | None:
        """Index of the first LF within the first ``limit`` bytes, or None."""
        i = self._data.find(b"\n", self._start, self._start + limit)
        return None if i < 0 else i - self._start


# --- reading messages ------------------------------------------------------------------

_REQUEST_LINE = re.compile(r"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+) (\S+) ([A-Za-z]+/\d+\.\d+)$")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # CTLs but HTAB (RFC 2326 15.1)
_STATUS_LINE = re.compile(r"^([A-Za-z]+/\d+\.\d+) (\d{3})(?: (.*))?$")


class MessageReader:
    """Reads requests (``role="server"``) or responses (``role="client"``) and interleaved frames."""

    def __init__(self, role: str, limits: Limits) -> None:
        if role not in ("server", "client"):
            raise ValueError(role)
        self.role = role
        self.limits = limits
        self._pending: Request | Response | None = None
        self._pending_length = 0

    def read(self, buf: ReceiveBuffer) -> Request | Response | InterleavedFrame | None:
        """The next whole message in ``buf``, or None; raises :class:`RemoteProtocolError`."""
        if self._pending is not None:
            if len(buf) < self._pending_length:
                return None
            message = attrs.evolve(self._pending, body=buf.extract(self._pending_length))
            self._pending = None
            return message
        # Blank lines between messages are tolerated (as HTTP/1.1 parsers do).
        while buf and buf.byte_at(0) in (0x0D, 0x0A):
            buf.extract(1)
        if not buf:
            return None
        if buf.byte_at(0) == 0x24:  # '$'
            if len(buf) < 4:
                return None
            _, channel, length = _FRAME.unpack(buf.peek(4))
            if len(buf) < 4 + length:
                return None
            data = buf.extract(4 + length)[4:]
            return InterleavedFrame(channel, data)
        size = buf.find_head_end()
        if size is None:
            if (
                buf.find_line_end(self.limits.max_line + 2) is None
                and len(buf) > self.limits.max_line
            ):
                self._line_too_long()
            if len(buf) > self.limits.max_header_bytes:
                raise RemoteProtocolError(400, "message head too large")
            return None
        if size > self.limits.max_header_bytes + 4:
            raise RemoteProtocolError(400, "message head too large")
        head = buf.extract(size)
        message, length = self._parse_head(head)
        if length:
            self._pending, self._pending_length = message, length
            return self.read(buf)
        return message

    def _line_too_long(self) -> None:
        if self.role == "server":
            raise RemoteProtocolError(414, "request line too long")
        raise RemoteProtocolError(400, "status line too long")

    def _parse_head(self, head: bytes) -> tuple[Request | Response, int]:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError(400, "message head is not UTF-8") from None
        lines = text.rstrip("\r\n").split("\n")
        first = lines[0].rstrip("\r")
        if len(first) > self.limits.max_line:
            self._line_too_long()
        fields: list[tuple[str, str]] = []
        for raw in lines[1:]:
            line = raw.rstrip("\r")
            if line[:1] in (" ", "\t") and fields:  # obsolete line folding
                name, value = fields[-1]
                fields[-1] = (name, f"{value} {line.strip()}")
                continue
            name, sep, value = line.partition(":")
            if not sep or not _TOKEN.match(name):
                raise RemoteProtocolError(400, f"bad header line {line[:60]!r}")
            fields.append((name, value.strip()))
            if len(fields) > self.limits.max_headers:
                raise RemoteProtocolError(400, "too many header fields")
        # Neither could be echoed back (Require -> Unsupported, the URL -> Content-Base).
        if _CONTROL.search(first):
            raise RemoteProtocolError(400, "control character in the first line")
        for name, value in fields:
            if _CONTROL.search(value):
                raise RemoteProtocolError(400, f"control character in header {name}")
        headers = Headers(tuple(fields))
        cseq = _cseq_or_none(headers.get("CSeq"))
        lengths = {v.strip() for v in headers.get_all("Content-Length")}
        if len(lengths) > 1:
            raise RemoteProtocolError(400, "conflicting Content-Length", cseq)
        length = 0
        if lengths:
            (value,) = lengths
            if not (value.isascii() and value.isdigit()):
                raise RemoteProtocolError(400, "bad Content-Length", cseq)
            length = int(value)
            if length > self.limits.max_body:
                raise RemoteProtocolError(413, f"body of {length} bytes", cseq)
        if self.role == "server":
            m = _REQUEST_LINE.match(first)
            if m is None:
                raise RemoteProtocolError(400, f"bad request line {first[:60]!r}", cseq)
            if m.group(3) != RTSP_VERSION:
                raise RemoteProtocolError(505, f"version {m.group(3)}", cseq)
            return Request(m.group(1), m.group(2), headers, b"", m.group(3)), length
        m = _STATUS_LINE.match(first)
        if m is None:
            raise RemoteProtocolError(400, f"bad status line {first[:60]!r}", cseq)
        if m.group(1) != RTSP_VERSION:
            raise RemoteProtocolError(505, f"version {m.group(1)}", cseq)
        return Response(int(m.group(2)), m.group(3) or "", headers, b"", m.group(1)), length
