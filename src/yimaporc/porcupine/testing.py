"""Run a :class:`MailService` in-process for tests with blocking clients (smtplib, imaplib...).

The global reactor runs in a daemon thread (started once per process); the
test thread talks to it with ``blockingCallFromThread``.  Library code never
imports the global reactor; only these helpers, when a test asks for them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.threads import blockingCallFromThread

from .._reactor import node_reactor
from .service import MailService

T = TypeVar("T")

_started = threading.Lock()
_thread: threading.Thread | None = None


def reactor_thread() -> Any:
    """The global reactor, running in a background thread."""
    global _thread
    from twisted.internet import reactor

    with _started:
        if _thread is None:
            _thread = threading.Thread(
                target=reactor.run,
                kwargs={"installSignalHandlers": False},
                name="reactor",
                daemon=True,
            )
            _thread.start()
    return reactor


def in_reactor(f: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Call ``f`` on the reactor thread and wait for its (Deferred) result."""
    return blockingCallFromThread(reactor_thread(), f, *args, **kw)  # type: ignore[no-any-return]


class RunningMail:
    """A started MailService on loopback port 0 (or given endpoints)."""

    def __init__(self, data_dir: Path, domain: str = "example.org", **kw: Any) -> None:
        self.reactor = reactor_thread()
        host = kw.pop("host", "127.0.0.1")
        for name in ("smtp", "pop3", "imap"):
            kw.setdefault(name, f"tcp:0:interface={host}")
        self.kw = kw
        self.data_dir = data_dir
        self.domain = domain
        self.service: MailService = in_reactor(self._start)
        self.host = host

    def _start(self) -> Any:
        svc = MailService(
            self.reactor, node_id="n1", data_dir=self.data_dir, domain=self.domain, **self.kw
        )
        svc.startService()
        return svc.when_ready().addCallback(lambda _: svc)

    def port(self, name: str) -> int:
        """The port a protocol listens on."""
        return int(self.service.address_of(name).rsplit(":", 1)[1])

    def add_user(self, address: str, password: str, replicas: int = 1) -> Any:
        """Create a user through the admin route handler."""
        route = next(
            r
            for r in self.service.admin_routes()
            if r.method == "POST" and r.path == "/api/mail/users"
        )
        body = {"address": address, "password": password, "replicas": replicas}
        return in_reactor(lambda: route.handler(body, {}))

    def route(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Call an admin route handler (ApiError propagates)."""
        from twisted.internet.defer import maybeDeferred

        route = next(r for r in self.service.admin_routes() if (r.method, r.path) == (method, path))
        return in_reactor(lambda: maybeDeferred(route.handler, body or {}, {}))

    def stop(self) -> None:
        """Stop listening and close the stores."""
        in_reactor(self.service.stopService)


def serve(argv: list[str]) -> None:
    """``python -m yimaporc.porcupine.testing DATA_DIR DOMAIN USER:PASSWORD...``.

    Runs a MailService on 127.0.0.1 port 0 (for process tests: SIGKILL and
    restart), creates missing users, prints ``READY smtp=P pop3=P imap=P``.
    """
    from twisted.internet import reactor

    data_dir, domain, *users = argv
    svc = MailService(
        node_reactor(reactor),
        node_id="n1",
        data_dir=Path(data_dir),
        domain=domain,
        smtp="tcp:0:interface=127.0.0.1",
        pop3="tcp:0:interface=127.0.0.1",
        imap="tcp:0:interface=127.0.0.1",
    )
    svc.startService()

    def add_missing(profiles: list[Any]) -> Any:
        from twisted.internet.defer import gatherResults

        add = next(
            r for r in svc.admin_routes() if (r.method, r.path) == ("POST", "/api/mail/users")
        )
        existing = {p.address for p in profiles}
        pairs = [u.split(":", 1) for u in users]
        return gatherResults(
            [add.handler({"address": a, "password": p}, {}) for a, p in pairs if a not in existing]
        )

    def announce(_: object) -> None:
        ports = " ".join(
            f"{n}={svc.address_of(n).rsplit(':', 1)[1]}" for n in ("smtp", "pop3", "imap")
        )
        print(f"READY {ports}", flush=True)

    d = svc.when_ready().addCallback(lambda _: svc.profiles.users())
    d.addCallback(add_missing).addCallback(announce)
    reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    import sys

    serve(sys.argv[1:])
