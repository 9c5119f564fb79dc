"""IMAP4rev1/IMAP4rev2 for Porcupine: the project's own protocol package.

A sans-IO connection (:class:`ImapConnection`), the command grammar
(:func:`parse_command`, typed command values in :mod:`._commands`), a response
serializer correct by construction (:mod:`._serialize`), the session state table
(:mod:`._machine`) and a thin Twisted shell (:class:`ImapServerFactory`) over an
:class:`IImapBackend`.  Message-level logic lives in pure modules: :mod:`._message`
(ENVELOPE, BODYSTRUCTURE, sections), :mod:`._search` (the SEARCH evaluator) and
:mod:`._sequence` (sequence sets).  See docs/imap.md for the layout, grammar coverage
and limits, docs/imap-messages.md for the message rules.
"""

from ._commands import BinarySection, BodySection, Command, FetchAtt, FetchItem
from ._connection import ImapConnection
from ._events import (
    AuthenticateResponse,
    CommandReceived,
    CommandRejected,
    IdleDone,
    ProtocolFailure,
)
from ._format import format_command
from ._lexer import DEFAULT_LIMITS, Limits, ParseError
from ._machine import State
from ._protocol import BASE_CAPABILITIES, ImapServerFactory, ImapServerProtocol
from ._serialize import Continuation, ResponseCode, StatusResponse, serialize
from ._wire import parse_command
from .interfaces import (
    AppendResult,
    CopyResult,
    IImapBackend,
    IImapSession,
    ImapError,
    IMessageRenderer,
    ISelectedMailbox,
    MailboxListing,
    MailboxStatus,
    MessageInfo,
    Snapshot,
)

__all__ = [
    "BASE_CAPABILITIES",
    "DEFAULT_LIMITS",
    "AppendResult",
    "AuthenticateResponse",
    "BinarySection",
    "BodySection",
    "Command",
    "CommandReceived",
    "CommandRejected",
    "Continuation",
    "CopyResult",
    "FetchAtt",
    "FetchItem",
    "IImapBackend",
    "IImapSession",
    "IMessageRenderer",
    "ISelectedMailbox",
    "IdleDone",
    "ImapConnection",
    "ImapError",
    "ImapServerFactory",
    "ImapServerProtocol",
    "Limits",
    "MailboxListing",
    "MailboxStatus",
    "MessageInfo",
    "ParseError",
    "ProtocolFailure",
    "ResponseCode",
    "Snapshot",
    "State",
    "StatusResponse",
    "format_command",
    "parse_command",
    "serialize",
]
