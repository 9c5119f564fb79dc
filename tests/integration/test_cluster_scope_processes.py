"""Attacks on the cluster port of real nodes (issue 13, items 0 and 2).

A genuine datagram of one cluster replayed to another cluster that shares its
secret must not merge them; an endless AMP box from a peer that never
authenticated must not grow the node's memory; with TLS, a peer without a
certificate the cluster's CA signed gets nothing.  Addresses 127.0.101.x only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from yimaporc.secret import admin_token
from yimaporc.testing.procs import NodeProc, assert_lag_small, wait_for

NET = "127.0.101"
PORT = 17946
ADMIN = 18080
MiB = 1 << 20


def vm_rss(proc: NodeProc) -> int:
    """Resident set size of the node process, in bytes (/proc/PID/status VmRSS)."""
    assert proc.process is not None
    for line in Path(f"/proc/{proc.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def amp_box(pairs: list[tuple[bytes, bytes]], terminated: bool = True) -> bytes:
    """An AMP box on the wire: u16-prefixed keys and values, then two NUL bytes."""
    out = b"".join(struct.pack("!H", len(k)) + k + struct.pack("!H", len(v)) + v for k, v in pairs)
    return out + (b"\0\0" if terminated else b"")


def hello_box(kind: str) -> bytes:
    """The first handshake box a cluster peer sends (see yimaporc.cluster.rpc.Hello)."""
    return amp_box(
        [
            (b"_command", b"yimaporc.hello"),
            (b"_ask", b"1"),
            (b"node_id", b"intruder"),
            (b"nonce", os.urandom(32)),
            (b"cluster", kind.encode()),
            (b"kind", kind.encode()),
        ]
    )


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[NodeProc]]:
    """Processes a test starts; all stopped by PID at the end."""
    started: list[NodeProc] = []
    yield started
    for n in started:
        n.kill(signal.SIGTERM)


def no_traceback(node: NodeProc) -> bool:
    """The node's log holds no traceback (a client's mistake is a counter, not an error)."""
    log = node.log_path.read_text(errors="replace")
    return "Traceback" not in log and "Unhandled" not in log


def start(nodes: list[NodeProc], node: NodeProc) -> NodeProc:
    nodes.append(node)
    node.start()
    # Up: its first view (a group of one) committed, which follows the start-up write.
    wait_for(lambda: node.node_id in (node.members() or set()), 30, f"{node.node_id} up")
    return node


def test_replayed_datagram_of_a_mail_cluster_does_not_join_a_media_cluster(
    tmp_path: Path, nodes: list[NodeProc]
) -> None:
    """A genuine porcupine datagram replayed to a yima node sharing the secret is dropped
    as another cluster's; neither view nor the yima node's persisted state changes."""
    secret = tmp_path / "cluster.secret"  # one secret for both, as local-cluster once did
    secret.write_text(os.urandom(16).hex())
    # A pre-fix membership file of a yima node that had been merged with the mail node.
    ydata = tmp_path / "y1" / "data"
    ydata.mkdir(parents=True)
    merged = {"epoch": 7, "lamport": 9, "incarnation": 1, "known": [f"{NET}.1:{PORT}"]}
    (ydata / "membership.json").write_text(json.dumps(merged))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tap:
        tap.bind((f"{NET}.9", PORT))
        tap.settimeout(15)
        p1 = start(
            nodes,
            NodeProc(
                "porcupine", "p1", f"{NET}.1", tmp_path / "p1" / "data", PORT, ADMIN,
                extra=["--domain", "example.org"], join=[f"{NET}.9:{PORT}"], secret_file=secret,
            ),
        )  # fmt: skip
        y1 = start(
            nodes, NodeProc("yima", "y1", f"{NET}.2", ydata, PORT, ADMIN, secret_file=secret)
        )
        captured, sender = tap.recvfrom(65536)  # p1's coordinator probes its seed
        assert sender == (f"{NET}.1", PORT) and captured.startswith(b"YPM2")
        y_before, p_before = y1.status(), p1.status()
        assert y_before is not None and p_before is not None
        assert y_before["cluster"] == "yima" and p_before["cluster"] == "porcupine"
        # The view's write runs in the node's pool: wait until it holds that epoch.
        wait_for(
            lambda: (
                json.loads((ydata / "membership.json").read_bytes())["epoch"] == y_before["epoch"]
            ),
            10,
            "y1's first view on disk",
        )
        state_before = (ydata / "membership.json").read_bytes()
        assert json.loads(state_before)["known"] == []  # the pre-fix addresses are forgotten
        # The same datagram relabelled as yima's keeps porcupine's MAC: bad MAC.
        relabelled = captured.replace(b"\x09porcupine\x09porcupine", b"\x04yima\x04yima", 1)
        assert relabelled != captured
        for _ in range(3):
            tap.sendto(captured, (f"{NET}.2", PORT))
        tap.sendto(relabelled, (f"{NET}.2", PORT))

        def stats() -> dict[str, int]:
            doc = y1.status()
            return doc["membership"] if doc else {}

        wait_for(lambda: stats().get("dropped_wrong_scope", 0) >= 3, 10, "replays dropped")
        wait_for(lambda: stats().get("dropped_bad_mac", 0) >= 1, 10, "relabelled one dropped")
        # Before the fix the merge took one probe round (~1 s); watch three of p1's.
        for _ in range(3):
            tap.recvfrom(65536)
    y_after, p_after = y1.status(), p1.status()
    assert y_after is not None and p_after is not None
    assert y_after["membership"].get("accepted", 0) == 0, y_after["membership"]
    assert [m["node_id"] for m in y_after["members"]] == ["y1"]
    assert [m["node_id"] for m in p_after["members"]] == ["p1"]
    assert (y_after["epoch"], p_after["epoch"]) == (y_before["epoch"], p_before["epoch"])
    assert (ydata / "membership.json").read_bytes() == state_before
    assert p_after["buckets"] == {"p1": 256}
    assert no_traceback(y1) and no_traceback(p1)


def send_until_dropped(address: tuple[str, int], chunks: Iterator[bytes], limit: int) -> int:
    """Send ``chunks`` until the node drops the connection (or ``limit`` bytes); bytes sent."""
    sent = 0
    with socket.create_connection(address, timeout=10) as s:
        try:
            for chunk in chunks:
                s.sendall(chunk)
                sent += len(chunk)
                if sent >= limit:
                    return sent
            s.shutdown(socket.SHUT_WR)
            s.recv(1)
        except (ConnectionResetError, BrokenPipeError):
            return sent
    return sent


def rpc_check(node: NodeProc, secret: Path) -> dict[str, Any]:
    """GET /api/rpc-check (Echo to every member) with the admin token."""
    req = urllib.request.Request(
        node.admin_url + "/api/rpc-check",
        headers={"Authorization": "Bearer " + admin_token(secret.read_bytes().strip())},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        doc: dict[str, Any] = json.load(r)
        return doc


def test_endless_unauthenticated_amp_box_is_cut_off(tmp_path: Path, nodes: list[NodeProc]) -> None:
    """An endless AMP box (unique keys, 64 KiB values), a box of many small values and
    300 idle half-boxes, none authenticated: the node's RSS grows < 20 MB, the
    connections are dropped and counted, the view stays and RPC between members works."""
    secret = tmp_path / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    y3, y4 = (
        start(nodes, NodeProc("yima", f"y{i}", f"{NET}.{i}", tmp_path / f"y{i}" / "data",
                              PORT, ADMIN, join=seed, secret_file=secret))
        for i, seed in ((3, []), (4, [f"{NET}.3:{PORT}"]))
    )  # fmt: skip

    def members(n: NodeProc) -> tuple[int, list[str]] | None:
        doc = n.status()
        return (doc["epoch"], [m["node_id"] for m in doc["members"]]) if doc else None

    wait_for(lambda: members(y3) == members(y4) and len(members(y3)[1]) == 2, 30, "2 nodes")  # type: ignore[index]
    view = members(y3)
    rss_before = vm_rss(y3)
    address = (f"{NET}.3", PORT)

    def big_values() -> Iterator[bytes]:
        value = os.urandom(0xFFFF)
        for i in range(10**9):
            yield amp_box([(b"k%09d" % i, value)], terminated=False)

    def small_values() -> Iterator[bytes]:
        for n in range(10**9):
            yield amp_box(
                [(b"k%09d" % i, b"v" * 200) for i in range(n * 100, n * 100 + 100)], False
            )

    attempts = 200 * MiB
    sent_big = send_until_dropped(address, big_values(), attempts)
    sent_small = send_until_dropped(address, small_values(), attempts)
    idle, refused = [], 0
    try:
        for _ in range(300):
            try:
                s = socket.create_connection(address, timeout=10)
                idle.append(s)
                s.sendall(amp_box([(b"k%d" % i, b"v" * 200) for i in range(12)], False))
            except (ConnectionResetError, BrokenPipeError):
                refused += 1

        def rpc() -> dict[str, int]:
            doc = y3.status()
            return doc["rpc"] if doc else {}

        full = wait_for(lambda: rpc().get("dropped_too_many_unauthenticated", 0), 15, "full")
        rss_idle = vm_rss(y3)
    finally:
        for s in idle:
            s.close()
    stats = rpc()
    rss_after = vm_rss(y3)
    print(
        f"\nsent {sent_big / MiB:.2f} MiB of 64 KiB values and {sent_small / MiB:.2f} MiB of "
        f"small values before the drops; {full} of 300 idle refused ({refused} seen by the client); VmRSS {rss_before / MiB:.1f} -> "
        f"{rss_idle / MiB:.1f} (300 idle) -> {rss_after / MiB:.1f} MiB; rpc {stats}"
    )
    assert sent_big < 16 * MiB and sent_small < 16 * MiB, (sent_big, sent_small)
    assert stats.get("dropped_unauthenticated_too_large", 0) >= 2
    assert max(rss_idle, rss_after) - rss_before < 20 * MiB
    assert members(y3) == view and members(y4) == view
    wait_for(lambda: rpc()["unauthenticated"] == 0, 15, "idle connections released")
    check = rpc_check(y4, secret)
    assert check["peers"]["y3"]["ok"], check
    assert no_traceback(y3)
    assert_lag_small([y3, y4])


def test_tls_cluster_port_requires_a_client_certificate(
    tmp_path: Path, nodes: list[NodeProc]
) -> None:
    """With --tls-cert/--tls-key, members still work over TLS, a client with the cluster's
    certificate gets AMP answers, and one without a certificate gets nothing."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "2", "-subj", "/CN=yimaporc-cluster",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    secret = tmp_path / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
    t5, t6 = (
        start(nodes, NodeProc("yima", f"t{i}", f"{NET}.{i}", tmp_path / f"t{i}" / "data",
                              PORT, ADMIN, extra=tls, join=seed, secret_file=secret))
        for i, seed in ((5, []), (6, [f"{NET}.5:{PORT}"]))
    )  # fmt: skip
    wait_for(lambda: {m["node_id"] for m in (t6.status() or {}).get("members", [])} == {"t5", "t6"},
             30, "TLS members")  # fmt: skip
    doc = rpc_check(t6, secret)
    assert doc["tls"] is True and doc["peers"]["t5"]["ok"], doc

    def ask(with_cert: bool) -> bytes:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cert)
        if with_cert:
            ctx.load_cert_chain(cert, key)
        with socket.create_connection((f"{NET}.5", PORT), timeout=10) as raw:
            try:
                with ctx.wrap_socket(raw) as s:
                    s.sendall(hello_box("yima"))
                    return s.recv(65536)
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                return b""

    assert b"_answer" in ask(with_cert=True)  # TLS passes; the handshake itself answers
    assert ask(with_cert=False) == b""
    assert no_traceback(t5) and no_traceback(t6)


def test_cli_default_secret_follows_the_nodes_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --secret-file the CLI uses local-cluster's secret of the node's kind."""
    import http.server
    import threading

    from yimaporc._cliutil import DEFAULT_SECRET, default_secret

    class Status(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"kind": "yima"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    monkeypatch.chdir(tmp_path)
    with http.server.ThreadingHTTPServer((f"{NET}.20", 0), Status) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        url = f"http://{NET}.20:{httpd.server_address[1]}"
        try:
            assert default_secret(url) == DEFAULT_SECRET  # no per-kind secret yet
            per_kind = DEFAULT_SECRET.parent / "yima" / DEFAULT_SECRET.name
            per_kind.parent.mkdir(parents=True)
            per_kind.write_text("x" * 32)
            assert default_secret(url) == per_kind
        finally:
            httpd.shutdown()
    assert default_secret(None) == DEFAULT_SECRET
