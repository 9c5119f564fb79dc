"""fetchmail against a real porcupine node: keep mode by UIDL, delete mode, and STLS."""

from __future__ import annotations

import os
import poplib
import signal
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from yimaporc.testing.certs import make_cert
from yimaporc.testing.procs import NodeProc, mail_node, wait_for

NET = "127.0.115"
PORTS = {"cluster": 17946, "admin": 18080, "smtp": 2525, "pop3": 1110}
ALICE, PW = "alice@example.org", "pw-alice"


def start(tmp_path: Path, host: str, tls: bool) -> NodeProc:
    """A one-node porcupine cluster with alice, with or without a certificate."""
    secret = tmp_path / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    extra: list[str] = []
    if tls:
        cert, key = make_cert(tmp_path)
        extra = ["--tls-cert", str(cert), "--tls-key", str(key)]
    node = mail_node(tmp_path, "p1", host, PORTS, secret, [], extra)
    node.start()
    wait_for(lambda: (node.status() or {}).get("mail", {}).get("pop3"), 30, "pop3 listening")
    subprocess.run(
        [sys.executable, "-m", "yimaporc.cli", "mail", "adduser", ALICE, "--password", PW,
         "--admin", node.admin_url, "--secret-file", str(secret)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return node


@pytest.fixture
def plain_node(tmp_path: Path) -> Iterator[NodeProc]:
    """A node without a certificate (the demo's set-up)."""
    node = start(tmp_path, f"{NET}.1", tls=False)
    try:
        yield node
    finally:
        node.kill(signal.SIGTERM)


def send(host: str, *subjects: str) -> None:
    """Deliver one message per subject to alice through SMTP."""
    with smtplib.SMTP(host, PORTS["smtp"], timeout=10) as s:
        for subject in subjects:
            s.sendmail("x@y.org", [ALICE], f"Subject: {subject}\r\n\r\nbody\r\n".encode())


def fetchmail(tmp_path: Path, host: str, options: str, uidl: bool = True) -> tuple[int, list[str]]:
    """Run fetchmail once with an rc file (its manual's syntax); exit code and the
    subjects its MDA received so far.  ``uidl=False``: fetchmail's default poll line."""
    mbox = tmp_path / "mbox"
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f"set no syslog\npoll {host} protocol pop3 port {PORTS['pop3']}{' uidl' if uidl else ''}\n"
        f'  user "{ALICE}" there with password "{PW}" is "root" here\n'
        f"  {options}\n  mda \"/bin/sh -c 'cat >> {mbox}'\"\n"
    )
    rc.chmod(0o600)
    done = subprocess.run(
        ["fetchmail", "-f", str(rc), "--nodetach", "--silent"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stdout + done.stderr  # 1: no new mail
    text = mbox.read_text() if mbox.exists() else ""
    return done.returncode, [line[9:] for line in text.splitlines() if line.startswith("Subject: ")]


def stat(host: str) -> tuple[int, int]:
    """POP3 STAT for alice."""
    p = poplib.POP3(host, PORTS["pop3"], timeout=10)
    p.user(ALICE)
    p.pass_(PW)
    got = p.stat()
    p.quit()
    return got


def test_keep_mode_fetches_each_message_once_by_uidl_then_delete_mode_empties(
    tmp_path: Path, plain_node: NodeProc
) -> None:
    """fetchmail --keep with UIDL: a second run fetches nothing, a new message alone;
    without keep it fetches the rest and deletes everything on the server. (No
    certificate here: fetchmail is told, as its manual says, not to want TLS.)"""
    host = plain_node.host
    send(host, "one", "two", "three")
    code, got = fetchmail(tmp_path, host, "sslproto '' keep")
    assert code == 0 and got == ["one", "two", "three"]
    code, got = fetchmail(tmp_path, host, "sslproto '' keep")
    assert code == 1 and got == ["one", "two", "three"]
    send(host, "four")
    code, got = fetchmail(tmp_path, host, "sslproto '' keep")
    assert code == 0 and got == ["one", "two", "three", "four"]
    assert stat(host)[0] == 4
    code, got = fetchmail(tmp_path, host, "sslproto '' fetchall nokeep")
    assert code == 0 and stat(host) == (0, 0)


def test_stls_with_a_certificate(tmp_path: Path) -> None:
    """With a certificate the node refuses USER before STLS; fetchmail upgrades with STLS."""
    node = start(tmp_path, f"{NET}.2", tls=True)
    try:
        p = poplib.POP3(node.host, PORTS["pop3"], timeout=10)
        assert "STLS" in p.capa() and "USER" not in p.capa()
        with pytest.raises(poplib.error_proto, match="Plaintext login disabled"):
            p.user(ALICE)
        p.quit()
        send(node.host, "secret")
        code, got = fetchmail(tmp_path, node.host, "sslproto tls1.2+ no sslcertck keep")
        assert code == 0 and got == ["secret"]
    finally:
        node.kill(signal.SIGTERM)


def test_keep_mode_with_fetchmail_defaults_fetches_each_message_once(tmp_path: Path) -> None:
    """fetchmail --keep with its default poll line (no ``uidl``) asks LAST first: the node
    refuses it, so fetchmail tracks messages by UIDL and a second poll fetches nothing
    (LAST's "+OK 0" made every poll fetch every kept message again)."""
    node = start(tmp_path, "127.0.183.21", tls=False)
    try:
        send(node.host, "one", "two")
        code, got = fetchmail(tmp_path, node.host, "sslproto '' keep", uidl=False)
        assert code == 0 and got == ["one", "two"]
        code, got = fetchmail(tmp_path, node.host, "sslproto '' keep", uidl=False)
        assert code == 1 and got == ["one", "two"]
        send(node.host, "three")
        code, got = fetchmail(tmp_path, node.host, "sslproto '' keep", uidl=False)
        assert code == 0 and got == ["one", "two", "three"]
        assert stat(node.host)[0] == 3
    finally:
        node.kill(signal.SIGTERM)
