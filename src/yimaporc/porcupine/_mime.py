"""Raw-bytes MIME parts for IMAP FETCH: headers, bodies and subparts sliced from the stored octets.

twisted.mail's IMAP4 server re-serialises headers from a dict (duplicates
lost, names re-cased, no terminating blank line); :meth:`MimePart.header_block`
gives the exact header octets instead.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import re
from collections.abc import Sequence
from email.message import Message
from typing import Any

from twisted.mail import imap4
from zope.interface import implementer

_HEADER_END = re.compile(rb"\r?\n\r?\n")


def _text(value: str | bytes) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


@implementer(imap4.IMessagePart)
class MimePart:
    """One MIME entity, kept as its exact octets."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        m = _HEADER_END.search(raw)
        if m is None:
            self.head, self.body = raw, b""
            if raw and not raw.endswith(b"\n"):
                self.head += b"\r\n"
            self.head += b"\r\n"
        else:
            self.head, self.body = raw[: m.end()], raw[m.end() :]
        self._parsed: Message | None = None

    def _message(self) -> Message:
        if self._parsed is None:
            parser = email.parser.BytesParser(policy=email.policy.compat32)
            self._parsed = parser.parsebytes(self.head, headersonly=True)
        return self._parsed

    def _lines(self) -> list[tuple[str, bytes]]:
        """(lower-case name, raw field octets incl. continuation lines and CRLF)."""
        out: list[tuple[str, bytes]] = []
        for line in self.head.splitlines(keepends=True):
            if not line.strip():
                break
            if line[:1] in (b" ", b"\t") and out:
                name, raw = out[-1]
                out[-1] = (name, raw + line)
            else:
                name = line.split(b":", 1)[0].strip().decode("ascii", "replace").lower()
                out.append((name, line))
        return out

    def header_block(self, fields: Sequence[str | bytes] | None, negate: bool) -> bytes:
        """The header octets (all, only ``fields``, or all but ``fields``) plus the blank line."""
        if not fields:
            return self.head  # BODY[HEADER]: twisted says negate=True, meaning "all"
        wanted = {_text(f).lower() for f in fields}
        kept = [raw for name, raw in self._lines() if (name in wanted) != negate]
        return b"".join(kept) + b"\r\n"

    def getHeaders(self, negate: bool, *names: Any) -> dict[str, str]:
        """Headers as twisted.mail wants them (lower-case names, str values)."""
        wanted = {_text(n).lower() for n in names}
        out: dict[str, str] = {}
        for k, v in self._message().items():
            if not names or ((k.lower() in wanted) != negate):
                out.setdefault(k.lower(), str(v))
        if "content-type" in wanted and not negate and "content-type" not in out:
            out["content-type"] = "text/plain; charset=us-ascii"  # RFC 2045 default
        return out

    def getBodyFile(self) -> io.BytesIO:
        """The body octets."""
        return io.BytesIO(self.body)

    def getSize(self) -> int:
        """RFC822.SIZE: every octet."""
        return len(self.raw)

    def isMultipart(self) -> bool:
        """True for multipart/* with a boundary."""
        m = self._message()
        return m.get_content_maintype() == "multipart" and m.get_boundary() is not None

    def getSubPart(self, part: int) -> MimePart:
        """Part ``part`` (0-based), sliced from the body at the boundary lines."""
        parts = self._subparts()
        if not 0 <= part < len(parts):
            raise IndexError(part)
        return MimePart(parts[part])

    def _subparts(self) -> list[bytes]:
        boundary = self._message().get_boundary()
        if boundary is None:
            return []
        delim = re.compile(
            rb"(?:^|\r?\n)--" + re.escape(boundary.encode()) + rb"(--)?[ \t]*(?:\r?\n|$)"
        )
        out: list[bytes] = []
        start: int | None = None
        for m in delim.finditer(self.body):
            if start is not None:
                out.append(self.body[start : m.start()])
            if m.group(1):
                break
            start = m.end()
        return out
