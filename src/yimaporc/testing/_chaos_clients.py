"""The chaos run's mail clients (SMTP deliveries, IMAP and POP3 reads, by the
standard library) and the recorder of what they saw (:mod:`yimaporc.testing.chaos`)."""

from __future__ import annotations

import contextlib
import imaplib
import poplib
import re
import smtplib
import threading
from collections import defaultdict
from typing import Any

from ._chaos_check import Ack, Poll, Read, User
from ._chaos_net import GREETING_TIMEOUT, IMAP, IO_TIMEOUT, MARKER, POP3, SMTP, SMTP_TIMEOUT, ip_of


def message(user: str, marker: str) -> bytes:
    """The test message for ``marker``."""
    return (
        f"From: chaos@client.example\r\nTo: {user}\r\nSubject: chaos {marker}\r\n"
        f"Message-ID: <{marker}@chaos>\r\n\r\nbody of {marker}\r\n"
    ).encode()


def smtp_send(node: int, user: str, marker: str) -> bool:
    """One delivery through ``node``; True on a 250 for the recipient."""
    try:
        # A paused node completes the TCP handshake (the kernel does) but sends no
        # greeting: give up on it quickly, then wait long for the answers.
        with smtplib.SMTP(ip_of(node), SMTP, timeout=GREETING_TIMEOUT) as s:
            if s.sock is not None:
                s.sock.settimeout(SMTP_TIMEOUT)
            refused = s.sendmail("chaos@client.example", [user], message(user, marker))
        return not refused
    except (smtplib.SMTPException, OSError):
        return False


def _markers_of(data: list[Any]) -> dict[int, tuple[str, ...]]:
    out: dict[int, list[str]] = defaultdict(list)
    for item in data:
        if not isinstance(item, tuple):
            continue
        uid = re.search(rb"UID (\d+)", item[0])
        found = MARKER.search(item[1])
        if uid is not None:
            out[int(uid.group(1))].append(found.group(1).decode() if found else "?")
    return {k: tuple(v) for k, v in out.items()}


def imap_session(
    node: int,
    user: User,
    status: bool = True,
    listing: bool = True,
    why: list[str] | None = None,
) -> tuple[tuple[int, int, int] | None, dict[int, tuple[str, ...]] | None]:
    """STATUS (UIDNEXT, UIDVALIDITY, MESSAGES) and the UID listing of INBOX at
    ``node``; either is None when refused (``NO [UNAVAILABLE]``) or out of reach
    (the reason appended to ``why``)."""
    why = [] if why is None else why
    got_status: tuple[int, int, int] | None = None
    got_list: dict[int, tuple[str, ...]] | None = None
    try:
        m = imaplib.IMAP4(ip_of(node), IMAP, timeout=IO_TIMEOUT)
    except OSError as e:
        why.append(f"connect: {e}")
        return None, None
    try:
        m.login(user.address, user.password)
        if status:
            typ, data = m.status("INBOX", "(UIDNEXT UIDVALIDITY MESSAGES)")
            if typ == "OK" and data and isinstance(data[0], bytes):
                fields = dict(re.findall(rb"(UIDNEXT|UIDVALIDITY|MESSAGES) (\d+)", data[0]))
                got_status = (
                    int(fields[b"UIDNEXT"]),
                    int(fields[b"UIDVALIDITY"]),
                    int(fields[b"MESSAGES"]),
                )
        if listing:
            typ, data = m.select("INBOX", readonly=True)
            if typ == "OK":
                typ, data = m.uid("FETCH", "1:*", "(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
                if typ == "OK":
                    got_list = _markers_of(data)
                else:
                    why.append(f"UID FETCH: {typ} {data!r:.200}")
            else:
                why.append(f"SELECT: {typ} {data!r:.200}")
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            m.logout()
    except (imaplib.IMAP4.error, OSError, KeyError, ValueError) as e:
        why.append(f"{type(e).__name__}: {e}")
        with contextlib.suppress(OSError):
            m.shutdown()
    return got_status, got_list


def pop3_listing(
    node: int, user: User, why: list[str] | None = None
) -> list[tuple[str, str]] | None:
    """(UIDL, marker from TOP n 0) for every message POP3 lists at ``node``; None
    when refused or out of reach (the reason appended to ``why``)."""
    why = [] if why is None else why
    try:
        p = poplib.POP3(ip_of(node), POP3, timeout=IO_TIMEOUT)
    except OSError as e:
        why.append(f"connect: {e}")
        return None
    try:
        p.user(user.address)
        p.pass_(user.password)
        _, lines, _ = p.uidl()
        out = []
        for line in lines:
            k, uidl = line.split()
            try:
                _, head, _ = p.top(int(k), 0)
            except poplib.error_proto as e:  # one message unreadable: say which
                why.append(f"TOP {int(k)} (UIDL {uidl.decode()}): {e}")
                out.append((uidl.decode(), "?"))
                continue
            found = MARKER.search(b"\r\n".join(head))
            out.append((uidl.decode(), found.group(1).decode() if found else "?"))
        p.quit()
        return out
    except (poplib.error_proto, OSError, ValueError) as e:
        why.append(f"{type(e).__name__}: {e}")
        with contextlib.suppress(OSError):
            p.close()
        return None


class Recorder:
    """Everything the clients saw, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acks: list[Ack] = []
        self.attempts: dict[int, int] = defaultdict(int)
        self.polls: list[Poll] = []
        self.reads: list[Read] = []
        self.phase = 0
        self.seq = 0

    def next_marker(self, run: str) -> tuple[str, int]:
        with self.lock:
            self.seq += 1
            self.attempts[self.phase] += 1
            return f"{run}-{self.seq}", self.phase
