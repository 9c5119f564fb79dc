"""Part ``mail-target``: one porcupine-node (SMTP, POP3, IMAP), fresh data dir."""

from __future__ import annotations

import smtplib
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from parts.cluster import Cluster, add_users, require_service
from parts.common import (
    DOMAIN,
    PEERS,
    PORTS,
    WORK,
    PartFailed,
    Profiler,
    Settings,
    scoped,
    users_list,
)
from parts.loads import mail_load


def deliver_for_retrieval(s: Settings, hosts: list[str], first: int = 0) -> None:
    """pop(F+1)..pop(F+U) (pop001..popU) get per_user messages over SMTP (the same
    4-8 KB shape as populate)."""
    sys.path.insert(0, str(PEERS))
    import random

    import mail_load  # type: ignore[import-not-found]

    rng = random.Random(1)
    jobs = []
    for u in range(1, s.mail_users + 1):
        for i in range(s.mail_per_user):
            rcpt = f"pop{first + u:03d}@{DOMAIN}"
            msg = mail_load.make_message(rng, rng.randint(4096, 8192), "load@bench.load", rcpt, i)
            jobs.append((hosts[len(jobs) % len(hosts)], rcpt, msg))
    lock = threading.Lock()
    failures: list[str] = []

    def worker(k: int) -> None:
        for host, rcpt, msg in jobs[k::8]:
            try:
                with smtplib.SMTP(
                    host, PORTS["smtp"], local_hostname="load.bench", timeout=30
                ) as m:
                    m.sendmail("load@bench.load", [rcpt], msg)
            except (OSError, smtplib.SMTPException) as e:
                with lock:
                    failures.append(f"{rcpt}: {e!r}")

    with ThreadPoolExecutor(max_workers=8) as ex:
        list(ex.map(worker, range(8)))
    if failures:
        raise PartFailed(f"porcupine refused retrieval mail ({len(failures)}x, {failures[0]})")


def part_mail_target(s: Settings, res: dict[str, Any], errors: list[str]) -> None:
    mail = res.setdefault("mail", {})
    log = WORK / "mail" / "load.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with scoped():
            extra = ["--mail-workers", str(s.mail_workers)] if s.mail_workers else []
            c = Cluster("porcupine", 1, WORK / "porcupine-1", extra)
            c.start()
            host = c.hosts[0]
            require_service(c, "smtp", PORTS["smtp"])
            require_service(c, "pop3", PORTS["pop3"])
            require_service(c, "imap", PORTS["imap"])
            add_users(c, users_list(s))
            deliver_for_retrieval(s, c.hosts)
            r: dict[str, Any] = {}
            with Profiler("porcupine-smtp", c.pids, res):
                r["smtp"] = mail_load(s, "smtp", host, PORTS["smtp"], "porcupine", c.pids, log=log)
            for proto in ("pop3", "imap"):
                with Profiler(f"porcupine-{proto}", c.pids, res):
                    r[proto] = mail_load(
                        s,
                        proto,
                        host,
                        PORTS[proto],
                        "porcupine",
                        c.pids,
                        ["--user-suffix", "@" + DOMAIN],
                        log=log,
                    )
            r["mail_workers"] = s.mail_workers
            mail["porcupine"] = r
    except PartFailed as e:
        errors.append(f"target porcupine-node: {e}")
        mail["porcupine"] = {"error": str(e)}
