"""Real ``twistd porcupine-node`` processes on 127.0.11.x form, lose and regain a cluster."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from yimaporc.cluster import wire
from yimaporc.secret import admin_token, load_or_create_secret
from yimaporc.testing.procs import NodeProc, views_agree, wait_for

PORT = 17946
ADMIN = 18080


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[list[NodeProc]]:
    """Three porcupine nodes sharing one secret; the 2nd and 3rd join the 1st."""
    secret = tmp_path / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    nodes = [
        NodeProc(
            "porcupine",
            f"p{i}",
            f"127.0.11.{i}",
            tmp_path / f"p{i}" / "data",
            PORT,
            ADMIN,
            extra=["--domain", "example.org"],
            join=[] if i == 1 else [f"127.0.11.1:{PORT}"],
            secret_file=secret,
        )
        for i in (1, 2, 3)
    ]
    try:
        for n in nodes:
            n.start()
        yield nodes
    finally:
        for n in nodes:
            n.kill(signal.SIGTERM)


def test_three_nodes_form_cluster_drop_killed_and_readmit_restarted(trio: list[NodeProc]) -> None:
    """SIGKILL one node: the others drop it; restart it on its data dir: it rejoins."""
    p1, p2, p3 = trio
    t0 = time.monotonic()
    wait_for(lambda: views_agree(trio), 30, "3 nodes to agree")
    formed = time.monotonic() - t0
    epoch_before = p3.status()["epoch"]  # type: ignore[index]

    p3.kill(signal.SIGKILL)
    t1 = time.monotonic()
    wait_for(lambda: views_agree([p1, p2]), 30, "survivors to drop p3")
    detected = time.monotonic() - t1

    p3.start()
    t2 = time.monotonic()
    wait_for(lambda: views_agree(trio), 30, "p3 to rejoin")
    rejoined = time.monotonic() - t2
    assert p3.status()["epoch"] > epoch_before  # type: ignore[index]
    print(
        f"\nformed {formed:.2f}s, kill detected+converged {detected:.2f}s, rejoin {rejoined:.2f}s"
    )


def test_garbage_datagrams_leave_node_serving(trio: list[NodeProc]) -> None:
    """Random, truncated, forged and replayed datagrams are dropped and counted; the cluster stays."""
    wait_for(lambda: views_agree(trio), 30, "3 nodes to agree")
    p1 = trio[0]
    rng = random.Random(7)
    good = wire.serialize(
        b"x" * 32,
        wire.Scope("porcupine", "porcupine"),
        wire.Header("evil", "127.0.11.9:1", 1, 1, 1),
        wire.NewGroup(9),
    )

    def drops() -> int:
        doc = p1.status()
        stats = doc["membership"] if doc else {}
        return sum(v for k, v in stats.items() if k.startswith("dropped_"))

    # In batches, waiting for each to be counted, so the socket buffer never overflows.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for batch in range(15):
            before = drops()
            for i in range(20):
                kind = i % 3
                if kind == 0:
                    data = rng.randbytes(rng.randint(1, 1500))
                elif kind == 1:
                    data = good[: rng.randint(1, len(good) - 1)]
                else:
                    data = good
                s.sendto(data, (p1.host, PORT))
            wait_for(lambda b=before: drops() >= b + 20, 10, f"batch {batch} to be dropped")
    stats = p1.status()["membership"]  # type: ignore[index]
    assert stats["dropped_bad_mac"] >= 100
    assert views_agree(trio)


def rpc_check(node: NodeProc) -> dict[str, Any]:
    assert node.secret_file is not None
    token = admin_token(load_or_create_secret(node.secret_file, create=False))
    req = urllib.request.Request(
        node.admin_url + "/api/rpc-check", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        doc: dict[str, Any] = json.load(r)
        return doc


def test_rpc_between_members_and_refused_for_strangers(
    trio: list[NodeProc], tmp_path: Path
) -> None:
    """Members reach each other over authenticated RPC (100 KB echo); a node with another secret is not a member."""
    wait_for(lambda: views_agree(trio), 30, "3 nodes to agree")
    doc = rpc_check(trio[0])
    assert doc["tls"] is False
    assert set(doc["peers"]) == {"p2", "p3"}
    assert all(p["ok"] for p in doc["peers"].values()), doc
    stranger_secret = tmp_path / "other.secret"
    stranger_secret.write_text(os.urandom(16).hex())
    stranger = NodeProc(
        "porcupine", "px", "127.0.11.9", tmp_path / "px" / "data", PORT, ADMIN,
        extra=["--domain", "example.org"], join=[f"127.0.11.1:{PORT}"], secret_file=stranger_secret,
    )  # fmt: skip
    stranger.start()
    try:
        wait_for(lambda: stranger.status(), 15, "stranger up")
        wait_for(
            lambda: (trio[0].status() or {}).get("membership", {}).get("dropped_bad_mac"),
            15,
            "stranger's probes dropped",
        )
        assert stranger.members() == {"px"}
        assert views_agree(trio)
    finally:
        stranger.kill(signal.SIGTERM)


def test_tls_rpc(tmp_path: Path) -> None:
    """With --tls-cert/--tls-key, RPC runs over TLS and still works between members."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=yimaporc-cluster", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    secret = tmp_path / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    nodes = [
        NodeProc(
            "porcupine",
            f"t{i}",
            f"127.0.12.{i}",
            tmp_path / f"t{i}" / "data",
            PORT,
            ADMIN,
            extra=["--domain", "example.org", "--tls-cert", str(cert), "--tls-key", str(key)],
            join=[] if i == 1 else [f"127.0.12.1:{PORT}"],
            secret_file=secret,
        )
        for i in (1, 2)
    ]
    try:
        for n in nodes:
            n.start()
        wait_for(lambda: views_agree(nodes), 30, "2 TLS nodes to agree")
        doc = rpc_check(nodes[1])
        assert doc["tls"] is True and doc["peers"]["t1"]["ok"], doc
    finally:
        for n in nodes:
            n.kill(signal.SIGTERM)


def test_user_map_spreads_buckets_and_moves_only_the_dead_nodes(trio: list[NodeProc]) -> None:
    """Buckets are spread evenly over 3 nodes; when one dies only its buckets move."""
    wait_for(lambda: views_agree(trio), 30, "3 nodes to agree")

    def buckets(n: NodeProc) -> dict[str, int] | None:
        doc = n.status()
        return doc["buckets"] if doc and doc.get("buckets") else None

    spread = wait_for(lambda: buckets(trio[0]), 10, "buckets in status")
    assert sum(spread.values()) == 256 and set(spread) == {"p1", "p2", "p3"}
    assert max(spread.values()) - min(spread.values()) <= 1
    assert all(buckets(n) == spread for n in trio)
    trio[2].kill(signal.SIGKILL)
    wait_for(lambda: views_agree(trio[:2]), 30, "survivors to agree")
    after = wait_for(lambda: (b := buckets(trio[0])) and set(b) == {"p1", "p2"} and b, 10, "map")
    assert after == {"p1": 128, "p2": 128}
    assert after["p1"] - spread["p1"] + after["p2"] - spread["p2"] == spread["p3"]
