"""Sending mail out from a real porcupine node: submission on 587 and 465, the outbound
queue to a remote MX (aiosmtpd), retries across a remote outage and a node restart,
bounces, and what the MX listener refuses."""

from __future__ import annotations

import email
import imaplib
import os
import signal
import smtplib
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from yimaporc.testing.certs import client_context, make_cert
from yimaporc.testing.procs import NodeProc, mail_node, wait_for

NET = "127.0.111"
HOST = f"{NET}.1"
REMOTE = (f"{NET}.9", 2525)
PORTS = {"cluster": 17946, "admin": 18080, "smtp": 2525, "imap": 1143}
SUBMISSION, SUBMISSIONS = 2587, 2465
ALICE, PW = "alice@example.org", "pw-alice"


class Sink:
    """aiosmtpd handler: refuses ``nobody@...`` with 550, keeps the rest."""

    def __init__(self) -> None:
        self.got: list[tuple[str, list[str], bytes]] = []
        self.arrived = threading.Event()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:  # fmt: skip
        if address.startswith("nobody@"):
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.got.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        self.arrived.set()
        return "250 2.0.0 queued"


@pytest.fixture
def remote() -> Iterator[tuple[Controller, Sink]]:
    """The remote MX, not yet started (tests start it when they want it up)."""
    sink = Sink()
    controller = Controller(sink, hostname=REMOTE[0], port=REMOTE[1])
    try:
        yield controller, sink
    finally:
        if getattr(controller, "_thread", None) is not None:
            controller.stop()


def start_node(tmp_path: Path) -> NodeProc:
    """A porcupine node with MX, submission (STARTTLS) and submissions (implicit TLS)."""
    cert, key = make_cert(tmp_path)
    secret = tmp_path / "cluster.secret"
    if not secret.exists():
        secret.write_text(os.urandom(16).hex())
    extra = [
        "--tls-cert", str(cert), "--tls-key", str(key),
        "--submission", f"tcp:{SUBMISSION}:interface={HOST}",
        "--submissions", f"tcp:{SUBMISSIONS}:interface={HOST}",
        "--transport", f"remote.test={REMOTE[0]}:{REMOTE[1]}",
        "--queue-retry", "1",
    ]  # fmt: skip
    node = mail_node(tmp_path, "p1", HOST, PORTS, secret, [], extra)
    node.start()
    wait_for(lambda: (node.status() or {}).get("mail", {}).get("submissions"), 30, "listeners")
    return node


def cli(node: NodeProc, *args: str) -> str:
    """The yimaporc CLI against ``node``; stdout."""
    argv = [sys.executable, "-m", "yimaporc.cli", *args, "--admin", node.admin_url,
            "--secret-file", str(node.secret_file)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProc]:
    """The node, with alice."""
    n = start_node(tmp_path)
    try:
        cli(n, "mail", "adduser", ALICE, "--password", PW)
        yield n
    finally:
        n.kill(signal.SIGTERM)


def queue_length(node: NodeProc) -> int | None:
    """Messages in the node's outbound queue (from /api/status)."""
    status = node.status()
    return None if status is None else status["outbound"]["length"]


def message(to: str, subject: str) -> bytes:
    """A small message from alice."""
    return f"From: {ALICE}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nhello {to}\r\n".encode()


def test_submission_587_and_465_send_out_and_the_mx_listener_never_relays(
    node: NodeProc, remote: tuple[Controller, Sink]
) -> None:
    """587: AUTH required before MAIL, only alice's own address; 465: implicit TLS, AUTH at
    once; both reach the remote MX; port 25 style refuses relaying even after AUTH."""
    controller, sink = remote
    controller.start()
    with smtplib.SMTP(HOST, SUBMISSION, timeout=10) as s:
        s.ehlo()
        assert s.has_extn("starttls")
        assert s.docmd("MAIL", f"FROM:<{ALICE}>")[0] in (530, 538)
        s.starttls(context=client_context())
        s.ehlo()
        assert s.docmd("MAIL", f"FROM:<{ALICE}>")[0] == 530  # still no AUTH
        s.login(ALICE, PW)
        assert s.docmd("MAIL", "FROM:<mallory@example.org>")[0] == 553
        s.rset()
        assert s.sendmail(ALICE, ["bob@remote.test"], message("bob@remote.test", "via 587")) == {}
    with smtplib.SMTP_SSL(HOST, SUBMISSIONS, timeout=10, context=client_context()) as s:
        s.ehlo()
        assert "auth" in s.esmtp_features and not s.has_extn("starttls")
        s.login(ALICE, PW)
        assert (
            s.sendmail(ALICE, ["carol@remote.test"], message("carol@remote.test", "via 465")) == {}
        )
    with smtplib.SMTP(HOST, PORTS["smtp"], timeout=10) as s:
        s.starttls(context=client_context())
        s.login(ALICE, PW)
        s.mail(ALICE)
        assert s.rcpt("dave@remote.test")[0] == 550  # the MX listener never relays
    wait_for(lambda: len(sink.got) == 2, 30, "both messages at the remote MX")
    subjects = sorted(email.message_from_bytes(c)["Subject"] for _, _, c in sink.got)
    assert subjects == ["via 465", "via 587"]
    assert all(f == ALICE for f, _, _ in sink.got)
    wait_for(lambda: queue_length(node) == 0, 10, "an empty queue")


