"""IMAP servers for real-client tests, behind one face (:class:`Target`).

Each target runs as child processes on ``127.0.130.0/24``: the in-memory
``yimaporc.imap`` server, a Porcupine node, a 3-node Porcupine cluster (a
user's mail delivered over SMTP to every node in turn, so it is spread over
several), and Dovecot as the reference.  ``new_user()`` gives a fresh account
with the special-use mailboxes; ``seed()`` puts messages in a mailbox the way
that server receives mail.  Everything started is stopped by PID.
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import re
import shutil
import signal
import smtplib
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import attrs

from yimaporc.testing.procs import NodeProc, mail_node, mail_settled, wait_for

NET = "127.0.130"
SPECIAL = ("Sent", "Drafts", "Trash", "Junk", "Archive")
# The pool of accounts of the memory server and Dovecot (no admin API to add one).
MEMORY_USERS = 40


@attrs.define
class Target:
    """One IMAP server under test."""

    name: str
    host: str
    port: int
    _new_user: Callable[[], tuple[str, str]]
    _seed: Callable[[str, str, list[bytes]], None] | None = None
    _holders: Callable[[str], set[str]] | None = None
    other_host: str = ""

    @property
    def second_host(self) -> str:
        """Where a second session connects: another node of a cluster, else ``host``."""
        return self.other_host or self.host

    def holders(self, user: str) -> set[str]:
        """Which nodes store messages of ``user`` (one name for a single server)."""
        return {self.name} if self._holders is None else self._holders(user)

    def new_user(self) -> tuple[str, str]:
        """A fresh (login, password) with INBOX and the special-use mailboxes."""
        return self._new_user()

    def imap(self, user: str, password: str) -> imaplib.IMAP4:
        """A logged-in imaplib session."""
        m = imaplib.IMAP4(self.host, self.port, timeout=30)
        m.login(user, password)
        return m

    def seed(self, user: str, password: str, messages: list[bytes], box: str = "INBOX") -> None:
        """Deliver ``messages`` to ``box`` (SMTP for INBOX on Porcupine, else APPEND)."""
        if self._seed is not None and box == "INBOX":
            self._seed(user, password, messages)
            return
        m = self.imap(user, password)
        try:
            for raw in messages:
                typ, data = m.append(box, None, None, raw)
                assert typ == "OK", data
        finally:
            m.logout()


def message(subject: str, body: str = "text", to: str = "someone@example.org") -> bytes:
    """A small RFC 5322 message with a unique Message-ID."""
    mid = re.sub(r"[^A-Za-z0-9]", "", subject) + str(os.getpid())
    return (
        f"From: Sender <sender@example.net>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{mid}@example.net>\r\nDate: Sat, 05 Dec 2026 10:00:00 +0000\r\n"
        f"\r\n{body}\r\n"
    ).encode()


def _read_ready(proc: subprocess.Popen[str]) -> int:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("READY "), line
    return int(line.split()[1])


@contextlib.contextmanager
def memory_target(host: str = f"{NET}.1", tls: tuple[Path, Path] | None = None) -> Iterator[Target]:
    """``python -m yimaporc.testing.imap_memory`` with a pool of accounts (and STARTTLS
    with the PEM ``(cert, key)`` of ``tls``)."""
    users = [f"user{i}:pw{i}" for i in range(MEMORY_USERS)]
    opts = [f"--tls={tls[0]},{tls[1]}"] if tls else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "yimaporc.testing.imap_memory", host, "0", *opts, *users],
        stdout=subprocess.PIPE,
        text=True,
    )
    pool = iter(range(MEMORY_USERS))

    def new_user() -> tuple[str, str]:
        i = next(pool)
        return f"user{i}", f"pw{i}"

    try:
        yield Target("memory", host, _read_ready(proc), new_user)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


DOVECOT_CONF = """\
base_dir = {d}/run
state_dir = {d}/run/state
protocols = imap
listen = {host}
log_path = {d}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = 1
mail_location = maildir:{d}/mail/%u
passdb {{
  driver = passwd-file
  args = {d}/users
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={d}/mail/%u
}}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Sent {{
    special_use = \\Sent
    auto = subscribe
  }}
  mailbox Drafts {{
    special_use = \\Drafts
    auto = subscribe
  }}
  mailbox Trash {{
    special_use = \\Trash
    auto = subscribe
  }}
  mailbox Junk {{
    special_use = \\Junk
    auto = subscribe
  }}
  mailbox Archive {{
    special_use = \\Archive
    auto = subscribe
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
default_internal_user = {user}
default_login_user = {user}
"""


def dovecot_binary() -> str | None:
    """Dovecot's path, or None when not installed."""
    return shutil.which("dovecot") or shutil.which("dovecot", path="/usr/sbin:/usr/local/sbin")


@contextlib.contextmanager
def dovecot_target(host: str = f"{NET}.2", port: int = 10143) -> Iterator[Target]:
    """Dovecot (the reference) with its own config in a fresh directory under the temp
    dir (world-traversable: its auth and mail processes run unprivileged), users in a
    passwd-file; the directory is removed afterwards."""
    binary = dovecot_binary()
    assert binary is not None, "dovecot not installed (make install: dovecot-imapd)"
    import pwd

    tmp = Path(tempfile.mkdtemp(prefix="yimaporc-dovecot-"))
    tmp.chmod(0o755)

    me = pwd.getpwuid(os.getuid())
    user = "nobody" if os.getuid() == 0 else me.pw_name
    uid = 65534 if os.getuid() == 0 else os.getuid()
    gid = 65534 if os.getuid() == 0 else os.getgid()
    (tmp / "mail").mkdir(parents=True)
    if os.getuid() == 0:
        os.chown(tmp / "mail", uid, gid)
    users = tmp / "users"
    # A pool written up front: dovecot re-reads a passwd-file only when its mtime changes.
    users.write_text("".join(f"user{i}:{{PLAIN}}pw{i}\n" for i in range(MEMORY_USERS)))
    conf = tmp / "dovecot.conf"
    conf.write_text(DOVECOT_CONF.format(d=tmp, host=host, port=port, uid=uid, gid=gid, user=user))
    # dovecot daemonizes: no pipes, or its children hold them open.
    subprocess.run([binary, "-c", str(conf)], check=True, timeout=30,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    pool = iter(range(MEMORY_USERS))

    def new_user() -> tuple[str, str]:
        i = next(pool)
        return f"user{i}", f"pw{i}"

    def answers() -> bool:
        try:
            imaplib.IMAP4(host, port, timeout=5).logout()
            return True
        except OSError:
            return False

    try:
        wait_for(answers, 20, "dovecot to listen")
        yield Target("dovecot", host, port, new_user)
    finally:
        subprocess.run([binary, "-c", str(conf), "stop"], timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        pidfile = tmp / "run" / "master.pid"
        wait_for(lambda: not pidfile.exists(), 20, "dovecot to stop")
        shutil.rmtree(tmp, ignore_errors=True)


def _serves_imap(node: NodeProc) -> bool:
    return bool((node.status() or {}).get("services", {}).get("imap"))


def _adduser(node: NodeProc, secret: Path, address: str, password: str) -> None:
    cli = [sys.executable, "-m", "yimaporc.cli", "mail", "adduser", address,
           "--password", password, "--admin", node.admin_url, "--secret-file", str(secret)]  # fmt: skip
    subprocess.run(cli, check=True, capture_output=True, timeout=60)


PORTS = {"smtp": 2525, "imap": 1143, "cluster": 7946, "admin": 8080}


@contextlib.contextmanager
def porcupine_target(tmp: Path, count: int, net: str = NET) -> Iterator[Target]:
    """``count`` porcupine nodes on ``net``.(10*count+i) (``net`` 127.0.130 by default);
    clients talk to the last node, mail is delivered over SMTP to every node in turn."""
    tmp.mkdir(parents=True, exist_ok=True)
    secret = tmp / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    hosts = [f"{net}.{10 * count + i}" for i in range(1, count + 1)]
    nodes = [
        mail_node(tmp, f"p{i + 1}", h, PORTS, secret, [] if i == 0 else [f"{hosts[0]}:7946"])
        for i, h in enumerate(hosts)
    ]
    try:
        for n in nodes:
            n.start()
            wait_for(partial(_serves_imap, n), 30, f"{n.node_id} to serve IMAP")
        wait_for(lambda: mail_settled(nodes), 60, f"{count} mail nodes to settle")
        counter = iter(range(10_000))
        turn = iter(range(1_000_000))

        def new_user() -> tuple[str, str]:
            address = f"user{next(counter)}@example.org"
            _adduser(nodes[0], secret, address, "pw")
            return address, "pw"

        def seed(user: str, password: str, messages: list[bytes]) -> None:
            for raw in messages:
                host = hosts[next(turn) % count]
                with smtplib.SMTP(host, PORTS["smtp"], timeout=30) as s:
                    s.sendmail("sender@example.net", [user], raw)
            m = imaplib.IMAP4(hosts[-1], PORTS["imap"], timeout=30)
            m.login(user, password)
            try:

                def arrived() -> bool:
                    _typ, data = m.status("INBOX", "(MESSAGES)")
                    got = int(re.findall(rb"MESSAGES (\d+)", data[0] or b"")[0])  # type: ignore[arg-type]
                    return got >= len(messages)

                wait_for(arrived, 30, "seeded mail to arrive", interval=0.2)
            finally:
                m.logout()

        def holders(user: str) -> set[str]:
            # Read each node's fragment indexes (SQLite, read-only) for the user's rows.
            found = set()
            for n in nodes:
                for db in n.data_dir.glob("mail/buckets/*/index.sqlite"):
                    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:
                        row = c.execute("SELECT 1 FROM messages WHERE user = ? LIMIT 1", (user,))
                        if row.fetchone():
                            found.add(n.node_id)
            return found

        yield Target(
            f"porcupine{count}", hosts[-1], PORTS["imap"], new_user, seed, holders, hosts[0]
        )
    finally:
        for n in nodes:
            n.kill(signal.SIGTERM)
