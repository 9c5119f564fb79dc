"""The operator commands of issue 21: ``mail users``, ``media rm``, ``status --watch`` and
``--json`` everywhere, against a recording HTTP server on 127.0.0.1 (port 0)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from yimaporc import cli

TOKEN = "t0ken"


class Api:
    """Canned answers by (method, path); every request recorded with its token and body."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], list[tuple[int, Any]]] = {}
        self.seen: list[tuple[str, str, str | None, Any]] = []

    def on(self, method: str, path: str, *answers: tuple[int, Any]) -> None:
        self.answers[(method, path)] = list(answers)

    def answer(self, method: str, path: str) -> tuple[int, Any]:
        queue = self.answers.get((method, path))
        if not queue:
            return 404, {"error": f"no {method} {path}"}
        return queue.pop(0) if len(queue) > 1 else queue[0]


@pytest.fixture
def api() -> Iterator[tuple[Api, str]]:
    state = Api()

    class Handler(BaseHTTPRequestHandler):
        def _any(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            auth = self.headers.get("Authorization")
            state.seen.append((method, self.path, auth, body))
            code, doc = state.answer(method, self.path)
            raw = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            self._any("GET")

        def do_POST(self) -> None:
            self._any("POST")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(autouse=True)
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YIMAPORC_TOKEN", TOKEN)


STATUS = {"node_id": "p1", "kind": "porcupine", "epoch": 3, "coordinator": "p1",
          "members": [{"node_id": "p1", "address": "a:1"}], "users": 2,
          "reactor_lag": {"max_ms": 3.5, "p99_ms": 1.0}}  # fmt: skip
USERS = {"users": [{"address": "a@example.org", "replicas": 2}]}


def test_mail_users_lists_with_the_token_and_list_is_an_alias(
    api: tuple[Api, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`mail users` GETs /api/mail/users with the bearer token; `mail list` is the same;
    --json prints the document."""
    state, url = api
    state.on("GET", "/api/mail/users", (200, USERS))
    assert cli.main(["mail", "users", "--admin", url]) == 0
    assert capsys.readouterr().out == "a@example.org replicas=2\n"
    assert cli.main(["mail", "list", "--admin", url]) == 0
    assert capsys.readouterr().out == "a@example.org replicas=2\n"
    assert cli.main(["mail", "users", "--json", "--admin", url]) == 0
    assert json.loads(capsys.readouterr().out) == USERS
    assert [s[:3] for s in state.seen] == [("GET", "/api/mail/users", f"Bearer {TOKEN}")] * 3


def test_media_rm_posts_the_name_and_reports(
    api: tuple[Api, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`media rm NAME` POSTs {name} to /api/yima/media/delete; a refusal is one error line."""
    state, url = api
    done = {"name": "clip", "blocks_deleted": 12, "blocks_not_reached": 0}
    state.on(
        "POST", "/api/yima/media/delete", (200, done), (409, {"error": "a disk reorganisation"})
    )
    assert cli.main(["media", "rm", "clip", "--admin", url]) == 0
    assert capsys.readouterr().out == "removed clip: 12 blocks deleted\n"
    assert state.seen[-1] == ("POST", "/api/yima/media/delete", f"Bearer {TOKEN}", {"name": "clip"})
    assert cli.main(["media", "rm", "clip", "--admin", url]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: a disk reorganisation (HTTP 409)"]


def test_status_watch_counts_rounds_and_prints_json_lines(
    api: tuple[Api, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`status --watch --count 3 --json` prints three JSON lines, one per round."""
    state, url = api
    later = {**STATUS, "epoch": 4}
    state.on("GET", "/api/status", (200, STATUS), (200, STATUS), (200, later))
    rc = cli.main(
        ["status", "--watch", "--count", "3", "--interval", "0.01", "--json", "--admin", url]
    )
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and [json.loads(line)["epoch"] for line in lines] == [3, 3, 4]
    assert len(state.seen) == 3


def test_status_watch_text_and_a_node_that_stops_answering(
    api: tuple[Api, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Text rounds show the reactor lag; a failing round is an error line, and the exit
    code is that of the last round."""
    state, url = api
    state.on("GET", "/api/status", (200, STATUS), (500, {"error": "boom"}))
    rc = cli.main(["status", "--watch", "--count", "2", "--interval", "0.01", "--admin", url])
    out, err = capsys.readouterr()
    assert rc == 1
    assert out.count("node p1 (porcupine) epoch 3") == 1
    assert "reactor_lag max 3.5 ms p99 1.0 ms" in out
    assert err.splitlines() == ["error: boom (HTTP 500)"]
    for bad in (["--count", "0"], ["--interval", "0"]):
        assert cli.main(["status", "--watch", *bad, "--admin", url]) == 1
        assert "must be positive" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "method", "path", "doc"),
    [
        (["status"], "GET", "/api/status", STATUS),
        (["mail", "adduser", "x@example.org", "--password", "p"], "POST", "/api/mail/users",
         {"address": "x@example.org", "replicas": 1}),
        (["mail", "deluser", "x@example.org"], "POST", "/api/mail/users/delete", {"deleted": 1}),
        (["mail", "passwd", "x@example.org", "--password", "q"], "POST",
         "/api/mail/users/passwd", {"ok": True}),
        (["mail", "queue", "flush"], "POST", "/api/mail/queue/flush", {"flushed": 2}),
        (["mail", "queue", "delete", "m1"], "POST", "/api/mail/queue/delete", {"deleted": "m1"}),
        (["mail", "queue"], "GET", "/api/mail/queue", {"queue": [], "length": 0, "oldest_age": 0}),
        (["media", "list"], "GET", "/api/yima/media", {"media": []}),
        (["disks", "add", "/tmp/x"], "POST", "/api/yima/disks", {"disk_id": "y1-4", "moved": 1}),
        (["disks", "remove", "y1-4"], "POST", "/api/yima/disks/remove", {"summary": "moved"}),
        (["disks", "rebuild", "y1-4"], "POST", "/api/yima/rebuild", {"restored": 3}),
        (["disks", "list"], "GET", "/api/status", {**STATUS, "disks": [{"disk_id": "y1-0"}]}),
    ],
)  # fmt: skip
def test_every_command_prints_json_with_the_flag(
    api: tuple[Api, str],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    method: str,
    path: str,
    doc: Any,
) -> None:
    """With --json each command prints exactly the node's answer as one JSON document."""
    state, url = api
    state.on(method, path, (200, doc))
    assert cli.main([*argv, "--json", "--admin", url]) == 0
    out = json.loads(capsys.readouterr().out)
    want = {"disks": doc["disks"]} if argv == ["disks", "list"] else doc
    assert out == want
    assert state.seen[-1][:2] == (method, path)


def test_token_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    """`token --json` prints {"token": ...}."""
    assert cli.main(["token", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"token": TOKEN}
