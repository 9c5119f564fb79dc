"""Real clients against an in-process MailService on loopback: SMTP in, POP3/IMAP out."""

from __future__ import annotations

import imaplib
import poplib
import re
import shutil
import smtplib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from yimaporc.admin.routes import ApiError
from yimaporc.porcupine.testing import RunningMail, in_reactor

ALICE, BOB, PW = "alice@example.org", "bob@example.org", "pw-alice"


def message(n: int, subject: str = "hello") -> bytes:
    return (
        f"From: carol@elsewhere.net\r\nTo: {ALICE}\r\nSubject: {subject} {n}\r\n"
        f"Message-ID: <m{n}@elsewhere.net>\r\n\r\nline one\r\n.starts with a dot\r\n"
        "\xe9t\xe9 8bit\r\n"
    ).encode()


@pytest.fixture
def mail(tmp_path: Path) -> Iterator[RunningMail]:
    """A started service with alice and bob."""
    m = RunningMail(tmp_path / "data")
    m.add_user(ALICE, PW)
    m.add_user(BOB, "pw-bob")
    yield m
    m.stop()


def send(
    m: RunningMail, rcpts: list[str], body: bytes, sender: str = "carol@elsewhere.net"
) -> dict:
    with smtplib.SMTP("127.0.0.1", m.port("smtp"), timeout=10) as s:
        return s.sendmail(sender, rcpts, body)


def pop_all(m: RunningMail, user: str, password: str) -> list[bytes]:
    p = poplib.POP3("127.0.0.1", m.port("pop3"), timeout=10)
    try:
        p.user(user)
        p.pass_(password)
        count, _ = p.stat()
        return [b"\r\n".join(p.retr(i + 1)[1]) + b"\r\n" for i in range(count)]
    finally:
        p.quit()


def imap(m: RunningMail, user: str = ALICE, password: str = PW) -> imaplib.IMAP4:
    i = imaplib.IMAP4("127.0.0.1", m.port("imap"), timeout=10)
    i.login(user, password)
    return i


def test_smtp_to_pop3_and_imap_byte_identical(mail: RunningMail) -> None:
    """A message sent with smtplib is read back byte for byte by POP3 and IMAP."""
    body = message(1)
    assert send(mail, [ALICE], body) == {}
    [popped] = pop_all(mail, "alice", PW)
    assert popped.startswith(b"Return-Path: <carol@elsewhere.net>\r\nReceived: from ")
    assert popped.endswith(body)
    i = imap(mail)
    i.select("INBOX")
    typ, data = i.fetch("1", "(BODY.PEEK[] RFC822.SIZE)")
    assert typ == "OK" and data[0][1] == popped
    assert b"RFC822.SIZE %d" % len(popped) in data[0][0] + data[1]
    i.logout()


def test_several_recipients_one_unknown(mail: RunningMail) -> None:
    """Known recipients get the message; the unknown one is refused with 550."""
    refused = send(mail, [ALICE, "ghost@example.org", BOB], message(2))
    assert refused == {"ghost@example.org": (550, b"5.1.1 No such user here")}
    assert pop_all(mail, ALICE, PW)[0].endswith(message(2))
    assert pop_all(mail, BOB, "pw-bob")[0].endswith(message(2))


def test_flags_seen_by_next_session(mail: RunningMail) -> None:
    """Flags stored in one IMAP session are there in the next; non-PEEK fetch sets \\Seen."""
    send(mail, [ALICE], message(3))
    send(mail, [ALICE], message(4))
    i = imap(mail)
    i.select("INBOX")
    i.store("1", "+FLAGS", "(\\Flagged \\Answered)")
    i.fetch("2", "(BODY[])")
    i.logout()
    i = imap(mail)
    i.select("INBOX", readonly=True)
    _, data = i.fetch("1:2", "(UID FLAGS)")
    assert b"\\Flagged" in data[0] and b"\\Answered" in data[0] and b"\\Seen" not in data[0]
    assert b"\\Seen" in data[1]
    assert i.search(None, "UNSEEN") == ("OK", [b"1"])
    assert i.search(None, "SUBJECT", '"hello 4"') == ("OK", [b"2"])
    i.logout()


def test_pop3_dele_is_applied_at_quit(mail: RunningMail) -> None:
    """POP3 DELE + QUIT removes the message; IMAP no longer sees it; UIDL is stable."""
    send(mail, [ALICE], message(5))
    send(mail, [ALICE], message(6))
    p = poplib.POP3("127.0.0.1", mail.port("pop3"), timeout=10)
    p.user(ALICE)
    p.pass_(PW)
    uidls = p.uidl()[1]
    p.dele(1)
    p.rset()
    p.dele(1)
    top = p.top(2, 0)[1]
    assert b"Subject: hello 6" in top and top[-1] == b"" and b"line one" not in top
    p.quit()
    p = poplib.POP3("127.0.0.1", mail.port("pop3"), timeout=10)
    p.user(ALICE)
    p.pass_(PW)
    assert p.uidl()[1] == [b"1 " + uidls[1].split()[1]]
    p.quit()
    i = imap(mail)
    assert i.select("INBOX") == ("OK", [b"1"])
    i.logout()


