"""The sans-IO IMAP server connection: bytes in, events out, responses to bytes.

``receive_data(bytes) -> list[Event]`` frames and parses commands (asking for
synchronising literals with ``+`` on the outgoing buffer), ``send(response)``
queues a response, ``data_to_send()`` drains the outgoing bytes.

After IDLE, AUTHENTICATE and STARTTLS the connection stops parsing commands
until its caller acts (:meth:`idle_started`, :meth:`sasl_challenge`,
:meth:`start_tls`, or :meth:`complete` ending the command): the lines that
follow are DONE, SASL responses, or bytes to discard.  Plaintext buffered
after STARTTLS is discarded when TLS starts (the CVE-2011-0411 class) and
counted in :attr:`plaintext_discarded`.

The session state (:class:`~._machine.State`) changes only in
:meth:`complete`, from the table in :mod:`._machine`.
"""

from __future__ import annotations

import enum

from . import _commands as c
from ._events import (
    AuthenticateResponse,
    CommandReceived,
    CommandRejected,
    Event,
    IdleDone,
    ProtocolFailure,
)
from ._lexer import DEFAULT_LIMITS, Complete, Limits, NeedMore, ParseError, Refused, frame
from ._machine import State, after, allowed
from ._serialize import Continuation, Response, ResponseCode, StatusResponse, serialize
from ._wire import decode_base64, parse_command


class Mode(enum.Enum):
    """What the next input line is."""

    COMMANDS = "commands"
    HELD = "held"  # after IDLE/AUTHENTICATE/STARTTLS/LOGOUT until the caller acts
    IDLING = "idling"  # the next line is DONE
    SASL = "sasl"  # the next line is a SASL response
    CLOSED = "closed"


