"""Password-guessing defence shared by IMAP LOGIN/AUTHENTICATE, POP3 and SMTP AUTH.

A sans-IO core: :class:`AuthThrottle` is told ``now`` on every call and keeps
bounded tables; the Twisted side (:class:`~yimaporc.porcupine.auth.ThrottledPortal`)
asks it before each password check and applies its answers on an injected clock.

Per source address (IPv6 by /64) and login name, within a sliding ``window``:

- every failure after the first from the same (account, address) or address
  is answered after a growing delay, ``delay * 2**(n-2)`` capped at
  ``max_delay``; the reactor is never held, and the attempt keeps its
  concurrency slot until answered;
- ``pair_failures`` failures for one account from one address refuse that
  account from that address for ``lockout`` seconds; ``address_failures``
  failures from one address (any accounts) refuse the address;
- ``account_failures`` failures for one account from all addresses together
  (a distributed guess) refuse the account, but only to addresses that have
  not logged in to it successfully within ``trust`` seconds: the owner keeps
  working from their usual address, so nobody can lock a user out by failing
  on purpose from elsewhere; a success never clears the address or account
  counts, only its own (account, address) pair;
- at most ``concurrent`` checks per address are in flight (each costs a
  scrypt on the thread pool); more are refused at once.

A refused attempt costs no scrypt and does not extend a lock; once a lock
expires the count stands, so each further failure within the window locks
again (one try per ``lockout``).  The protocol
adapters close a connection after ``per_connection`` failures or a refusal.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from typing import Any

import attrs
from twisted.cred.error import UnauthorizedLogin


class LoginThrottled(UnauthorizedLogin):
    """The attempt was refused without checking the password (try again later)."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(f"too many failed logins ({reason}); retry in {retry_after:.0f} s")
        self.reason = reason
        self.retry_after = retry_after


def _positive(instance: Any, attribute: Any, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name.replace('_', '-')} must be positive")


def _not_negative(instance: Any, attribute: Any, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name.replace('_', '-')} must not be negative")


@attrs.frozen
class ThrottlePolicy:
    """The knobs; ``--auth-throttle key=value,...`` sets them (see :meth:`parse`)."""

    delay: float = attrs.field(default=0.5, validator=_not_negative)
    max_delay: float = attrs.field(default=8.0, validator=_not_negative)
    per_connection: int = attrs.field(default=3, validator=_positive)
    pair_failures: int = attrs.field(default=5, validator=_positive)
    address_failures: int = attrs.field(default=20, validator=_positive)
    account_failures: int = attrs.field(default=100, validator=_positive)
    concurrent: int = attrs.field(default=4, validator=_positive)
    window: float = attrs.field(default=900.0, validator=_positive)
    lockout: float = attrs.field(default=300.0, validator=_positive)
    trust: float = attrs.field(default=7 * 86400.0, validator=_positive)
    max_entries: int = attrs.field(default=20_000, validator=_positive)

    @classmethod
    def parse(cls, text: str) -> ThrottlePolicy:
        """``"delay=0.1,pair-failures=3"`` -> a policy; ValueError names the bad key."""
        fields = {f.name: f for f in attrs.fields(cls)}
        kwargs: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, value = item.partition("=")
            name = key.strip().replace("-", "_")
            if not sep or name not in fields:
                known = ", ".join(n.replace("_", "-") for n in fields)
                raise ValueError(f"unknown auth throttle setting {key.strip()!r} (known: {known})")
            kind = int if fields[name].type in (int, "int") else float
            try:
                kwargs[name] = kind(value.strip())
            except ValueError:
                raise ValueError(f"{key.strip()} must be a number, not {value.strip()!r}") from None
        return cls(**kwargs)


@attrs.frozen
class Admission:
    """The answer to :meth:`AuthThrottle.admit`."""

    allowed: bool
    reason: str = ""
    retry_after: float = 0.0


class _Entry:
    __slots__ = ("failures", "last", "locked_until")

    def __init__(self) -> None:
        self.failures = 0
        self.last = 0.0
        self.locked_until = 0.0


class _Table:
    """Failure counts by key, forgotten ``window`` after the last failure, bounded.

    When full, the oldest entry that is not locked goes first (looking at a few),
    so a flood of fresh names does not cheaply erase a lock.
    """

    SCAN = 64

    def __init__(self, max_entries: int, window: float) -> None:
        self.max_entries = max_entries
        self.window = window
        self._d: OrderedDict[Any, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: Any, now: float) -> _Entry | None:
        e = self._d.get(key)
        if e is not None and now - e.last > self.window and e.locked_until <= now:
            del self._d[key]
            return None
        return e

    def bump(self, key: Any, now: float) -> _Entry:
        e = self.get(key, now)
        if e is None:
            self._evict(now)
            e = self._d[key] = _Entry()
        else:
            self._d.move_to_end(key)
        e.failures += 1
        e.last = now
        return e

    def drop(self, key: Any) -> None:
        self._d.pop(key, None)

    def _evict(self, now: float) -> None:
        if len(self._d) < self.max_entries:
            return
        for i, (key, e) in enumerate(self._d.items()):
            if e.locked_until <= now or i >= self.SCAN:
                del self._d[key]
                return


