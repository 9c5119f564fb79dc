"""``yimaporc mail ...`` end to end: the console script against the admin API with the mail routes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.web.server import Site

from yimaporc.admin.server import AdminResource
from yimaporc.porcupine.testing import RunningMail, in_reactor
from yimaporc.secret import admin_token

SECRET = b"s" * 32


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[tuple[str, RunningMail]]:
    """A mail service whose routes are served by the real admin resource on loopback."""
    mail = RunningMail(tmp_path / "data")
    node = SimpleNamespace(
        secret=SECRET, routes=mail.service.admin_routes(), status=mail.service.status
    )

    def listen() -> Any:
        return mail.reactor.listenTCP(0, Site(AdminResource(node)), interface="127.0.0.1")  # type: ignore[arg-type]

    port = in_reactor(listen)
    yield f"http://127.0.0.1:{port.getHost().port}", mail
    in_reactor(port.stopListening)
    mail.stop()


def yimaporc(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, YIMAPORC_TOKEN=admin_token(SECRET))
    return subprocess.run(
        [sys.executable, "-m", "yimaporc.cli", "mail", *args, "--admin", url],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip


def test_mail_commands_end_to_end(admin: tuple[str, RunningMail], tmp_path: Path) -> None:
    """adduser/list/passwd/deluser work; errors exit non-zero with one ``error:`` line."""
    url, mail = admin
    ok = yimaporc(url, "adduser", "demo@example.org", "--password", "demo", "--replicas", "2")
    assert ok.returncode == 0, ok.stderr
    again = yimaporc(url, "adduser", "demo@example.org", "--password", "x")
    assert again.returncode != 0 and again.stderr.startswith("error: ") and "409" in again.stderr
    listed = yimaporc(url, "list")
    assert "demo@example.org replicas=2" in listed.stdout
    pw = tmp_path / "pw"
    pw.write_text("new-secret\n")
    assert yimaporc(url, "passwd", "demo@example.org", "--password-file", str(pw)).returncode == 0
    assert mail.service.status()["users"] == 1
    assert yimaporc(url, "deluser", "demo@example.org").returncode == 0
    gone = yimaporc(url, "deluser", "demo@example.org")
    assert gone.returncode != 0 and "404" in gone.stderr
    bad = yimaporc(url, "adduser", "x@other.org", "--password", "p")
    assert bad.returncode != 0 and "domain" in bad.stderr
