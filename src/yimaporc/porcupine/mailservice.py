"""The mail service of a porcupine node: SMTP, POP3 and IMAP4 on its endpoints.

``MailService`` is a ``MultiService``: give it a reactor, the data dir, the
domain and endpoint strings, start it, and it listens.  It also offers admin
routes (``/api/mail/users...``) and a status provider (``users``, ``services``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.cred import portal
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.mail import pop3

from ..admin.routes import ApiError, Route
from .backends import Delivery, ImapServer, LimitedESMTP, MailRealm, StoreChecker
from .mailstore import AsyncMailStore, MailStore, NoSuchUser, UserExists, normalise

DEFAULT_MAX_SIZE = 25 << 20


class _NoDelay:
    def connectionMade(self) -> None:
        transport = getattr(self, "transport", None)
        if transport is not None and hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
        super().connectionMade()  # type: ignore[misc]


class _SMTP(_NoDelay, LimitedESMTP):
    pass


class _POP3(_NoDelay, pop3.POP3):
    pass


class _IMAP(_NoDelay, ImapServer):
    pass


class SMTPFactory(Factory):
    """ESMTP sessions delivering into the store."""

    def __init__(self, delivery: Delivery, hostname: str, max_size: int) -> None:
        self.delivery = delivery
        self.hostname = hostname
        self.max_size = max_size

    def buildProtocol(self, addr: Any) -> _SMTP:
        p = _SMTP(max_size=self.max_size)
        p.delivery = self.delivery
        p.host = self.hostname.encode()
        p.factory = self
        return p


class POP3Factory(Factory):
    """POP3 sessions on the users' INBOX."""

    def __init__(self, portal_: portal.Portal) -> None:
        self.portal = portal_

    def buildProtocol(self, addr: Any) -> Any:
        p: Any = _POP3()
        # No <timestamp> in the greeting: APOP (MD5 of a stored plaintext) is not
        # offered, since passwords are kept only as scrypt hashes.
        p.magic = b"yimaporc POP3 ready"
        p.portal = self.portal
        p.factory = self
        return p


class IMAPFactory(Factory):
    """IMAP4rev1 sessions."""

    def __init__(self, portal_: portal.Portal) -> None:
        self.portal = portal_

    def buildProtocol(self, addr: Any) -> Any:
        p: Any = _IMAP()
        p.portal = self.portal
        p.factory = self
        return p


def _address_of(port: IListeningPort) -> str:
    host = port.getHost()
    return f"{host.host}:{host.port}"  # type: ignore[attr-defined]


class MailService(MultiService):
    """SMTP/POP3/IMAP of one node over its durable mail store."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        node_id: str,
        data_dir: Path,
        domain: str,
        smtp_endpoint: str | None = None,
        pop3_endpoint: str | None = None,
        imap_endpoint: str | None = None,
        max_message_size: int = DEFAULT_MAX_SIZE,
        relay_domains: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.node_id = node_id
        self.domain = domain.lower()
        self.endpoints = {"smtp": smtp_endpoint, "pop3": pop3_endpoint, "imap": imap_endpoint}
        self.store = AsyncMailStore(reactor, MailStore(data_dir))
        self.portal = portal.Portal(MailRealm(self.store), [StoreChecker(self.store, self.domain)])
        self.delivery = Delivery(
            self.store, self.domain, f"{node_id}.{self.domain}", max_message_size, relay_domains
        )
        self.factories: dict[str, Factory] = {
            "smtp": SMTPFactory(self.delivery, f"{node_id}.{self.domain}", max_message_size),
            "pop3": POP3Factory(self.portal),
            "imap": IMAPFactory(self.portal),
        }
        self.ports: dict[str, IListeningPort] = {}
        self.user_count = len(self.store.store.users())

    def startService(self) -> None:
        """Start the store's worker and listen on every configured endpoint."""
        self.store.start()
        for name, endpoint in self.endpoints.items():
            if not endpoint:
                continue
            d = serverFromString(self.reactor, endpoint).listen(self.factories[name])
            d.addCallback(self._listening, name)
            d.addErrback(self._cannot_listen, name, endpoint)
        super().startService()

    def _listening(self, port: IListeningPort, name: str) -> None:
        self.ports[name] = port
        self.log.info("mail: {name} on {addr}", name=name, addr=_address_of(port))

    def _cannot_listen(self, failure: Any, name: str, endpoint: str) -> None:
        self.log.failure("mail: cannot listen for {name} on {endpoint}", failure, name=name,
                         endpoint=endpoint)  # fmt: skip
        self.reactor.stop()

    def stopService(self) -> Deferred[Any]:
        """Stop listening, then the worker."""
        ports, self.ports = list(self.ports.values()), {}
        d = DeferredList([maybeDeferred(p.stopListening) for p in ports])
        d.addCallback(lambda _: maybeDeferred(super(MailService, self).stopService))
        d.addCallback(lambda _: self.store.stop())
        return d

    def status(self) -> dict[str, Any]:
        """``users`` and the addresses of the running mail ``services``."""
        return {
            "users": self.user_count,
            "domain": self.domain,
            "services": {name: _address_of(p) for name, p in self.ports.items()},
        }

    # --- admin API -----------------------------------------------------------

    def admin_routes(self) -> list[Route]:
        """``/api/mail/users`` (GET list, POST add), ``.../delete``, ``.../passwd``."""
        return [
            Route("GET", "/api/mail/users", self._list_users, mutates=False),
            Route("POST", "/api/mail/users", self._add_user),
            Route("POST", "/api/mail/users/delete", self._delete_user),
            Route("POST", "/api/mail/users/passwd", self._passwd),
        ]

    def _address(self, body: dict[str, Any]) -> str:
        address = body.get("address")
        if not isinstance(address, str) or address.count("@") != 1:
            raise ApiError("address must look like user@domain")
        address = normalise(address)
        local, domain = address.split("@")
        if not local or domain != self.domain:
            raise ApiError(f"address must be in this cluster's domain {self.domain}")
        return address

    @staticmethod
    def _password(body: dict[str, Any]) -> str:
        password = body.get("password")
        if not isinstance(password, str) or not password:
            raise ApiError("password must be a non-empty string")
        return password

    def _list_users(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        return self.store.users().addCallback(lambda users: {"users": users})

    def _add_user(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        address, password = self._address(body), self._password(body)
        replicas = body.get("replicas", 1)
        if not isinstance(replicas, int) or not 1 <= replicas <= 16:
            raise ApiError("replicas must be an integer from 1 to 16")

        def added(_: Any) -> dict[str, Any]:
            self.user_count += 1
            return {"created": address, "replicas": replicas}

        def exists(f: Any) -> Any:
            f.trap(UserExists)
            raise ApiError(str(f.value), 409)

        return self.store.add_user(address, password, replicas).addCallbacks(added, exists)

    def _delete_user(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        address = self._address(body)

        def deleted(_: Any) -> dict[str, Any]:
            self.user_count -= 1
            return {"deleted": address}

        return self.store.delete_user(address).addCallbacks(deleted, self._no_user)

    def _passwd(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        address, password = self._address(body), self._password(body)
        d = self.store.set_password(address, password)
        return d.addCallbacks(lambda _: {"updated": address}, self._no_user)

    @staticmethod
    def _no_user(f: Any) -> Any:
        f.trap(NoSuchUser)
        raise ApiError(str(f.value), 404)
