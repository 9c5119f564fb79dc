"""twisted.cred for SMTP AUTH, POP3 and IMAP: one checker, one realm, both via the managers.

Each connection logs in through its own :class:`ThrottledPortal`, which asks
the node's shared :class:`~yimaporc.porcupine.throttle.AuthThrottle` first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.cred import credentials, error, portal
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.mail import pop3, smtp
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from ._pop3 import Pop3Mailbox
from .delivery import DeliveryProxy, SmtpDelivery, SmtpPolicy
from .interfaces import ICachingChecker
from .retrieval import RetrievalProxy
from .throttle import AuthThrottle, LoginThrottled, source_key
from .usermap import BadAddress, normalise
from .values import INBOX, BadCredentials, Digest, MailboxInfo


def login_address(username: str | bytes, domain: str) -> str:
    """``demo`` -> ``demo@domain``; full addresses are normalised."""
    name = username.decode("utf-8", "replace") if isinstance(username, bytes) else username
    return normalise(name if "@" in name else f"{name}@{domain}")


@implementer(ICachingChecker)
class ManagerChecker:
    """Checks a user name and password through the user manager (scrypt)."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, retrieval: RetrievalProxy, domain: str) -> None:
        self.retrieval = retrieval
        self.domain = domain

    def cached_avatar_id(self, creds: Any) -> bytes | None:
        """The address (bytes) if this node's auth cache vouches for these credentials
        now (the user's manager is local: no RPC, pool job or scrypt), else None."""
        try:
            password = creds.password
            if isinstance(password, bytes):
                password = password.decode("utf-8")
            address = login_address(creds.username, self.domain)
        except (BadAddress, UnicodeDecodeError, AttributeError):
            return None
        profile = self.retrieval.users(address).cached_login(address, password)
        return profile.address.encode("utf-8") if profile is not None else None

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


def account_key(username: str | bytes, domain: str) -> str:
    """The login name as the throttle counts it (normalised, or the raw text, bounded)."""
    try:
        return login_address(username, domain)
    except BadAddress:
        name = username.decode("utf-8", "replace") if isinstance(username, bytes) else username
        return name.strip().lower()[:256]


#: How long a login waits for one of its address's password-check slots.
CONCURRENT_WAIT = 10.0


class _Waiter:
    __slots__ = ("expire", "timer", "wake")

    def __init__(self, wake: Callable[[], None], expire: Callable[[], None]) -> None:
        self.wake = wake
        self.expire = expire
        self.timer: IDelayedCall | None = None