class ImapConnection:
    """The server side of one IMAP connection."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.state = State.NOT_AUTHENTICATED
        self.mode = Mode.COMMANDS
        self._buf = bytearray()
        self._start = 0  # first unconsumed byte
        self._continued: int | None = None  # literal offset (from _start) already given "+"
        self._need = 0  # buffer length needed before framing again
        self._out: list[bytes] = []
        #: Plaintext bytes dropped because they followed STARTTLS.
        self.plaintext_discarded = 0
        #: Commands rejected for syntax or limits.
        self.rejected = 0

    # -- input ----------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Received bytes not yet turned into events."""
        return len(self._buf) - self._start

    def receive_data(self, data: bytes, max_events: int | None = None) -> list[Event]:
        """Feed received bytes; the events now complete (at most ``max_events``)."""
        if self.mode is Mode.CLOSED:
            return []
        self._buf += data
        if self.buffered > self.limits.max_buffer:
            self._close()
            return [ProtocolFailure("too much unread input")]
        return self.next_events(max_events)

    def next_events(self, max_events: int | None = None) -> list[Event]:
        """Events from already buffered bytes (after the caller resumed parsing)."""
        out: list[Event] = []
        while self.mode is not Mode.CLOSED and (max_events is None or len(out) < max_events):
            event = self._next()
            if event is None:
                break
            out.append(event)
        self._compact()
        return out

    def _compact(self) -> None:
        if self._start and (self._start > 65536 or self._start == len(self._buf)):
            del self._buf[: self._start]
            # _need is a buffer length: it moves with the bytes (a stale one stalled a
            # pipelined literal after a big one, until the client timed out).
            self._need = max(0, self._need - self._start)
            self._start = 0

    def _take_line(self) -> bytes | None:
        nl = self._buf.find(b"\n", self._start, self._start + self.limits.max_line + 2)
        if nl < 0:
            if self.buffered > self.limits.max_line:
                self._start = len(self._buf)
                raise ParseError("line too long")
            return None
        line = bytes(self._buf[self._start : nl]).rstrip(b"\r")
        self._start = nl + 1
        return line

    def _next(self) -> Event | None:
        mode = self.mode
        try:
            if mode is Mode.COMMANDS:
                return self._next_command()
            if mode is Mode.IDLING:
                line = self._take_line()
                if line is None:
                    return None
                self.mode = Mode.COMMANDS
                return IdleDone(line.upper() == b"DONE")
            if mode is Mode.SASL:
                line = self._take_line()
                if line is None:
                    return None
                self.mode = Mode.HELD
                if line == b"*":
                    return AuthenticateResponse(None)
                try:
                    return AuthenticateResponse(decode_base64(line))
                except ParseError as exc:
                    return AuthenticateResponse(None, exc.text)
        except ParseError as exc:
            self._close()
            return ProtocolFailure(exc.text)
        return None

    def _next_command(self) -> Event | None:
        if len(self._buf) < self._need or self._start >= len(self._buf):
            return None
        self._need = 0
        result = frame(self._buf, self.limits, self._start)
        if isinstance(result, NeedMore):
            self._need = result.need
            if result.continuation is not None:
                offset = result.continuation - self._start
                if self._continued != offset:
                    self._continued = offset
                    self._out.append(serialize(Continuation("Ready for literal data")))
            return None
        self._continued = None
        if isinstance(result, Refused):
            self._start = result.consumed
            self.rejected += 1
            err = result.error
            if result.fatal:
                self._close()
                return ProtocolFailure(err.text, err.tag, err.code)
            return CommandRejected(err.tag, err.text, err.code, err.status)
        assert isinstance(result, Complete)
        data = bytes(self._buf[self._start : result.end])
        self._start = result.consumed
        if not data.strip():
            self.rejected += 1
            return CommandRejected(None, "empty command line")
        try:
            command = parse_command(data, self.limits)
        except ParseError as exc:
            self.rejected += 1
            return CommandRejected(exc.tag, exc.text, exc.code, exc.status)
        except (ValueError, OverflowError, RecursionError) as exc:  # defensive: a parser gap
            self.rejected += 1
            return CommandRejected(None, f"unparsable command ({type(exc).__name__})")
        if isinstance(command, c.Idle | c.Authenticate | c.StartTls | c.Logout):
            self.mode = Mode.HELD
        return CommandReceived(command)

    # -- the caller's side of held commands ----------------------------------------

    def idle_started(self, text: str = "idling") -> None:
        """IDLE accepted: say ``+ idling``; the next line must be DONE."""
        if self.mode is Mode.HELD:
            self.mode = Mode.IDLING
            self.send(Continuation(text))

    def sasl_challenge(self, challenge: bytes) -> None:
        """Send a SASL challenge (``+ base64``); the next line is the client's response."""
        if self.mode is Mode.HELD:
            self.mode = Mode.SASL
            self.send(Continuation(data=challenge))

    def start_tls(self) -> int:
        """TLS begins now: discard every byte received after STARTTLS; how many."""
        dropped = self.buffered
        self.plaintext_discarded += dropped
        del self._buf[:]
        self._start = 0
        self._need = 0
        self._continued = None
        if self.mode is Mode.HELD:
            self.mode = Mode.COMMANDS
        return dropped

    # -- output ---------------------------------------------------------------------

    def check(self, command: c.Command) -> StatusResponse | None:
        """The BAD answer when ``command`` is not valid in the current state, else None."""
        if allowed(self.state, command):
            return None
        name = type(command).__name__.upper()
        return StatusResponse(
            "BAD", f"{name} not allowed now ({self.state.value})", tag=command.tag
        )

    def send(self, response: Response) -> None:
        """Queue an untagged or continuation response (or a tagged one not ending a command)."""
        self._out.append(serialize(response))

    def complete(
        self,
        command: c.Command,
        status: str = "OK",
        text: str = "",
        code: ResponseCode | None = None,
    ) -> None:
        """Answer ``command`` with its tagged response and apply the state transition."""
        name = type(command).__name__.upper()
        self._out.append(
            serialize(StatusResponse(status, text or f"{name} completed", code, command.tag))
        )
        self.state = after(self.state, command, status)
        if self.state is State.LOGOUT:
            self._close()
        elif isinstance(command, c.Idle | c.Authenticate | c.StartTls) and self.mode in (
            Mode.HELD,
            Mode.IDLING,
            Mode.SASL,
        ):
            # The held command is over: later bytes are commands again (STARTTLS
            # refused; when it succeeds the caller calls start_tls first).
            self.mode = Mode.COMMANDS

    def reject(self, event: CommandRejected) -> None:
        """Answer a rejected command."""
        code = ResponseCode(event.code) if event.code else None
        self._out.append(serialize(StatusResponse(event.status, event.text, code, event.tag)))

    def bye(self, text: str) -> None:
        """``* BYE text``; the connection reads nothing more."""
        self._out.append(serialize(StatusResponse("BYE", text)))
        self._close()

    def data_to_send(self) -> bytes:
        """The bytes queued for the peer (and clear them)."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _close(self) -> None:
        self.mode = Mode.CLOSED

    @property
    def closed(self) -> bool:
        """True once nothing more will be read (LOGOUT, BYE, a fatal error)."""
        return self.mode is Mode.CLOSED
