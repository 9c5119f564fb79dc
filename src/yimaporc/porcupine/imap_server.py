"""The IMAP listener of a Porcupine node: :class:`PorcupineImapFactory` (one
:class:`~.imap_backend.PorcupineImapBackend` per connection, the shell's counters in
the node's ``client_errors``) and :class:`MessageRenderer`, the production
:class:`~yimaporc.imap.interfaces.IMessageRenderer` over ``imap._message``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from ..imap._commands import BodySection, Command, FetchAtt
from ..imap._message import Message, Section, SectionError
from ..imap._protocol import ImapServerFactory, ImapServerProtocol
from ..imap._session import CommandRunner
from ..imap.interfaces import ImapError, IMessageRenderer
from ._guard import ClientErrors
from .imap_backend import PorcupineImapBackend


@implementer(IMessageRenderer)
class MessageRenderer:
    """FETCH data from :class:`yimaporc.imap._message.Message` (checked against Dovecot)."""

    def __init__(self) -> None:
        # One FETCH asks several items of one message in a row: parse it once.
        self._raw: bytes | None = None
        self._message: Message | None = None

    def _parsed(self, raw: bytes) -> Message:
        if self._message is None or self._raw is not raw:
            self._raw, self._message = raw, Message(raw)
        return self._message

    def render(self, raw: bytes, item: Any, internal_date: float) -> Any:
        if isinstance(item, FetchAtt):
            name = item.name
            if name == "RFC822":
                return raw
            msg = self._parsed(raw)
            if name == "ENVELOPE":
                return msg.envelope()
            if name in ("BODY", "BODYSTRUCTURE"):
                return msg.body_structure(name == "BODYSTRUCTURE")
            if name == "RFC822.HEADER":
                return msg.section(Section(text="HEADER"))
            if name == "RFC822.TEXT":
                return msg.section(Section(text="TEXT"))
            raise ImapError(f"cannot fetch {name}", status="BAD")
        assert isinstance(item, BodySection)
        try:
            section = Section(
                item.part, item.text, tuple(f.encode("utf-8", "replace") for f in item.fields)
            )
        except SectionError as e:
            raise ImapError(str(e), status="BAD") from None
        msg = self._parsed(raw)
        if item.partial is not None:
            return msg.section(section, item.partial[0], item.partial[1])
        return msg.section(section)


#: The shell's counter names -> the node's ``client_errors`` names.
_FACTORY_COUNTERS = {
    "rejected": "bad_syntax",
    "protocol_errors": "protocol_error",
    "timed_out": "timed_out",
}


class PorcupineImapFactory(ImapServerFactory):
    """:class:`~yimaporc.imap.ImapServerFactory` with one backend per connection (its
    own throttled portal, closed after repeated failures) and the shell's counters
    kept in the node's :class:`~._guard.ClientErrors` (``imap.bad_syntax``,
    ``imap.protocol_error``, ``imap.timed_out``) as well."""

    def __init__(
        self,
        backend: PorcupineImapBackend,
        portal_for: Callable[[Any, Any], Any],
        errors: ClientErrors,
        clock: IReactorTime,
        **kw: Any,
    ) -> None:
        self.errors = errors
        self.portal_for = portal_for
        super().__init__(backend, MessageRenderer(), clock, **kw)
        self.on_count = self._count

    def _count(self, name: str) -> None:
        self.errors.counts[f"imap.{_FACTORY_COUNTERS[name]}"] += 1

    def buildProtocol(self, addr: IAddress | None) -> ImapServerProtocol:
        p = PorcupineImapProtocol(self)
        self.connections.add(p)
        shared = self.backend
        assert isinstance(shared, PorcupineImapBackend)
        backend = PorcupineImapBackend(
            self.portal_for(p, addr), shared.registry, shared.clock, shared.errors
        )
        p.runner = CountingRunner(
            self.errors,
            p.conn,
            backend,
            MessageRenderer(),
            p.capabilities,
            p.flush,
            p._start_tls if self.tls is not None else None,
            p.auth_allowed,
        )
        return p


class PorcupineImapProtocol(ImapServerProtocol):
    """The shell's protocol, counting sessions in the node's ClientErrors."""

    factory: PorcupineImapFactory

    def connectionMade(self) -> None:
        self.factory.errors.opened("imap")
        super().connectionMade()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        if not self._lost:
            self.factory.errors.closed("imap")
        super().connectionLost(reason)


class CountingRunner(CommandRunner):
    """The shell's command runner, its counters kept in the node's ClientErrors too:
    commands answered NO/BAD (``imap.command_refused``) and handler failures
    (``imap.server_error``, our bugs); of the refused, keywords past a bound
    (``imap.keyword_limit``)."""

    def __init__(self, errors: ClientErrors, *args: Any) -> None:
        self.errors = errors
        super().__init__(*args)
        self.on_count = self._counted

    def _counted(self, name: str) -> None:
        if name == "failed":
            self.errors.client("imap", "command_refused")
        elif name == "keyword_limit":
            self.errors.client("imap", "keyword_limit")
        else:
            self.errors.counts["imap.server_error"] += 1

    def run(self, cmd: Command) -> Deferred[None]:
        self.errors.command("imap")
        return super().run(cmd)
