"""``yimaporc mail ...``: argument handling and the admin API calls it makes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from yimaporc.porcupine import cli


class FakeClient:
    """Records admin calls; answers like the MailService routes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        self.calls.append(("POST", path, body))
        return {}

    def get(self, path: str) -> Any:
        self.calls.append(("GET", path, None))
        return {"users": [{"address": "a@example.org", "replicas": 2, "created": 0.0}]}


def run(argv: list[str], client: FakeClient) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    made: list[dict[str, Any]] = []

    def make_client(args: argparse.Namespace, **kw: Any) -> Any:
        made.append(kw)
        return client

    cli.register(sub, make_client)
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_adduser_with_password_and_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """adduser posts address, password (flag or file, newline stripped) and replicas."""
    c = FakeClient()
    assert run(["mail", "adduser", "a@example.org", "--password", "pw", "--replicas", "2"], c) == 0
    f = tmp_path / "pw"
    f.write_text("from-file\n")
    run(["mail", "adduser", "b@example.org", "--password-file", str(f)], c)
    assert c.calls == [
        ("POST", "/api/mail/users", {"address": "a@example.org", "password": "pw", "replicas": 2}),
        (
            "POST",
            "/api/mail/users",
            {"address": "b@example.org", "password": "from-file", "replicas": 1},
        ),
    ]
    assert "created a@example.org" in capsys.readouterr().out


def test_deluser_passwd_list(capsys: pytest.CaptureFixture[str]) -> None:
    """deluser and passwd use the POST routes; list prints one line per user."""
    c = FakeClient()
    run(["mail", "deluser", "a@example.org"], c)
    run(["mail", "passwd", "a@example.org", "--password", "new"], c)
    run(["mail", "list"], c)
    assert [call[:2] for call in c.calls] == [
        ("POST", "/api/mail/users/delete"),
        ("POST", "/api/mail/users/passwd"),
        ("GET", "/api/mail/users"),
    ]
    assert "a@example.org replicas=2" in capsys.readouterr().out


def test_password_is_required_and_exclusive() -> None:
    """adduser needs exactly one of --password / --password-file."""
    for argv in (
        ["mail", "adduser", "a@example.org"],
        ["mail", "adduser", "a@example.org", "--password", "x", "--password-file", "f"],
    ):
        with pytest.raises(SystemExit):
            run(argv, FakeClient())


def test_missing_password_file_is_a_cli_error(tmp_path: Path) -> None:
    """An unreadable --password-file is a CliError (printed as ``error: ...``), no call made."""
    from yimaporc.cli import CliError

    c = FakeClient()
    with pytest.raises(CliError, match="cannot read --password-file"):
        run(["mail", "adduser", "a@example.org", "--password-file", str(tmp_path / "nope")], c)
    assert c.calls == []
