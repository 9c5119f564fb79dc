#!/usr/bin/env python3
"""CPU cost of a repeated mail login, in process: N logins (16 in flight) of 10 users
through the node's own chain (ThrottledPortal -> Portal -> ManagerChecker ->
UserManager -> ProfileDB) on the real reactor and a real thread pool, after one
scrypt per user.  Prints process CPU ms (reactor and pool threads) and wall ms per
login.  Run it against two trees to compare (issue 20, the auth cache):

    PYTHONPATH=src .venv/bin/python bench/login_cost.py [N]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.cred import portal as cred_portal
from twisted.cred.credentials import UsernamePassword
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.mail import imap4
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

import yimaporc.porcupine.auth as auth
from yimaporc.porcupine.profiledb import ProfileDB
from yimaporc.porcupine.retrieval import RetrievalProxy
from yimaporc.porcupine.throttle import AuthThrottle, ThrottlePolicy
from yimaporc.porcupine.users import UserManager

IN_FLIGHT = 16
NAMES = [f"pop{i:03d}" for i in range(1, 11)]


@implementer(cred_portal.IRealm)
class Realm:
    """Avatars cost nothing here: only the login is measured."""

    def requestAvatar(self, avatar_id: Any, mind: Any, *ifaces: Any) -> Any:
        return (ifaces[0], avatar_id, lambda: None)


def main(n: int) -> None:
    pool = ThreadPool(2, 8, name="login-cost")
    pool.start()
    db = ProfileDB(reactor, pool, Path(tempfile.mkdtemp()) / "profiles.sqlite", time.time)
    users = UserManager("n1", db)
    retrieval = RetrievalProxy("n1", lambda a: users, lambda n: None)  # type: ignore[arg-type,return-value]
    portal = cred_portal.Portal(Realm(), [auth.ManagerChecker(retrieval, "bench.test")])
    throttle = AuthThrottle(ThrottlePolicy())
    waiters = auth.SlotWaiters(reactor) if hasattr(auth, "SlotWaiters") else None
    state = {"started": 0, "done": 0, "failed": 0, "t0": 0.0, "c0": 0.0}

    def one() -> None:
        if state["started"] >= n:
            return
        i = int(state["started"])
        state["started"] += 1
        args: list[Any] = [portal, throttle, reactor, "127.0.0.1", "bench.test", lambda: None]
        p = auth.ThrottledPortal(*args, *([waiters] if waiters is not None else []))
        creds = UsernamePassword(NAMES[i % len(NAMES)].encode(), b"pw")

        def finished(result: object) -> None:
            state["failed"] += not isinstance(result, tuple)
            state["done"] += 1
            if state["done"] == n:
                reactor.stop()  # type: ignore[attr-defined]
            else:
                reactor.callLater(0, one)  # type: ignore[attr-defined]

        p.login(creds, None, imap4.IAccount).addBoth(finished)

    def go(_: object) -> None:
        state["t0"], state["c0"] = time.perf_counter(), time.process_time()
        for _ in range(IN_FLIGHT):
            one()

    def setup() -> None:
        added = gatherResults([db.add(f"{u}@bench.test", "pw") for u in NAMES])
        added.addCallback(
            lambda _: gatherResults([db.verify(f"{u}@bench.test", "pw") for u in NAMES])
        )
        added.addCallback(go)

    reactor.callWhenRunning(setup)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    wall = time.perf_counter() - state["t0"]
    cpu = time.process_time() - state["c0"]
    pool.stop()
    print(
        f"logins={n} failed={int(state['failed'])} cpu_ms_per_login={cpu * 1000 / n:.3f} "
        f"wall_ms_per_login={wall * 1000 / n:.3f}"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
