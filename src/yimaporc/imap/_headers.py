"""Structured header values on raw octets: RFC 5322 addresses and RFC 2045 parameters.

Tokens are kept as bytes so 8-bit (UTF-8) names and values pass through untouched, and
RFC 2047 encoded words stay encoded, as ENVELOPE and BODYSTRUCTURE show them (Dovecot
does the same). Nothing here raises on malformed input: whatever does not parse is
carried along as written, or marked ``MISSING_MAILBOX`` / ``MISSING_DOMAIN`` as Dovecot
marks it. See :mod:`yimaporc.imap._message` for the data form (None, bytes, tuple).
"""

from __future__ import annotations

import re

import attrs

#: NIL, a string, a number or a parenthesised list (see ``_message``).
Nested = None | bytes | int | tuple["Nested", ...]

_LINE_BREAK = re.compile(rb"\r?\n")


# --- RFC 5322 / RFC 2045 tokens -------------------------------------------------

ADDRESS_SPECIALS = frozenset(b'()<>@,;:\\".[]')
MIME_SPECIALS = frozenset(b'()<>@,;:\\"/[]?=')


@attrs.frozen
class _Token:
    kind: str  # "atom", "quoted", "comment", "literal" (domain literal) or "special"
    text: bytes
    space_before: bool


def tokens(value: bytes, specials: frozenset[int]) -> list[_Token]:
    """Tokenize a structured header value; never fails (unterminated runs to the end)."""
    out: list[_Token] = []
    i, n, space = 0, len(value), False
    while i < n:
        c = value[i]
        if c in b" \t\r\n":
            i, space = i + 1, True
            continue
        if c == ord('"'):
            buf, i = bytearray(), i + 1
            while i < n and value[i] != ord('"'):
                if value[i] == ord("\\") and i + 1 < n:
                    i += 1
                buf.append(value[i])
                i += 1
            out.append(_Token("quoted", _LINE_BREAK.sub(b"", bytes(buf)), space))
            i += 1
        elif c == ord("("):
            buf, depth, i = bytearray(), 1, i + 1
            while i < n and depth:
                if value[i] == ord("\\") and i + 1 < n:
                    i += 1
                elif value[i] == ord("("):
                    depth += 1
                elif value[i] == ord(")"):
                    depth -= 1
                    if not depth:
                        break
                buf.append(value[i])
                i += 1
            out.append(_Token("comment", bytes(buf), space))
            i += 1
        elif c == ord("[") and ord("[") in specials and ord("@") in specials:
            j = value.find(b"]", i)
            j = n - 1 if j < 0 else j
            out.append(_Token("literal", value[i : j + 1], space))
            i = j + 1
        elif c in specials:
            out.append(_Token("special", bytes([c]), space))
            i += 1
        else:
            j = i
            while j < n and value[j] not in specials and value[j] not in b" \t\r\n":
                j += 1
            out.append(_Token("atom", value[i:j], space))
            i = j
        space = False
    return out


def _phrase(tokens: list[_Token]) -> bytes | None:
    """Words joined as written, one space where there was white space; None if empty."""
    out = bytearray()
    for t in tokens:
        if out and t.space_before:
            out += b" "
        out += t.text
    return bytes(out) or None


# --- addresses ------------------------------------------------------------------

MISSING_MAILBOX = b"MISSING_MAILBOX"
MISSING_DOMAIN = b"MISSING_DOMAIN"
SYNTAX_ERROR = b"SYNTAX_ERROR"
_GROUP_END: tuple[Nested, ...] = (None, None, None, None)


def special(t: _Token, char: bytes) -> bool:
    return t.kind == "special" and t.text == char


def _mailbox(toks: list[_Token], collapse: bool = True) -> tuple[Nested, ...]:
    """One ``mailbox`` -> (name adl mailbox host)."""
    comments = [t for t in toks if t.kind == "comment"]
    toks = [t for t in toks if t.kind != "comment"]
    name: bytes | None = None
    adl: bytes | None = None
    lt = next((i for i, t in enumerate(toks) if special(t, b"<")), None)
    if lt is not None:
        name = _phrase(toks[:lt])
        spec = toks[lt + 1 :]
        gt = next((i for i, t in enumerate(spec) if special(t, b">")), len(spec))
        spec = spec[:gt]
        if spec and special(spec[0], b"@"):
            colon = next((i for i, t in enumerate(spec) if special(t, b":")), None)
            if colon is None:
                return (name, b"INVALID_ROUTE", MISSING_MAILBOX, MISSING_DOMAIN)
            adl = b"".join(t.text for t in spec[:colon])
            spec = spec[colon + 1 :]
    else:
        spec = toks
        # The last comment names it, as in Dovecot: "()" is no name, "( )" an empty one.
        last = comments[-1].text if comments else b""
        if not last:
            name = None
        elif collapse:
            name = re.sub(rb"[ \t\r\n]+", b" ", last).strip(b" ")
        else:
            name = last
    at = next((i for i, t in enumerate(spec) if special(t, b"@")), None)
    local = b"".join(t.text for t in (spec if at is None else spec[:at]))
    host = b"" if at is None else b"".join(t.text for t in spec[at + 1 :])
    if lt is not None and at is not None and not host:
        host = SYNTAX_ERROR  # ``<local@>``; a bare ``local@`` is only MISSING_DOMAIN
    return (name, adl, local or MISSING_MAILBOX, host or MISSING_DOMAIN)