def test_uidvalidity_and_uids_survive_restart(tmp_path: Path) -> None:
    """After a restart on the same data dir: same UIDVALIDITY, UIDs keep ascending."""
    m = RunningMail(tmp_path / "d")
    m.add_user(ALICE, PW)
    send(m, [ALICE], message(7))
    i = imap(m)
    i.select("INBOX")
    before = i.response("UIDVALIDITY")[1]
    i.logout()
    m.stop()
    m = RunningMail(tmp_path / "d")
    try:
        send(m, [ALICE], message(8))
        i = imap(m)
        i.select("INBOX")
        assert i.response("UIDVALIDITY")[1] == before
        assert i.uid("SEARCH", "ALL") == ("OK", [b"1 2"])
        i.logout()
    finally:
        m.stop()


def test_imap_mailbox_management_and_append(mail: RunningMail) -> None:
    """CREATE/LIST/LSUB/RENAME/DELETE, APPEND byte-identical, COPY, EXPUNGE, STATUS."""
    i = imap(mail)
    assert i.create("Work/2026")[0] == "OK"
    assert i.create("Work")[0] == "NO"
    raw = b"Subject: appended\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n"
    assert i.append("Work/2026", "(\\Seen)", '"01-Jan-2024 00:00:00 +0000"', raw)[0] == "OK"
    i.select("Work/2026")
    assert i.fetch("1", "(BODY.PEEK[] INTERNALDATE)")[1][0][1] == raw
    date = i.fetch("1", "(INTERNALDATE)")[1][0]
    assert re.search(rb'INTERNALDATE "( 1|01)-Jan-2024 00:00:00 \+0000"', date), date
    assert i.copy("1", "INBOX")[0] == "OK"
    assert i.rename("Work", "Old")[0] == "OK"
    special = {b'"Sent"', b'"Drafts"', b'"Trash"', b'"Junk"', b'"Archive"'}  # made at login
    names = [line.split(b'"/" ')[1] for line in i.list()[1]]
    assert special <= set(names)
    assert [n for n in names if n not in special] == [b'"INBOX"', b'"Old"', b'"Old/2026"']
    assert i.unsubscribe("Old")[0] == "OK"
    subscribed = [line.split(b'"/" ')[1] for line in i.lsub()[1]]
    assert [n for n in subscribed if n not in special] == [b'"INBOX"', b'"Old/2026"']
    assert i.delete("Old")[0] == "NO"  # has children
    assert i.delete("Old/2026")[0] == "OK"
    _, data = i.status("INBOX", "(MESSAGES UIDNEXT UNSEEN)")
    assert data == [b'"INBOX" (MESSAGES 1 UIDNEXT 2 UNSEEN 0)'] or b"MESSAGES 1" in data[0]
    i.select("INBOX")
    i.store("1", "+FLAGS", "(\\Deleted)")
    assert i.expunge() == ("OK", [b"1"])
    i.logout()


def test_imap_partial_and_header_sections(mail: RunningMail) -> None:
    """BODY[]<n.m> returns exactly those octets; HEADER keeps duplicates and order."""
    raw = b"Received: a\r\nReceived: b\r\nSubject: s\r\n\r\n0123456789\r\n"
    i = imap(mail)
    i.append("INBOX", None, None, raw)
    i.select("INBOX")
    data = i.fetch("1", "(BODY.PEEK[]<3.5> BODY.PEEK[HEADER] BODY.PEEK[TEXT])")[1]
    # a short string may come quoted or as a literal (both RFC 3501)
    text = flat(data)
    assert re.search(rb'BODY\[\]<3> (\{5\}\r\n|")' + re.escape(raw[3:8]), text), text
    assert b"Received: a\r\nReceived: b\r\nSubject: s\r\n\r\n" in text
    assert b"0123456789\r\n" in text
    i.logout()


def flat(data: list[Any]) -> bytes:
    """An imaplib FETCH answer as one text, literals as ``{n}`` CRLF octets."""
    out = b""
    for item in data:
        if isinstance(item, tuple):
            out += item[0] + b"\r\n" + item[1]
        elif item is not None:
            out += item
    return out


