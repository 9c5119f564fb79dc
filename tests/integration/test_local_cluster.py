"""`yimaporc local-cluster`: starts the nodes, prints lines as they come true, stops all."""

from __future__ import annotations

import signal
import smtplib
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from yimaporc.testing.certs import client_context
from yimaporc.testing.procs import wait_for


class _Sink:
    """aiosmtpd handler: the outside domain's MX; keeps the recipients it got."""

    def __init__(self) -> None:
        self.got: list[str] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.got += list(envelope.rcpt_tos)
        return "250 2.0.0 ok"


def _connectable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def test_local_cluster_ready_then_stops_everything(tmp_path: Path) -> None:
    """The command prints admin lines then 'ready'; the demo user sends to an outside
    domain through 587 (STARTTLS) and 465 (TLS) of any mail node; SIGTERM stops every node."""
    sink = _Sink()
    remote = Controller(sink, hostname="127.0.1.250", port=2525)
    remote.start()
    cmd = [sys.executable, "-m", "yimaporc.cli", "local-cluster",
           "--porcupine", "2", "--yima", "1", "--base-dir", str(tmp_path),
           "--transport", "outside.test=127.0.1.250:2525"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: "ready" in lines or proc.poll() is not None, 90, "ready")
        assert "ready" in lines, (lines, proc.stderr.read() if proc.stderr else "")
        assert "admin http://127.0.1.1:8080" in lines
        assert "admin http://127.0.2.1:8080" in lines
        assert lines[-1] == "ready"
        assert _connectable("127.0.1.2", 8080)
        with smtplib.SMTP("127.0.1.2", 1587, timeout=10) as s:
            s.starttls(context=client_context())
            s.login("demo@example.org", "demo")
            s.sendmail("demo@example.org", ["pen@outside.test"], b"Subject: via 587\r\n\r\nx\r\n")
        with smtplib.SMTP_SSL("127.0.1.1", 1465, timeout=10, context=client_context()) as s:
            s.login("demo@example.org", "demo")
            s.sendmail("demo@example.org", ["pal@outside.test"], b"Subject: via 465\r\n\r\nx\r\n")
        wait_for(lambda: len(sink.got) == 2, 30, "both messages at the outside MX")
        assert sorted(sink.got) == ["pal@outside.test", "pen@outside.test"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        remote.stop()
    assert proc.returncode == 0
    for host in ("127.0.1.1", "127.0.1.2", "127.0.2.1"):
        assert not _connectable(host, 8080), f"{host} still serving after stop"
