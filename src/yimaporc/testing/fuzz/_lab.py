"""The fuzzing lab: real ``twistd`` nodes on 127.0.107.x, their users and media.

Mail doors (SMTP, POP3, IMAP), the admin API and the cluster port are fuzzed on
``m1``, a porcupine node with a peer ``m2`` (so a view change is visible); RTSP on
``y1``, a yima node holding a short clip.  Fuzzing connections come from
127.0.107.100-249, one source address per in-flight slot, so a traceback's log
prefix names the slot that caused it.
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

import attrs

from ...admin.client import AdminClient
from ...secret import admin_token, cluster_key
from ..procs import NodeProc, mail_node, mail_settled, wait_for
from ._seeds import MEDIA, PASSWORD, SCOPE, SINK, USER

NET = "127.0.107"
MAIL_DOORS = ("smtp", "pop3", "imap", "admin", "cluster-udp", "cluster-amp")
YIMA_DOORS = ("rtsp",)
DOORS = MAIL_DOORS + YIMA_DOORS
PORTS = {"smtp": 2525, "pop3": 1110, "imap": 1143, "rtsp": 8554, "admin": 8080, "cluster": 7946}
FIRST_SOURCE, SOURCES = 100, 150


def source_address(slot: int) -> str:
    """The local address fuzzing slot ``slot`` connects from."""
    return f"{NET}.{FIRST_SOURCE + slot % SOURCES}"


def slot_of(address: str) -> int | None:
    """The slot that uses source ``address``, if it is one."""
    prefix, _, last = address.rpartition(".")
    if prefix != NET or not last.isdigit():
        return None
    n = int(last) - FIRST_SOURCE
    return n if 0 <= n < SOURCES else None


def _accepts(host: str, *recipients: str) -> bool:
    """The SMTP door answers 250 to RCPT for every one of ``recipients``."""
    try:
        with smtplib.SMTP(host, PORTS["smtp"], timeout=5) as s:
            s.ehlo()
            s.mail("probe@example.net")
            return all(s.rcpt(r)[0] == 250 for r in recipients)
    except (OSError, smtplib.SMTPException):
        return False


@attrs.define
class Lab:
    """Nodes started on demand under ``base``; :meth:`stop` stops all of them by PID."""

    base: Path
    nodes: dict[str, NodeProc] = attrs.field(factory=dict)
    secret: bytes = b""

    @property
    def secret_file(self) -> Path:
        """The secret of the mail nodes (the yima node has its own)."""
        return self.base / "cluster.secret"

    def token(self) -> str:
        """The admin bearer token."""
        return admin_token(self.secret)

    def rpc_key(self) -> bytes:
        """The cluster RPC key (the AMP handshake proves it)."""
        return cluster_key(self.secret, "rpc", SCOPE.cluster, SCOPE.kind)

    def membership_key(self) -> bytes:
        """The membership datagram key."""
        return cluster_key(self.secret, "membership", SCOPE.cluster, SCOPE.kind)

    def node_for(self, door: str) -> NodeProc:
        """The node whose ``door`` is fuzzed."""
        return self.nodes["y1" if door in YIMA_DOORS else "m1"]

    def address(self, door: str) -> tuple[str, int]:
        """``(host, port)`` of ``door``."""
        node = self.node_for(door)
        key = "cluster" if door.startswith("cluster") else door
        return node.host, PORTS[key]

    def start(self, doors: set[str]) -> None:
        """Start the nodes the ``doors`` need and wait until they serve."""
        self.base.mkdir(parents=True, exist_ok=True)
        if not self.secret_file.exists():
            self.secret_file.write_text(os.urandom(16).hex())
        self.secret = self.secret_file.read_bytes().strip()
        if doors & set(MAIL_DOORS) and "m1" not in self.nodes:
            self._start_mail()
        if doors & set(YIMA_DOORS) and "y1" not in self.nodes:
            self._start_yima()

    def _start_mail(self) -> None:
        ports = {k: PORTS[k] for k in ("smtp", "pop3", "imap", "admin", "cluster")}
        m1 = mail_node(self.base, "m1", f"{NET}.1", ports, self.secret_file, [])
        m2 = mail_node(
            self.base, "m2", f"{NET}.2", {"admin": 8080, "cluster": 7946}, self.secret_file,
            [f"{NET}.1:7946"],
        )  # fmt: skip
        for n in (m1, m2):
            self.nodes[n.node_id] = n
            n.start()
        wait_for(lambda: mail_settled([m1, m2]), 60, "the two mail nodes to settle")
        client = AdminClient(m1.admin_url, self.token(), timeout=60)
        for address in (USER, SINK):
            client.post("/api/mail/users", {"address": address, "password": PASSWORD})
        wait_for(lambda: (m1.status() or {}).get("users") == 2, 30, "users to be known")
        wait_for(lambda: _accepts(m1.host, USER, SINK), 30, "SMTP to accept both users")

    def _start_yima(self) -> None:
        from ...yima.media.sample import make_sample_ts

        # its own secret: the mail and media clusters must never be able to merge (issue 13 item 0)
        secret = self.base / "yima.secret"
        secret.write_text(os.urandom(16).hex())
        y1 = NodeProc(
            "yima", "y1", f"{NET}.11", self.base / "y1" / "data", PORTS["cluster"], PORTS["admin"],
            extra=["--rtsp", f"tcp:{PORTS['rtsp']}:interface={NET}.11"], secret_file=secret,
        )  # fmt: skip
        self.nodes["y1"] = y1
        y1.start()
        wait_for(lambda: (y1.status() or {}).get("disks"), 30, "the yima node's disk")
        clip = make_sample_ts(self.base / "clip.ts", 2)
        subprocess.run(
            [sys.executable, "-m", "yimaporc.cli", "media", "ingest", str(clip), "--name", MEDIA,
             "--admin", y1.admin_url, "--secret-file", str(secret)],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip

    def stop(self) -> None:
        """SIGTERM every node (by PID) and reap it."""
        for n in self.nodes.values():
            n.kill(signal.SIGTERM)