def test_swaks_submits_with_starttls_and_auth(
    node: NodeProc, remote: tuple[Controller, Sink]
) -> None:
    """swaks (default settings plus TLS and AUTH, as users run it) sends through 587."""
    controller, sink = remote
    controller.start()
    done = subprocess.run(
        ["swaks", "--server", f"{HOST}:{SUBMISSION}", "--tls", "--auth", "PLAIN",
         "--auth-user", ALICE, "--auth-password", PW, "--from", ALICE,
         "--to", "erin@remote.test", "--header", "Subject: from swaks"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    wait_for(lambda: sink.got, 30, "the message at the remote MX")
    assert sink.got[0][1] == ["erin@remote.test"]


@pytest.mark.parametrize("port", [SUBMISSION, SUBMISSIONS])
def test_msmtp_sends_through_587_and_465(
    tmp_path: Path, node: NodeProc, remote: tuple[Controller, Sink], port: int
) -> None:
    """msmtp, configured as its manual says for STARTTLS (587) and TLS (465), sends out."""
    controller, sink = remote
    controller.start()
    config = tmp_path / "msmtprc"
    config.write_text(
        f"account default\nhost {HOST}\nport {port}\nauth on\nuser {ALICE}\n"
        f"password {PW}\nfrom {ALICE}\ntls on\n"
        f"tls_starttls {'on' if port == SUBMISSION else 'off'}\ntls_certcheck off\n"
    )
    config.chmod(0o600)
    done = subprocess.run(
        ["msmtp", "-C", str(config), "frank@remote.test"],
        input=message("frank@remote.test", f"msmtp {port}"),
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    wait_for(lambda: sink.got, 30, "the message at the remote MX")
    assert email.message_from_bytes(sink.got[0][2])["Subject"] == f"msmtp {port}"


def test_mutt_sends_through_587(
    tmp_path: Path, node: NodeProc, remote: tuple[Controller, Sink]
) -> None:
    """mutt in batch mode with smtp_url on 587 (STARTTLS, AUTH) sends out."""
    controller, sink = remote
    controller.start()
    cert = tmp_path / "cert.pem"  # the node's self-signed certificate, trusted by mutt
    muttrc = tmp_path / "muttrc"
    muttrc.write_text(
        f'set from="{ALICE}"\nset smtp_url="smtp://{ALICE}@{HOST}:{SUBMISSION}/"\n'
        f'set smtp_pass="{PW}"\nset ssl_starttls=yes\nset ssl_force_tls=yes\n'
        f'set certificate_file="{cert}"\nset ssl_verify_host=no\nset ssl_verify_dates=no\n'
        f'set record=""\nset postpone=no\n'
    )
    done = subprocess.run(
        ["mutt", "-n", "-F", str(muttrc), "-s", "from mutt", "gina@remote.test"],
        input=b"hello from mutt\n", capture_output=True, timeout=60,
        env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    wait_for(lambda: sink.got, 30, "the message at the remote MX")
    got = email.message_from_bytes(sink.got[0][2])
    assert got["Subject"] == "from mutt" and sink.got[0][1] == ["gina@remote.test"]


def test_remote_down_then_node_killed_then_delivered_and_550_bounces(
    tmp_path: Path, node: NodeProc, remote: tuple[Controller, Sink]
) -> None:
    """The remote MX is down: the message waits, retried; the node is SIGKILLed and
    restarted; the remote comes up: delivered once. A 550 comes back as a bounce."""
    controller, sink = remote
    with smtplib.SMTP(HOST, SUBMISSION, timeout=10) as s:
        s.starttls(context=client_context())
        s.login(ALICE, PW)
        s.sendmail(ALICE, ["bob@remote.test", "nobody@remote.test"], message("bob", "outage"))

    def retried() -> bool:
        out = cli(node, "mail", "queue")
        return "attempts=" in out and "attempts=0" not in out and "1 queued" in out

    wait_for(retried, 30, "a failed attempt in the queue")
    assert "no answer from any host" in cli(node, "mail", "queue")
    node.kill(signal.SIGKILL)
    node.start()
    wait_for(lambda: queue_length(node) == 1, 30, "the queue back after the restart")
    controller.start()
    wait_for(lambda: queue_length(node) == 0, 30, "delivery after the outage")
    assert [r for _, r, _ in sink.got] == [["bob@remote.test"]]
    # nobody@ was refused with 550: alice gets a delivery status notification.
    imap = imaplib.IMAP4(HOST, PORTS["imap"], timeout=10)
    imap.starttls(ssl_context=client_context())
    imap.login(ALICE, PW)

    def bounce() -> bytes | None:
        imap.select("INBOX")
        _, data = imap.search(None, "ALL")
        ids = data[0].split()
        if not ids:
            return None
        _, got = imap.fetch(ids[-1], "(RFC822)")
        return got[0][1]  # type: ignore[index]

    dsn = wait_for(bounce, 30, "the bounce in alice's INBOX")
    msg = email.message_from_bytes(dsn)
    assert msg.get_content_type() == "multipart/report"
    assert b"Final-Recipient: rfc822; nobody@remote.test" in dsn and b"Status: 5.1.1" in dsn
    imap.logout()
