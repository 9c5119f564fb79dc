"""Command values -> wire bytes (the client side of :mod:`._wire`).

Used by tests (round trips) and by clients built on this package.  Strings go
as atoms when the grammar allows, quoted when they are safe 7-bit text, else
as LITERAL+ literals (``{n+}``), so no continuation is needed.
"""

from __future__ import annotations

from typing import Any

from . import _commands as c
from ._lexer import ASTRING_CHARS, LIST_CHARS


def quote_or_literal(data: bytes) -> bytes:
    """A string: quoted if safe 7-bit text, else a non-synchronising literal."""
    if len(data) <= 1024 and all(32 <= b < 127 for b in data):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d+}\r\n" % len(data) + data


def astring(value: str | bytes) -> bytes:
    """An astring: an atom when every byte allows it, else a string."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    if data and data.upper() != b"NIL" and all(b in ASTRING_CHARS for b in data):
        return data
    return quote_or_literal(data)


def list_mailbox(value: str) -> bytes:
    """A LIST pattern."""
    data = value.encode("utf-8")
    if data and all(b in LIST_CHARS for b in data):
        return data
    return quote_or_literal(data)


def _paren(parts: list[bytes]) -> bytes:
    return b"(" + b" ".join(parts) + b")"


def _flags(flags: tuple[str, ...]) -> bytes:
    return _paren([f.encode("ascii") for f in flags])


def search_tokens(tokens: Any) -> bytes:
    """SEARCH criteria tokens (str atoms, bytes strings, lists)."""
    out = []
    for t in tokens:
        if isinstance(t, str):
            out.append(t.encode("ascii"))
        elif isinstance(t, bytes):
            out.append(quote_or_literal(t))
        else:
            out.append(b"(" + search_tokens(t) + b")")
    return b" ".join(out)


def fetch_item(item: c.FetchItem) -> bytes:
    """One FETCH item as a client writes it."""
    if isinstance(item, c.FetchAtt):
        return item.name.encode("ascii")
    return item.request.encode("ascii")


def format_command(cmd: c.Command) -> bytes:
    """The bytes of ``cmd``, CRLF included."""
    return cmd.tag.encode("ascii") + b" " + _body(cmd) + b"\r\n"


def _body(cmd: c.Command) -> bytes:
    if isinstance(cmd, c.Capability | c.Noop | c.Logout | c.Namespace | c.Idle | c.Check):
        return type(cmd).__name__.upper().encode()
    if isinstance(cmd, c.StartTls):
        return b"STARTTLS"
    if isinstance(cmd, c.Close | c.Unselect):
        return type(cmd).__name__.upper().encode()
    if isinstance(cmd, c.Authenticate):
        out = b"AUTHENTICATE " + cmd.mechanism.encode("ascii")
        if cmd.initial_response is not None:
            import base64

            out += b" " + (base64.b64encode(cmd.initial_response) or b"=")
        return out
    if isinstance(cmd, c.Login):
        return b"LOGIN " + astring(cmd.user) + b" " + astring(cmd.password)
    if isinstance(cmd, c.Enable):
        return b"ENABLE " + " ".join(cmd.capabilities).encode("ascii")
    if isinstance(cmd, c.Id):
        if cmd.params is None:
            return b"ID NIL"
        parts = []
        for k, v in cmd.params:
            parts.append(quote_or_literal(k.encode()))
            parts.append(b"NIL" if v is None else quote_or_literal(v.encode()))
        return b"ID " + _paren(parts)
    if isinstance(cmd, c.Select):
        out = (b"EXAMINE " if cmd.readonly else b"SELECT ") + astring(cmd.mailbox)
        params = []
        if cmd.condstore:
            params.append(b"CONDSTORE")
        if cmd.qresync is not None:
            q = cmd.qresync
            qp = [b"%d" % q.uidvalidity, b"%d" % q.modseq]
            if q.known_uids is not None:
                qp.append(q.known_uids.encode())
            if q.seq_match is not None:
                qp.append(_paren([q.seq_match[0].encode(), q.seq_match[1].encode()]))
            params.append(b"QRESYNC " + _paren(qp))
        return out + (b" " + _paren(params) if params else b"")
    if isinstance(cmd, c.Create):
        out = b"CREATE " + astring(cmd.mailbox)
        if cmd.special_use:
            out += b" (USE " + _flags(cmd.special_use) + b")"
        return out
    if isinstance(cmd, c.Delete | c.Subscribe | c.Unsubscribe):
        return type(cmd).__name__.upper().encode() + b" " + astring(cmd.mailbox)
    if isinstance(cmd, c.Rename):
        return b"RENAME " + astring(cmd.old) + b" " + astring(cmd.new)
    if isinstance(cmd, c.List):
        out = b"LIST "
        if cmd.selection:
            out += _paren([s.encode() for s in cmd.selection]) + b" "
        out += astring(cmd.reference) + b" "
        if len(cmd.patterns) == 1:
            out += list_mailbox(cmd.patterns[0])
        else:
            out += _paren([list_mailbox(p) for p in cmd.patterns])
        if cmd.returns:
            opts = []
            for r in cmd.returns:
                opts.append(
                    b"STATUS " + _paren([s.encode() for s in cmd.status])
                    if r == "STATUS"
                    else r.encode()
                )
            out += b" RETURN " + _paren(opts)
        return out
    if isinstance(cmd, c.Lsub):
        return b"LSUB " + astring(cmd.reference) + b" " + list_mailbox(cmd.pattern)
    if isinstance(cmd, c.Status):
        return b"STATUS " + astring(cmd.mailbox) + b" " + _paren([i.encode() for i in cmd.items])
    if isinstance(cmd, c.Append):
        out = b"APPEND " + astring(cmd.mailbox)
        for m in cmd.messages():
            if m.flags:
                out += b" " + _flags(m.flags)
            if m.date is not None:
                out += b' "' + m.date.encode("ascii") + b'"'
            if m.utf8:
                out += b" UTF8 (~{%d+}\r\n" % len(m.message) + m.message + b")"
            else:
                out += b" %s{%d+}\r\n" % (b"~" if m.binary else b"", len(m.message)) + m.message
        return out
    if isinstance(cmd, c.Expunge):
        return b"EXPUNGE" if cmd.uid_set is None else b"UID EXPUNGE " + cmd.uid_set.encode()
    prefix = b"UID " if getattr(cmd, "uid", False) else b""
    if isinstance(cmd, c.Search):
        out = prefix + b"SEARCH"
        if cmd.returns is not None:
            out += b" RETURN " + _paren([r.encode() for r in cmd.returns])
        if cmd.charset is not None:
            out += b" CHARSET " + astring(cmd.charset)
        return out + b" " + search_tokens(cmd.criteria)
    if isinstance(cmd, c.Fetch):
        out = prefix + b"FETCH " + cmd.sequence_set.encode() + b" "
        out += _paren([fetch_item(i) for i in cmd.items])
        mods = []
        if cmd.changed_since is not None:
            mods.append(b"CHANGEDSINCE %d" % cmd.changed_since)
        if cmd.vanished:
            mods.append(b"VANISHED")
        return out + (b" " + _paren(mods) if mods else b"")
    if isinstance(cmd, c.Store):
        out = prefix + b"STORE " + cmd.sequence_set.encode() + b" "
        if cmd.unchanged_since is not None:
            out += b"(UNCHANGEDSINCE %d) " % cmd.unchanged_since
        out += cmd.mode.encode() + b"FLAGS" + (b".SILENT" if cmd.silent else b"")
        return out + b" " + _flags(cmd.flags)
    if isinstance(cmd, c.Copy | c.Move):
        verb = b"COPY " if isinstance(cmd, c.Copy) else b"MOVE "
        return prefix + verb + cmd.sequence_set.encode() + b" " + astring(cmd.mailbox)
    raise TypeError(f"not a command: {cmd!r}")