def test_multipart_bodystructure_and_parts(mail: RunningMail) -> None:
    """BODYSTRUCTURE sees both parts of a multipart message; BODY[2] is the second part."""
    raw = (
        b'Subject: mp\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="XX"\r\n\r\n'
        b"preamble\r\n--XX\r\nContent-Type: text/plain\r\n\r\nfirst\r\n--XX\r\n"
        b"Content-Type: text/html\r\n\r\n<b>second</b>\r\n--XX--\r\n"
    )
    i = imap(mail)
    i.append("INBOX", None, None, raw)
    i.select("INBOX")
    data = i.fetch("1", "(BODYSTRUCTURE BODY.PEEK[2] BODY.PEEK[1.MIME])")[1]
    assert b'"plain"' in data[0][0] and b'"html"' in data[0][0] and b'"mixed"' in data[0][0]
    text = flat(data)
    assert re.search(rb'BODY\[2\] (\{13\}\r\n|")<b>second</b>', text), text
    assert re.search(rb"BODY\[1.MIME\] \{\d+\}\r\nContent-Type: text/plain\r\n\r\n", text), text
    i.logout()


def test_idle_sees_new_mail(mail: RunningMail) -> None:
    """A session in IDLE gets an untagged EXISTS when mail arrives."""
    s = socket.create_connection(("127.0.0.1", mail.port("imap")), timeout=10)
    f = s.makefile("rwb")
    f.readline()
    for line in (b"a LOGIN alice pw-alice\r\n", b"b SELECT INBOX\r\n"):
        f.write(line)
        f.flush()
        while not f.readline().startswith(line[:2]):
            pass
    f.write(b"c IDLE\r\n")
    f.flush()
    assert f.readline().startswith(b"+")
    send(mail, [ALICE], message(9))
    assert f.readline() == b"* 1 EXISTS\r\n"
    f.write(b"DONE\r\n")
    f.flush()
    assert f.readline().startswith(b"c OK")
    s.close()


def test_imap_authenticate_plain(mail: RunningMail) -> None:
    """AUTHENTICATE PLAIN logs in; a wrong password gets NO."""
    i = imaplib.IMAP4("127.0.0.1", mail.port("imap"), timeout=10)
    assert i.authenticate("PLAIN", lambda _: f"\0{ALICE}\0{PW}".encode())[0] == "OK"
    i.logout()
    i = imaplib.IMAP4("127.0.0.1", mail.port("imap"), timeout=10)
    with pytest.raises(imaplib.IMAP4.error):
        i.authenticate("PLAIN", lambda _: f"\0{ALICE}\0wrong".encode())
    i.logout()


def test_admin_routes(mail: RunningMail) -> None:
    """adduser 409 twice, passwd changes logins, list, deluser drops the mail."""
    with pytest.raises(ApiError) as e:
        mail.add_user(ALICE, "x")
    assert e.value.status == 409
    users = mail.route("GET", "/api/mail/users")["users"]
    assert [u["address"] for u in users] == [ALICE, BOB]
    assert mail.service.status()["users"] == 2
    mail.route("POST", "/api/mail/users/passwd", {"address": ALICE, "password": "new"})
    with pytest.raises(poplib.error_proto):
        pop_all(mail, ALICE, PW)
    assert pop_all(mail, ALICE, "new") == []
    send(mail, [BOB], message(10))
    mail.route("POST", "/api/mail/users/delete", {"address": BOB})
    assert not mail.service.fragment_store.user_path(BOB).exists()
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(mail, [BOB], message(11))
    for bad in ({"address": "x@other.org", "password": "p"}, {"address": "bad", "password": "p"}):
        with pytest.raises(ApiError):
            mail.route("POST", "/api/mail/users", bad)
    with pytest.raises(ApiError) as e:
        mail.route("POST", "/api/mail/users/delete", {"address": "nobody@example.org"})
    assert e.value.status == 404


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_delivers_and_curl_reads(mail: RunningMail) -> None:
    """swaks delivers (pipelined); curl reads it back over imap:// and pop3:// byte for byte."""
    out = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{mail.port('smtp')}", "--to", ALICE,
         "--from", "dave@elsewhere.net", "--pipeline", "--header", "Subject: via swaks",
         "--body", "swaks body"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "250 2.0.0 Ok: stored" in out.stdout
    [popped] = pop_all(mail, ALICE, PW)
    assert b"Subject: via swaks" in popped
    user = f"{ALICE}:{PW}"
    via_pop = subprocess.run(
        ["curl", "-s", "--max-time", "10", "-u", user, f"pop3://127.0.0.1:{mail.port('pop3')}/1"],
        capture_output=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    via_imap = subprocess.run(
        ["curl", "-s", "--max-time", "10", "-u", user,
         f"imap://127.0.0.1:{mail.port('imap')}/INBOX;UID=1"],
        capture_output=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert via_pop == popped and via_imap == popped


def test_status_reports_endpoints(mail: RunningMail) -> None:
    """status() has the user count and where each protocol listens."""
    st = in_reactor(lambda: mail.service.status())
    assert st["users"] == 2 and set(st["mail"]) == {"smtp", "pop3", "imap"}
