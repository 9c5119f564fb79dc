"""Events the sans-IO IMAP server connection hands to its caller."""

from __future__ import annotations

import attrs

from ._commands import Command


@attrs.frozen
class CommandReceived:
    """A whole command (with its literals) parsed."""

    command: Command


@attrs.frozen
class CommandRejected:
    """A command that does not parse or breaks a limit: answer ``tag status [code] text``.

    ``tag`` is None when no valid tag could be read (answer ``* BAD``).
    ``status`` is ``"BAD"``, or ``"NO"`` for an APPEND over the size limit.
    """

    tag: str | None
    text: str
    code: str | None = None
    status: str = "BAD"


@attrs.frozen
class IdleDone:
    """The client ended IDLE; ``valid`` is False when it sent something else than DONE."""

    valid: bool = True


@attrs.frozen
class AuthenticateResponse:
    """A client line during AUTHENTICATE: ``data`` decoded, None when the client cancelled
    (``*``); ``error`` says why the line is not a valid response."""

    data: bytes | None
    error: str | None = None


@attrs.frozen
class ProtocolFailure:
    """The stream cannot go on (line without end, oversized LITERAL+, buffer full):
    say ``* BYE text`` and close."""

    text: str
    tag: str | None = None
    code: str | None = None


Event = CommandReceived | CommandRejected | IdleDone | AuthenticateResponse | ProtocolFailure
