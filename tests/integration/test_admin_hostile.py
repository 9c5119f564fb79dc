"""Real ``twistd yima-node`` processes on 127.0.106.x: hostile admin uploads and bounded logs."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from yimaporc.secret import admin_token, load_or_create_secret
from yimaporc.testing.procs import NodeProc, assert_lag_small, wait_for

CLUSTER = 17946
ADMIN = 18080
BIG = 200 * 1024 * 1024
CHUNK = 64 * 1024


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[list[NodeProc]]:
    """Yima nodes started by the test; all stopped (SIGTERM, by PID) at the end."""
    started: list[NodeProc] = []
    yield started
    for n in started:
        n.kill(signal.SIGTERM)


def start(started: list[NodeProc], tmp_path: Path, i: int, extra: list[str]) -> NodeProc:
    node = NodeProc(
        "yima", f"h{i}", f"127.0.106.{i}", tmp_path / f"h{i}" / "data", CLUSTER, ADMIN,
        extra=extra, secret_file=tmp_path / "cluster.secret",
    )  # fmt: skip
    node.secret_file.write_text(os.urandom(16).hex())  # type: ignore[union-attr]
    started.append(node)
    node.start()
    wait_for(node.status, 30, f"{node.node_id} to answer")
    return node


def token_of(node: NodeProc) -> str:
    assert node.secret_file is not None
    return admin_token(load_or_create_secret(node.secret_file, create=False))


def pid_of(node: NodeProc) -> int:
    assert node.process is not None
    return node.process.pid


def open_file_bytes(pid: int) -> int:
    """Total size of the regular files ``pid`` holds open (deleted temp files included)."""
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if (st.st_mode & 0o170000) == 0o100000:
            total += st.st_size
    return total


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def upload(node: NodeProc, head: bytes, chunked: bool) -> tuple[bytes, int, float]:
    """Send ``head`` then up to BIG body bytes, picking up the answer as soon as it comes;
    return (answer, body bytes the kernel accepted, seconds)."""
    t0 = time.monotonic()
    sent = 0
    answer = b""
    payload = b"%x\r\n%s\r\n" % (CHUNK, b"\0" * CHUNK) if chunked else b"\0" * CHUNK
    with socket.create_connection((node.host, node.admin_port), timeout=10) as s:
        s.sendall(head)
        try:
            while sent < BIG:
                if select.select([s], [], [], 0)[0]:
                    answer += s.recv(4096)
                    if not answer:
                        break
                s.sendall(payload)
                sent += CHUNK
        except OSError:
            pass
        if not answer:
            with contextlib.suppress(OSError):
                answer = s.recv(4096)
    return answer, sent, time.monotonic() - t0


def test_200mb_upload_without_token_is_refused_before_the_body(
    node_factory: list[NodeProc], tmp_path: Path
) -> None:
    """200 MB POSTs (no token; chunked with the token to a JSON route) get 401/413 at once,
    the node spools nothing (open files, data dir < 1 MB growth, RSS bounded) and stays up."""
    node = start(node_factory, tmp_path, 1, [])
    pid = pid_of(node)
    files0, data0, rss0 = open_file_bytes(pid), tree_bytes(node.data_dir), rss_kb(pid)
    no_token = (
        b"POST /api/yima/media?name=evil HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % BIG
    )
    answer, sent, seconds = upload(node, no_token, chunked=False)
    assert answer.startswith(b"HTTP/1.1 401 "), answer
    assert sent < BIG // 4 and seconds < 20, (sent, seconds)
    chunked = (
        b"POST /api/yima/disks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Authorization: Bearer %s\r\n\r\n" % token_of(node).encode()
    )
    answer, sent, seconds = upload(node, chunked, chunked=True)
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert sent < BIG // 4 and seconds < 20, (sent, seconds)
    doc = node.status()
    assert doc is not None and doc["admin"]["refused_401"] == 1
    assert doc["admin"]["refused_413"] == 1
    assert open_file_bytes(pid) - files0 < 1 << 20
    assert tree_bytes(node.data_dir) - data0 < 1 << 20
    assert rss_kb(pid) - rss0 < 30 * 1024
    assert_lag_small([node])
    req = urllib.request.Request(
        node.admin_url + "/api/yima/stored", headers={"Authorization": f"Bearer {token_of(node)}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200


def refused_requests(node: NodeProc, n: int) -> None:
    """``n`` token-less GETs of a token-only route, one connection each."""
    for _ in range(n):
        with socket.create_connection((node.host, node.admin_port), timeout=10) as s:
            s.sendall(b"GET /api/yima/stored HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 401 ")


def test_log_rotation_keeps_at_most_max_files(node_factory: list[NodeProc], tmp_path: Path) -> None:
    """--log-max-bytes 20000 --log-max-files 3: after ~150 KB of log, 3 rotated files remain."""
    node = start(
        node_factory, tmp_path, 2,
        ["--log-max-bytes", "20000", "--log-max-files", "3", "--log-rate", "0"],
    )  # fmt: skip
    refused_requests(node, 1000)
    wait_for(lambda: (node.status() or {}).get("admin", {}).get("refused_401") == 1000, 10, "1000")
    logs = sorted(p.name for p in node.log_path.parent.iterdir() if p.name.startswith("h2.log"))
    assert logs == ["h2.log", "h2.log.1", "h2.log.2", "h2.log.3"]
    for name in logs:
        assert (node.log_path.parent / name).stat().st_size < 20000 + 1000
    assert (
        "admin: 401 for GET '/api/yima/stored'" in (node.log_path.parent / "h2.log.1").read_text()
    )


def test_log_flood_from_one_client_is_rate_limited(
    node_factory: list[NodeProc], tmp_path: Path
) -> None:
    """1000 refused requests from one address: at most 20 lines per 10 s, then one summary."""
    node = start(node_factory, tmp_path, 3, [])
    t0 = time.monotonic()
    refused_requests(node, 1000)
    windows = int((time.monotonic() - t0) / 10) + 2

    def lines() -> list[str]:
        return [
            line
            for line in node.log_path.read_text().splitlines()
            if "admin: 401 for GET" in line or "suppressed" in line
        ]

    wait_for(lambda: any("suppressed" in line for line in lines()), 15, "the summary line")
    refusals = [line for line in lines() if "admin: 401 for GET" in line]
    assert 20 <= len(refusals) <= 20 * windows
    summary = [line for line in lines() if "suppressed" in line]
    assert "admin: {status} for {method} {path!r} from {peer}" in summary[0]
    assert node.status() is not None


def ingest(node: NodeProc, source: Path, token: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "yimaporc.cli", "media", "ingest", str(source), "--opaque"]
    argv += ["--admin", node.admin_url]
    env = {**os.environ, "YIMAPORC_TOKEN": token}
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)


def test_cli_ingest_waits_for_the_go_ahead_and_reports_a_refusal(
    node_factory: list[NodeProc], tmp_path: Path
) -> None:
    """`media ingest` sends Expect: 100-continue: a wrong token is a one-line 401 error before
    the file is sent; with the right token the upload goes through."""
    node = start(node_factory, tmp_path, 4, [])
    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        f.truncate(BIG)
    proc = ingest(node, big, "wrong")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: missing or wrong bearer token (HTTP 401)"
    noise = tmp_path / "noise.bin"
    noise.write_bytes(os.urandom(300_000))
    proc = ingest(node, noise, token_of(node))
    assert proc.returncode == 0, proc.stderr
    assert "ingested noise" in proc.stdout
    doc = node.status()
    assert doc is not None and doc["admin"]["refused_401"] == 1


def http_status(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_account_list_and_rpc_check_need_the_token(
    node_factory: list[NodeProc], tmp_path: Path
) -> None:
    """On a real mail node GET /api/mail/users and /api/rpc-check are 401 without the token."""
    node = NodeProc(
        "porcupine", "m5", "127.0.106.5", tmp_path / "m5" / "data", CLUSTER, ADMIN,
        extra=["--domain", "example.org"], secret_file=tmp_path / "cluster.secret",
    )  # fmt: skip
    node.secret_file.write_text(os.urandom(16).hex())  # type: ignore[union-attr]
    node_factory.append(node)
    node.start()
    wait_for(node.status, 30, "m5 to answer")
    for path in ("/api/mail/users", "/api/rpc-check"):
        assert http_status(node.admin_url + path) == 401
        assert http_status(node.admin_url + path, "0" * 64) == 401
        assert http_status(node.admin_url + path, token_of(node)) == 200
    assert http_status(node.admin_url + "/api/status") == 200