class SlotWaiters:
    """Logins waiting for a password-check slot of their address (all of them busy),
    woken one per released slot, oldest first, instead of polling.  Shared by a
    node's :class:`ThrottledPortal` instances; reactor thread only."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._queues: dict[str, deque[_Waiter]] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def wait(
        self,
        peer: str,
        wake: Callable[[], None],
        expire: Callable[[], None],
        timeout: float,
        front: bool = False,
    ) -> None:
        """Call ``wake`` when a slot of ``peer``'s address is released, or ``expire``
        after ``timeout`` seconds if none was by then."""
        key = source_key(peer)
        waiter = _Waiter(wake, expire)
        queue = self._queues.setdefault(key, deque())
        if front:
            queue.appendleft(waiter)
        else:
            queue.append(waiter)

        def expired() -> None:
            q = self._queues.get(key)
            if q is not None and waiter in q:
                q.remove(waiter)
                if not q:
                    del self._queues[key]
            waiter.expire()

        waiter.timer = self.clock.callLater(max(0.0, timeout), expired)

    def released(self, peer: str) -> None:
        """A slot of ``peer``'s address was released: wake the oldest waiter (on the
        next reactor turn, so answers never nest)."""
        key = source_key(peer)
        queue = self._queues.get(key)
        if not queue:
            return
        waiter = queue.popleft()
        if not queue:
            del self._queues[key]
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        self.clock.callLater(0, waiter.wake)


class ThrottledPortal:
    """One connection's way to the portal: every password check goes through the throttle.

    Refused attempts fail at once with :class:`LoginThrottled` (no scrypt);
    wrong passwords fail after the throttle's delay on ``clock``; after
    ``per_connection`` failures, or a refusal, ``close()`` is called once the
    answer is out.  Credentials without a user name (anonymous) pass through.
    """

    def __init__(
        self,
        portal: portal.Portal,
        throttle: AuthThrottle,
        clock: IReactorTime,
        peer: str,
        domain: str,
        close: Callable[[], object],
        waiters: SlotWaiters | None = None,
    ) -> None:
        self.portal = portal
        self.throttle = throttle
        self.clock = clock
        self.peer = peer
        self.domain = domain
        self.close = close
        #: Where a login waits for a slot (None: it polls with backoff instead).
        self.waiters = waiters
        self.failures = 0
        self.busy = False

    def login(self, creds: Any, mind: Any, *interfaces: Any) -> Deferred[Any]:
        """``Portal.login``, throttled."""
        username = getattr(creds, "username", None)
        if username is None:
            return self.portal.login(creds, mind, *interfaces)
        account = account_key(username, self.domain)
        if self.busy:  # one check at a time per connection (pipelined LOGINs)
            self.throttle.counters["refused"] += 1
            return fail(LoginThrottled("connection", 0.0))
        self.busy = True
        out: Deferred[Any] = Deferred()
        self._admit(account, self.clock.seconds() + CONCURRENT_WAIT, 0.05, creds, mind,
                    interfaces, out)  # fmt: skip
        return out

    def _admit(
        self,
        account: str,
        deadline: float,
        pause: float,
        creds: Any,
        mind: Any,
        interfaces: tuple[Any, ...],
        out: Deferred[Any],
    ) -> None:
        """Check the password once the throttle admits it.  All of an address's slots
        busy (a client opening several connections at once, as Thunderbird does) is
        not a refusal: the login waits for a slot, up to :data:`CONCURRENT_WAIT` s."""
        now = self.clock.seconds()
        woken = pause < 0  # by a released slot (SlotWaiters)
        if self._cached(now, account, creds, mind, interfaces, out):
            if woken and self.waiters is not None:  # the slot stays free: pass it on
                self.waiters.released(self.peer)
            return
        admission = self.throttle.admit(now, self.peer, account)
        if not admission.allowed:
            if admission.reason == "concurrent" and self.waiters is not None and now < deadline:

                def refuse() -> None:
                    self.busy = False
                    self.clock.callLater(0, self.close)
                    out.errback(LoginThrottled("concurrent", admission.retry_after))

                self.waiters.wait(
                    self.peer,
                    lambda: self._admit(account, deadline, -1.0, creds, mind, interfaces, out),
                    refuse,
                    deadline - now,
                    front=woken,  # beaten to the slot it was woken for: stay first
                )
                return
            if admission.reason == "concurrent" and now + pause <= deadline:
                self.clock.callLater(
                    pause, self._admit, account, deadline, min(pause * 2, 0.5), creds, mind,
                    interfaces, out,
                )  # fmt: skip
                return
            if woken and self.waiters is not None:  # locked meanwhile: pass the slot on
                self.waiters.released(self.peer)
            self.busy = False
            self.clock.callLater(0, self.close)
            out.errback(LoginThrottled(admission.reason, admission.retry_after))
            return
        self._check(account, creds, mind, interfaces, out)

    def _cached(
        self,
        now: float,
        account: str,
        creds: Any,
        mind: Any,
        interfaces: tuple[Any, ...],
        out: Deferred[Any],
    ) -> bool:
        """Answer from the auth cache if it vouches for ``creds``: the throttle's locks
        are asked first (a locked account stays locked), no slot is taken (no scrypt
        runs), so such logins never wait behind other users' password checks."""
        checker, realm = self._split(creds)
        if not ICachingChecker.providedBy(checker):
            return False
        if self.throttle.locked(now, self.peer, account):
            return False
        avatar_id = checker.cached_avatar_id(creds)
        if avatar_id is None:
            return False
        self.throttle.admit(now, self.peer, account, slot=False)  # counts the attempt
        self.throttle.succeeded(now, self.peer, account)

        def answer(result: object) -> None:
            self.busy = False
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)

        maybeDeferred(realm.requestAvatar, avatar_id, mind, *interfaces).addBoth(answer)
        return True

    def _check(
        self, account: str, creds: Any, mind: Any, interfaces: tuple[Any, ...], out: Deferred[Any]
    ) -> None:
        """Check the password holding the slot; build the avatar after releasing it.

        The slot bounds password checks (scrypt) per address, not sessions: a
        POP3 avatar reads the mailbox listing, which must not keep other logins
        from the same address (a NAT, a webmail) waiting."""
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.throttle.release(self.peer)
                if self.waiters is not None:
                    self.waiters.released(self.peer)

        def answer(result: object, last: bool = False) -> None:
            self.busy = False
            release()
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)
            if last:
                self.close()

        def ok(avatar_id: object) -> None:
            self.throttle.succeeded(self.clock.seconds(), self.peer, account)
            if realm is None:  # portal.login gave the avatar itself
                answer(avatar_id)
                return
            release()
            d = maybeDeferred(realm.requestAvatar, avatar_id, mind, *interfaces)
            d.addBoth(answer)

        def bad(f: Failure) -> None:
            if not f.check(error.UnauthorizedLogin):
                answer(f)
                return
            delay = self.throttle.failed(self.clock.seconds(), self.peer, account)
            self.failures += 1
            last = self.failures >= self.throttle.policy.per_connection
            if delay > 0:
                self.clock.callLater(delay, answer, f, last)
            else:
                answer(f, last)

        checker, realm = self._split(creds)
        if checker is None:
            d = maybeDeferred(self.portal.login, creds, mind, *interfaces)
        else:
            d = maybeDeferred(checker.requestAvatarId, creds)
        d.addCallbacks(ok, bad)

    def _split(self, creds: Any) -> tuple[Any, Any]:
        """(checker, realm) of a real :class:`~twisted.cred.portal.Portal` for
        ``creds``, as ``Portal.login`` picks them; (None, None) otherwise."""
        if not isinstance(self.portal, portal.Portal):
            return None, None
        for iface, checker in self.portal.checkers.items():
            if iface.providedBy(creds):
                return checker, self.portal.realm
        return None, None


