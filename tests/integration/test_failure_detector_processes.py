"""Failure detection of real ``porcupine-node`` processes on 127.0.102.x under local
stalls (SIGSTOP), UDP floods and real crashes (SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from yimaporc.testing.procs import (
    NodeProc,
    assert_lag_small,
    reactor_lag,
    view_changes,
    views_agree,
    wait_for,
)

PORT = 17946
ADMIN = 18080
HOST = "127.0.102.{}"

# Junk sender: as fast as one Python process manages, for DURATION seconds; half the
# datagrams start with the membership magic (so the MAC is computed), half are random.
FLOOD = r"""
import os, socket, sys, time
host, port, duration = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
junk = [os.urandom(120) for _ in range(64)] + [b"YPM1" + os.urandom(116) for _ in range(64)]
sent = errors = 0
end = time.monotonic() + duration
while time.monotonic() < end:
    for j in junk:
        try:
            s.sendto(j, (host, port))
            sent += 1
        except OSError:
            errors += 1
print(sent, errors)
"""


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[list[NodeProc]]:
    """Three porcupine nodes sharing one secret, formed into one view."""
    secret = tmp_path / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    nodes = [
        NodeProc(
            "porcupine",
            f"d{i}",
            HOST.format(i),
            tmp_path / f"d{i}" / "data",
            PORT,
            ADMIN,
            extra=["--domain", "example.org"],
            join=[] if i == 1 else [f"{HOST.format(1)}:{PORT}"],
            secret_file=secret,
        )
        for i in (1, 2, 3)
    ]
    try:
        for n in nodes:
            n.start()
        wait_for(lambda: views_agree(nodes), 30, "3 nodes to agree")
        yield nodes
    finally:
        for n in nodes:
            n.kill(signal.SIGTERM)


def hold(seconds: float) -> None:
    """Let real time pass while something is being done to the nodes (a stall, a flood)."""
    threading.Event().wait(seconds)


def settled_view(nodes: list[NodeProc]) -> tuple[int, list[int]]:
    """The common epoch and each node's number of committed views so far, once every
    node has shown the same full view for 1.5 s (a view formed at start-up can still
    be followed by the lowest-id node taking over as coordinator: one more round)."""
    want = {n.node_id for n in nodes}
    stable: tuple[int, float] | None = None
    end = time.monotonic() + 20.0
    while time.monotonic() < end:
        docs = [wait_for(n.status, 10, f"{n.node_id} status") for n in nodes]
        views = {(d["epoch"], frozenset(m["node_id"] for m in d["members"])) for d in docs}
        (epoch, members), *others = views
        now = time.monotonic()
        if others or members != want:
            stable = None
        elif stable is None or stable[0] != epoch:
            stable = (epoch, now)
        elif now - stable[1] >= 1.5:
            return epoch, [view_changes(n) for n in nodes]
        hold(0.1)
    raise AssertionError(f"no stable full view within 20 s: {views}")


def watch_views(nodes: list[NodeProc], epoch: int, seconds: float) -> list[str]:
    """For ``seconds``, poll every node; the views seen that differ from ``epoch`` with
    all three members (empty when nothing changed)."""
    want = {n.node_id for n in nodes}
    end = time.monotonic() + seconds
    seen: list[str] = []
    while time.monotonic() < end:
        for n in nodes:
            doc = n.status()
            if doc is None:
                continue  # stopped or too busy to answer right now; checked at the end
            members = {m["node_id"] for m in doc["members"]}
            if (doc["epoch"], members) != (epoch, want):
                seen.append(f"{n.node_id}: epoch {doc['epoch']} {sorted(members)}")
        hold(0.2)
    return seen


def changes_since(nodes: list[NodeProc], before: list[int]) -> int:
    """Views committed since ``before`` (per-node counts), summed over the nodes."""
    return sum(view_changes(n) - b for n, b in zip(nodes, before, strict=True))


def test_sigstop_two_seconds_is_not_a_failure(trio: list[NodeProc]) -> None:
    """A node stopped for 2 s and continued: no view change on any node; it reports its stall."""
    epoch, changes = settled_view(trio)
    d2 = trio[1]
    assert d2.process is not None
    d2.process.send_signal(signal.SIGSTOP)
    try:
        hold(2.0)
    finally:
        d2.process.send_signal(signal.SIGCONT)
    seen = watch_views(trio, epoch, 5.0)
    assert not seen, f"{changes_since(trio, changes)} view changes: {seen}"
    assert settled_view(trio) == (epoch, changes)
    assert reactor_lag(d2)["max_ms"] >= 1500.0  # the stopped node saw its own stall
    lags = assert_lag_small([trio[0], trio[2]], max_ms=500.0)
    print(f"\nSIGSTOP 2 s: view changes 0; lag of the others {lags}")


def test_udp_flood_is_not_a_failure(trio: list[NodeProc]) -> None:
    """10 s of junk datagrams at one Python sender's top rate on a node's cluster port:
    no view change on any node; the flooded node drops and counts them, reports its lag."""
    epoch, changes = settled_view(trio)
    victim = trio[1]
    duration = 10.0
    sender = subprocess.Popen(
        [sys.executable, "-c", FLOOD, victim.host, str(PORT), str(duration)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        seen = watch_views(trio, epoch, duration + 3.0)
        out, _ = sender.communicate(timeout=30)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    sent, errors = (int(x) for x in out.split())
    doc = wait_for(victim.status, 10, "victim status")
    stats = doc["membership"]
    dropped = sum(v for k, v in stats.items() if k.startswith("dropped_"))
    rate = f"{sent} sent ({sent / duration:.0f}/s), {dropped} dropped by the node"
    assert not seen, f"{rate}; {changes_since(trio, changes)} view changes: {seen[:3]}"
    assert settled_view(trio) == (epoch, changes)
    assert stats["udp_rcvbuf"] >= 4 * 1024 * 1024
    assert dropped > 0
    lags = assert_lag_small(trio, max_ms=2000.0)
    print(
        f"\nflood: {rate} ({dropped / sent:.0%}), {errors} send errors, view changes 0, lag {lags}"
    )


def test_sigkill_is_detected_within_seconds(trio: list[NodeProc]) -> None:
    """SIGKILL one node: the other two commit a view without it, at a higher epoch, in ~3 s."""
    epoch, _ = settled_view(trio)
    d1, d2, d3 = trio
    d3.kill(signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: views_agree([d1, d2]), 15, "survivors to drop d3", interval=0.02)
    took = time.monotonic() - t0
    new_epoch, _ = settled_view([d1, d2])
    assert new_epoch > epoch
    print(f"\nSIGKILL detected and committed in {took:.2f}s")


def test_yima_node_reports_reactor_lag_and_detector(tmp_path: Path) -> None:
    """A yima node's /api/status has reactor_lag {max_ms, p99_ms} and the detector fields."""
    secret = tmp_path / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    host = HOST.format(9)
    node = NodeProc(
        "yima", "y9", host, tmp_path / "y9" / "data", PORT, ADMIN,
        extra=["--disk", str(tmp_path / "y9" / "a"), "--rtsp", f"tcp:18554:interface={host}"],
        secret_file=secret,
    )  # fmt: skip
    try:
        node.start()
        doc = wait_for(node.status, 30, "the yima node to answer")
        assert doc["kind"] == "yima"
        lag = reactor_lag(node)
        assert set(lag) == {"max_ms", "p99_ms"} and 0.0 <= lag["p99_ms"] <= lag["max_ms"]
        assert {"local_health", "udp_rcvbuf"} <= set(doc["membership"])
    finally:
        node.kill(signal.SIGTERM)