def parse_addresses(value: bytes, collapse: bool = True) -> tuple[Nested, ...] | None:
    """An address-list header value -> ENVELOPE address list (group syntax kept); None if empty.

    ``collapse=False`` keeps a comment used as a name as written (SEARCH sees it so).
    """
    toks = tokens(value, ADDRESS_SPECIALS)
    out: list[Nested] = []
    in_group = False
    i, n = 0, len(toks)
    while i < n:
        j, depth, group_at = i, 0, None
        while j < n:
            t = toks[j]
            if t.kind == "special":
                if t.text == b"<":
                    depth += 1
                elif t.text == b">":
                    depth = max(0, depth - 1)
                elif not depth and t.text in (b",", b";"):
                    break
                elif not depth and t.text == b":" and not in_group and group_at is None:
                    group_at = j
                    break
            j += 1
        element = toks[i:j]
        if group_at is not None:
            out.append((None, None, _phrase([t for t in element if t.kind != "comment"]), None))
            in_group = True
        elif any(t.kind != "comment" for t in element):
            out.append(_mailbox(element, collapse))
            if out[-1][3] == SYNTAX_ERROR:  # type: ignore[index]
                break  # Dovecot stops at ``local@`` and keeps what it has
        elif j < n and special(toks[j], b",") and not (i and special(toks[i - 1], b";")):
            out.append((None, None, MISSING_MAILBOX, MISSING_DOMAIN))
        if j < n and special(toks[j], b";") and in_group:
            out.append(_GROUP_END)
            in_group = False
        i = j + 1
    if in_group:
        out.append(_GROUP_END)
    return tuple(out) or None


# --- MIME parameters -----------------------------------------------------------

_CONTINUATION = re.compile(rb"^(.*?)\*(\d+)(\*?)$")


def params(toks: list[_Token]) -> list[tuple[bytes, bytes]]:
    """``; a=b; c="d"`` -> [(name, value)], values unquoted, RFC 2231 segments joined.

    Joined extended segments keep their encoding under ``name*`` (as Dovecot shows them).
    """
    raw: list[tuple[bytes, bytes]] = []
    current: list[_Token] = []
    for t in [*toks, _Token("special", b";", False)]:
        if special(t, b";"):
            eq = next((i for i, x in enumerate(current) if special(x, b"=")), None)
            if eq:
                name = b"".join(x.text for x in current[:eq])
                value = b"".join(x.text for x in current[eq + 1 :])
                raw.append((name, value))
            current = []
        elif t.kind != "comment":
            current.append(t)
    out: list[tuple[bytes, bytes]] = []
    joined: dict[bytes, tuple[int, bool, list[tuple[int, bytes]]]] = {}
    for name, value in raw:
        m = _CONTINUATION.match(name)
        if m is None:
            out.append((name, value))
            continue
        base = m.group(1)
        key = base.lower()
        if key not in joined:
            joined[key] = (len(out), False, [])
            out.append((base, b""))
        at, extended, segments = joined[key]
        segments.append((int(m.group(2)), value))
        joined[key] = (at, extended or bool(m.group(3)), segments)
    for at, extended, segments in joined.values():
        base = out[at][0]
        value = b"".join(v for _, v in sorted(segments, key=lambda s: s[0]))
        out[at] = (base + b"*" if extended else base, value)
    return out


def flat_params(params: list[tuple[bytes, bytes]]) -> Nested:
    return tuple(x for pair in params for x in pair) or None


def content_type(value: bytes | None) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """(type, subtype, params) of a Content-Type value, case as written."""
    if value is None:
        return b"text", b"plain", []
    toks = tokens(value, MIME_SPECIALS)
    semi = next((i for i, t in enumerate(toks) if special(t, b";")), len(toks))
    head = [t for t in toks[:semi] if t.kind != "comment"]
    slash = next((i for i, t in enumerate(head) if special(t, b"/")), None)
    if slash is None:
        kind, sub = b"".join(t.text for t in head), b""
    else:
        kind = b"".join(t.text for t in head[:slash])
        sub = b"".join(t.text for t in head[slash + 1 :])
    if not kind:
        return b"text", b"plain", []
    return kind, sub, params(toks[semi + 1 :])
