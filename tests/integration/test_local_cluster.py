"""`yimaporc local-cluster`: starts the nodes, prints lines as they come true, stops all."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from yimaporc.testing.procs import wait_for


def _connectable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def test_local_cluster_ready_then_stops_everything(tmp_path: Path) -> None:
    """The command prints admin lines then 'ready'; SIGTERM stops every node."""
    cmd = [sys.executable, "-m", "yimaporc.cli", "local-cluster",
           "--porcupine", "2", "--yima", "1", "--base-dir", str(tmp_path)]  # fmt: skip
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
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    for host in ("127.0.1.1", "127.0.1.2", "127.0.2.1"):
        assert not _connectable(host, 8080), f"{host} still serving after stop"
