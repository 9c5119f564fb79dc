"""twisted.cred for SMTP AUTH, POP3 and IMAP: one checker, one realm, both via the managers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.defer import Deferred, fail, succeed
from twisted.mail import imap4, pop3, smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from ._imap import ImapAccount, MailboxRegistry
from ._pop3 import Pop3Mailbox
from .delivery import DeliveryProxy, SmtpDelivery, SmtpPolicy
from .retrieval import RetrievalProxy
from .usermap import BadAddress, normalise
from .values import INBOX, BadCredentials, MailboxInfo


def login_address(username: str | bytes, domain: str) -> str:
    """``demo`` -> ``demo@domain``; full addresses are normalised."""
    name = username.decode("utf-8", "replace") if isinstance(username, bytes) else username
    return normalise(name if "@" in name else f"{name}@{domain}")


@implementer(ICredentialsChecker)
class ManagerChecker:
    """Checks a user name and password through the user manager (scrypt)."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, retrieval: RetrievalProxy, domain: str) -> None:
        self.retrieval = retrieval
        self.domain = domain

    def requestAvatarId(self, creds: Any) -> Deferred[bytes | tuple[()]]:
        """The address (bytes) if the password is right; UnauthorizedLogin otherwise."""
        try:
            password = creds.password
            if isinstance(password, bytes):
                password = password.decode("utf-8")
            address = login_address(creds.username, self.domain)
        except (BadAddress, UnicodeDecodeError):
            return fail(error.UnauthorizedLogin("bad user name or password"))

        def bad(f: Failure) -> None:
            f.trap(BadCredentials)
            raise error.UnauthorizedLogin("bad user name or password")

        d = self.retrieval.authenticate(address, password)
        out: Deferred[Any] = d.addCallbacks(lambda p: p.address.encode("utf-8"), bad)
        return out


@implementer(portal.IRealm)
class MailRealm:
    """IMAP accounts, POP3 INBOX snapshots and authenticated SMTP deliveries."""

    def __init__(
        self,
        retrieval: RetrievalProxy,
        delivery: DeliveryProxy,
        policy: SmtpPolicy,
        registry: MailboxRegistry,
        read_file: Callable[[Any], Deferred[bytes]],
        now: Callable[[], float],
    ) -> None:
        self.retrieval = retrieval
        self.delivery = delivery
        self.policy = policy
        self.registry = registry
        self.read_file = read_file
        self.now = now

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Deferred[Any]:
        """The avatar for the first interface we serve."""
        address = avatar_id.decode("utf-8") if isinstance(avatar_id, bytes) else str(avatar_id)
        for iface in interfaces:
            if iface is imap4.IAccount:
                account = ImapAccount(self.retrieval.open(address), self.registry, self.read_file)
                return succeed((imap4.IAccount, account, lambda: None))
            if iface is pop3.IMailbox:
                return self._pop3(address)
            if iface is smtp.IMessageDelivery:
                delivery = SmtpDelivery(self.delivery, self.policy, self.now, address)
                return succeed((smtp.IMessageDelivery, delivery, lambda: None))
        return fail(error.UnhandledCredentials("no avatar for these interfaces"))

    def _pop3(self, address: str) -> Deferred[Any]:
        mail = self.retrieval.open(address)

        def got(infos: list[MailboxInfo]) -> Deferred[Any]:
            inbox = next(i for i in infos if i.name == INBOX)
            return mail.digests(INBOX).addCallback(
                lambda digests: (
                    pop3.IMailbox,
                    Pop3Mailbox(mail, inbox.uidvalidity, digests),
                    lambda: None,
                )
            )

        return mail.mailboxes().addCallback(got)