def source_key(address: str) -> str:
    """The unit of throttling for a peer address: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class AuthThrottle:
    """The sans-IO throttle: ``admit`` before a check, ``failed``/``succeeded`` after it,
    ``release`` once the answer has gone out."""

    def __init__(self, policy: ThrottlePolicy | None = None) -> None:
        self.policy = p = policy or ThrottlePolicy()
        self._pairs = _Table(p.max_entries, p.window)
        self._addresses = _Table(p.max_entries, p.window)
        self._accounts = _Table(p.max_entries, p.window)
        self._trusted: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._in_flight: Counter[str] = Counter()
        #: ``attempts``, ``successes``, ``failures``, ``throttled`` (failures answered
        #: late), ``refused`` (attempts turned away unchecked).
        self.counters: Counter[str] = Counter()

    def admit(self, now: float, address: str, account: str, slot: bool = True) -> Admission:
        """May ``account`` try a password from ``address`` now?  Takes a slot if so.

        ``slot`` False: the check costs no scrypt (a credential the auth cache
        vouches for), so only the locks apply and no slot is taken."""
        src = source_key(address)
        self.counters["attempts"] += 1
        refusal = self._refusal(now, src, account, slot)
        if refusal is not None:
            self.counters["refused"] += 1
            self.counters[f"refused_{refusal.reason}"] += 1
            return refusal
        if slot:
            self._in_flight[src] += 1
        return Admission(True)

    def locked(self, now: float, address: str, account: str) -> bool:
        """Is ``account`` locked out from ``address`` now (pair, address or account
        lock)?  Counts nothing: :meth:`admit` follows."""
        return self._refusal(now, source_key(address), account, False) is not None

    def _refusal(self, now: float, src: str, account: str, slot: bool = True) -> Admission | None:
        for reason, table, key in (
            ("pair", self._pairs, (account, src)),
            ("address", self._addresses, src),
        ):
            e = table.get(key, now)
            if e is not None and e.locked_until > now:
                return Admission(False, reason, e.locked_until - now)
        e = self._accounts.get(account, now)
        if e is not None and e.locked_until > now and not self._is_trusted(now, account, src):
            return Admission(False, "account", e.locked_until - now)
        if slot and self._in_flight[src] >= self.policy.concurrent:
            return Admission(False, "concurrent", self.policy.delay)
        return None

    def _is_trusted(self, now: float, account: str, src: str) -> bool:
        when = self._trusted.get((account, src))
        return when is not None and now - when <= self.policy.trust

    def failed(self, now: float, address: str, account: str) -> float:
        """Record a wrong password; the delay (seconds) before answering it."""
        p, src = self.policy, source_key(address)
        self.counters["failures"] += 1
        pair = self._pairs.bump((account, src), now)
        addr = self._addresses.bump(src, now)
        acct = self._accounts.bump(account, now)
        for entry, limit in (
            (pair, p.pair_failures),
            (addr, p.address_failures),
            (acct, p.account_failures),
        ):
            if entry.failures >= limit and entry.locked_until <= now:
                entry.locked_until = now + p.lockout
                self.counters["locks"] += 1
        n = max(pair.failures, addr.failures)
        delay = 0.0 if n <= 1 else min(p.max_delay, p.delay * 2 ** (n - 2))
        if delay > 0:
            self.counters["throttled"] += 1
        return delay

    def succeeded(self, now: float, address: str, account: str) -> None:
        """Record a right password: clears this (account, address) pair and trusts it."""
        src = source_key(address)
        self.counters["successes"] += 1
        self._pairs.drop((account, src))
        key = (account, src)
        self._trusted.pop(key, None)
        self._trusted[key] = now
        while len(self._trusted) > self.policy.max_entries:
            self._trusted.popitem(last=False)

    def release(self, address: str) -> None:
        """The attempt admitted for ``address`` has been answered."""
        src = source_key(address)
        self._in_flight[src] -= 1
        if self._in_flight[src] <= 0:
            del self._in_flight[src]

    def status(self) -> dict[str, int]:
        """Counters and table sizes for ``/api/status``."""
        return {
            "attempts": self.counters["attempts"],
            "successes": self.counters["successes"],
            "failures": self.counters["failures"],
            "throttled": self.counters["throttled"],
            "refused": self.counters["refused"],
            "locks": self.counters["locks"],
            "in_flight": sum(self._in_flight.values()),
            "tracked_addresses": len(self._addresses),
            "tracked_accounts": len(self._accounts),
        }
