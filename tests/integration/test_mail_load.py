"""50 concurrent SMTP sessions deliver 1,000 messages: all retrievable, none twice."""

from __future__ import annotations

import imaplib
import re
import smtplib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from yimaporc.porcupine.testing import RunningMail

USERS = [f"user{i:02d}@example.org" for i in range(10)]
SESSIONS, PER_SESSION = 50, 20


def _session(port: int, s: int) -> list[str]:
    sent = []
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
        for k in range(PER_SESSION):
            n = s * PER_SESSION + k
            to = USERS[n % len(USERS)]
            mid = f"<load-{n}@test>"
            body = f"Subject: load {n}\r\nMessage-ID: {mid}\r\n\r\n{'x' * (4000 + n % 4000)}\r\n"
            assert c.sendmail("load@test.org", [to], body.encode()) == {}
            sent.append(mid)
    return sent


def test_fifty_sessions_thousand_messages(tmp_path: Path) -> None:
    """Every accepted message is stored exactly once and readable over IMAP."""
    m = RunningMail(tmp_path / "data")
    try:
        for u in USERS:
            m.add_user(u, "pw")
        with ThreadPoolExecutor(SESSIONS) as pool:
            sent = [
                mid
                for part in pool.map(lambda s: _session(m.port("smtp"), s), range(SESSIONS))
                for mid in part
            ]
        assert len(sent) == len(set(sent)) == SESSIONS * PER_SESSION
        seen: list[str] = []
        for u in USERS:
            i = imaplib.IMAP4("127.0.0.1", m.port("imap"), timeout=60)
            i.login(u, "pw")
            _, data = i.select("INBOX", readonly=True)
            count = int(data[0])
            _, uids = i.uid("SEARCH", "ALL")
            assert [int(x) for x in uids[0].split()] == list(range(1, count + 1))
            _, got = i.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            seen += [
                re.search(rb"<load-\d+@test>", part[1]).group().decode()
                for part in got
                if isinstance(part, tuple)
            ]  # type: ignore[union-attr]
            i.logout()
        assert sorted(seen) == sorted(sent)
    finally:
        m.stop()