class IImapUser(Interface):
    """The IMAP avatar: the logged-in user's :class:`~.retrieval.UserMail`."""


@implementer(portal.IRealm)
class MailRealm:
    """IMAP users' mail, POP3 INBOX snapshots and authenticated SMTP deliveries."""

    def __init__(
        self,
        retrieval: RetrievalProxy,
        delivery: DeliveryProxy,
        policy: SmtpPolicy,
        now: Callable[[], float],
    ) -> None:
        self.retrieval = retrieval
        self.delivery = delivery
        self.policy = policy
        self.now = now

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Deferred[Any]:
        """The avatar for the first interface we serve."""
        address = avatar_id.decode("utf-8") if isinstance(avatar_id, bytes) else str(avatar_id)
        for iface in interfaces:
            if iface is IImapUser:
                return succeed((IImapUser, self.retrieval.open(address), lambda: None))
            if iface is pop3.IMailbox:
                return self._pop3(address)
            if iface is smtp.IMessageDelivery:
                delivery = SmtpDelivery(self.delivery, self.policy, self.now, address)
                return succeed((smtp.IMessageDelivery, delivery, lambda: None))
        return fail(error.UnhandledCredentials("no avatar for these interfaces"))

    def _pop3(self, address: str) -> Deferred[Any]:
        mail = self.retrieval.open(address)

        def got(opened: tuple[list[MailboxInfo], list[Digest]]) -> Any:
            infos, digests = opened
            inbox = next(i for i in infos if i.name == INBOX)
            return (pop3.IMailbox, Pop3Mailbox(mail, inbox.uidvalidity, digests), lambda: None)

        # tree and INBOX listing together: one ask per fragment node
        return mail.open_mailbox(INBOX, complete=True).addCallback(got)
