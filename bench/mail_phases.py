#!/usr/bin/env python3
"""Where the wall time of a POP3/IMAP session goes, seen from the client: the bench's
session (bench/peers/mail_load.py: IMAP connect+greeting+CAPABILITY, LOGIN, SELECT
read-only, FETCH 1:5 (UID RFC822.SIZE BODY.PEEK[]), LOGOUT; POP3 connect, USER+PASS,
STAT+LIST, 5 RETR, QUIT) with each phase timed, C connections for D seconds.  Prints
p50/p90/p99/max per phase, each phase's share of the summed session time, and the
sessions per half second (count/p50/p99 ms) to show stalls.  Pair it with
bench/mail_node_trace.py on the node to see whether the node waited or was not run
(issue 20):

    .venv/bin/python bench/mail_phases.py imap --host 127.0.156.1 [--conns 16] [--duration 4]
"""

from __future__ import annotations

import argparse
import collections
import imaplib
import poplib
import random
import threading
import time
from collections.abc import Callable


def imap_session(a: argparse.Namespace, rng: random.Random) -> dict[str, float]:
    ph: dict[str, float] = {}
    t = t0 = time.monotonic()

    def mark(name: str) -> None:
        nonlocal t
        now = time.monotonic()
        ph[name] = now - t
        t = now

    user = f"{a.prefix}{a.first + rng.randint(1, a.users):03d}@{a.domain}"
    m = imaplib.IMAP4(a.host, a.port or 1143, timeout=30)
    mark("connect")
    m.login(user, a.password)
    mark("login")
    _, data = m.select("INBOX", readonly=True)
    mark("select")
    n = int(data[0] or 0)
    if n:
        m.fetch(f"1:{min(n, a.fetch)}", "(UID RFC822.SIZE BODY.PEEK[])")
    mark("fetch")
    m.logout()
    mark("logout")
    ph["total"] = t - t0
    return ph


def pop3_session(a: argparse.Namespace, rng: random.Random) -> dict[str, float]:
    ph: dict[str, float] = {}
    t = t0 = time.monotonic()

    def mark(name: str) -> None:
        nonlocal t
        now = time.monotonic()
        ph[name] = now - t
        t = now

    user = f"{a.prefix}{a.first + rng.randint(1, a.users):03d}@{a.domain}"
    p = poplib.POP3(a.host, a.port or 1110, timeout=30)
    mark("connect")
    p.user(user)
    p.pass_(a.password)
    mark("login")
    n, _ = p.stat()
    p.list()
    mark("list")
    for i in range(1, min(n, a.fetch) + 1):
        p.retr(i)
    mark("fetch")
    p.quit()
    mark("logout")
    ph["total"] = t - t0
    return ph


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return 1000 * xs[min(len(xs) - 1, int(p * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("proto", choices=("imap", "pop3"))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--users", type=int, default=10)
    ap.add_argument("--first", type=int, default=0, help="logins PREFIX(F+1)..PREFIX(F+U)")
    ap.add_argument("--prefix", default="pop")
    ap.add_argument("--domain", default="bench.test")
    ap.add_argument("--password", default="pw")
    ap.add_argument("--fetch", type=int, default=5)
    a = ap.parse_args()
    session: Callable[[argparse.Namespace, random.Random], dict[str, float]] = (
        imap_session if a.proto == "imap" else pop3_session
    )
    start = time.monotonic()
    stop = start + a.duration
    rows: list[tuple[float, dict[str, float]]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(wid: int) -> None:
        rng = random.Random(wid)
        while time.monotonic() < stop:
            try:
                ph = session(a, rng)
            except Exception as e:
                with lock:
                    errors.append(repr(e)[:200])
                time.sleep(0.05)
                continue
            with lock:
                rows.append((time.monotonic(), ph))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(a.conns)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if not rows:
        raise SystemExit(f"error: no session completed ({errors[:1]})")
    total = sum(r[1]["total"] for r in rows)
    print(
        f"{a.proto}: {len(rows)} sessions in {a.duration:g} s = {len(rows) / a.duration:.0f}/s, "
        f"{len(errors)} errors"
    )
    for name in rows[0][1]:
        xs = [r[1][name] for r in rows]
        print(
            f"  {name:8s} p50 {pct(xs, 0.5):7.1f}  p90 {pct(xs, 0.9):7.1f}  p99 {pct(xs, 0.99):7.1f}"
            f"  max {1000 * max(xs):7.1f} ms  share {100 * sum(xs) / total:5.1f} %"
        )
    bins: dict[int, list[float]] = collections.defaultdict(list)
    for t, ph in rows:
        bins[int((t - start) * 2)].append(ph["total"])
    print(
        "  per 0.5 s (sessions/p50/p99 ms): "
        + " ".join(
            f"{len(v)}/{pct(v, 0.5):.0f}/{pct(v, 0.99):.0f}" for _, v in sorted(bins.items())
        )
    )


if __name__ == "__main__":
    main()
