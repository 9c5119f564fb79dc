"""`yimaporc play` against 3 real `twistd yima-node` processes (fan-out, NACKs, two streams)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from yimaporc.testing.procs import NodeProc, views_agree, wait_for
from yimaporc.yima.media.sample import make_sample_ts

NET = "127.0.61"
RTSP = 18554
CLIENT = f"{NET}.9"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """3 nodes, a 4 s clip ingested, then three plays at once: 3% drop, no drop, two URLs."""
    tmp = tmp_path_factory.mktemp("player")
    clip = make_sample_ts(tmp / "clip.ts", 4)
    secret = tmp / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    nodes = [
        NodeProc(
            "yima", f"y{i}", f"{NET}.{i}", tmp / f"y{i}" / "data", 17946, 18080,
            extra=["--rtsp", f"tcp:{RTSP}:interface={NET}.{i}"],
            join=[] if i == 1 else [f"{NET}.1:17946"], secret_file=secret,
        )
        for i in (1, 2, 3)
    ]  # fmt: skip
    for n in nodes:
        n.start()
    try:
        wait_for(lambda: views_agree(nodes), 30, "3 yima nodes to agree")
        wait_for(lambda: all(len((n.status() or {}).get("disks", [])) == 3 for n in nodes), 30,
                 "disks")  # fmt: skip
        subprocess.run(
            [sys.executable, "-m", "yimaporc.cli", "media", "ingest", str(clip), "--name", "clip",
             "--block-size", "13160", "--admin", nodes[0].admin_url, "--secret-file", str(secret)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        url = [f"rtsp://{NET}.{i}:{RTSP}/clip" for i in (1, 2, 3)]
        plays = {
            "drop": [url[0], "--drop", "0.03", "--seed", "1"],
            "clean": [url[1], "--drop", "0"],
            "two": [url[2], url[0], "--drop", "0.01", "--seed", "2"],
        }
        procs = {}
        for name, argv in plays.items():
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "yimaporc.cli", "play", *argv, "--bind", CLIENT,
                 "--out", str(tmp / f"{name}.ts"), "--stats", str(tmp / f"{name}.json")],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
        out: dict[str, Any] = {"clip": clip, "tmp": tmp}
        for name, p in procs.items():
            try:
                _, err = p.communicate(timeout=60)
            finally:
                p.kill()
            assert p.returncode == 0, f"{name}: {err.decode()}"
            out[name] = json.loads((tmp / f"{name}.json").read_text())
            print(name, err.decode().strip())
        out["rtcp"] = [(n.status() or {}).get("streaming", {}).get("rtcp", {}) for n in nodes]
        yield out
    finally:
        for n in nodes:
            n.kill(signal.SIGTERM)


CONTRACT_KEYS = {
    "packets_expected", "packets_received", "packets_dropped_simulated", "nacks_sent",
    "retransmissions_received", "packets_missing_at_playout", "late_packets", "underflows",
    "max_sync_skew_ms", "nodes_seen", "buffer_levels",
}  # fmt: skip


def test_three_percent_drop_is_recovered_by_nacks(runs: dict[str, Any]) -> None:
    """--drop 0.03: NACKs to the nodes recover the loss; <= 0.1% missing, no underflow."""
    s = runs["drop"]
    assert CONTRACT_KEYS <= set(s)
    assert s["packets_expected"] > 100
    assert s["packets_dropped_simulated"] > 0 and s["nacks_sent"] > 0
    assert s["retransmissions_received"] > 0
    assert s["packets_missing_at_playout"] <= 0.001 * s["packets_expected"]
    assert s["underflows"] == 0 and s["nodes_seen"] == 3
    assert all(len(x) == 2 for x in s["buffer_levels"]) and s["buffer_levels"]
    rtcp = runs["rtcp"]
    assert sum(r.get("resent", 0) for r in rtcp) >= s["retransmissions_received"]
    assert sum(1 for r in rtcp if r.get("feedback_applied", 0) > 0) == 3, rtcp


def test_lossless_play_is_byte_identical(runs: dict[str, Any]) -> None:
    """--drop 0: the --out file is the ingested MPEG-TS, byte for byte."""
    s = runs["clean"]
    assert s["packets_missing_at_playout"] == 0 and s["nodes_seen"] == 3
    assert (runs["tmp"] / "clean.ts").read_bytes() == Path(runs["clip"]).read_bytes()


def test_two_streams_play_in_sync(runs: dict[str, Any]) -> None:
    """Two URLs as one presentation: skew under one frame (33 ms); both outputs complete."""
    s = runs["two"]
    print("max_sync_skew_ms", s["max_sync_skew_ms"], "mean", s.get("mean_sync_skew_ms"))
    assert 0 <= s["max_sync_skew_ms"] < 33
    assert s["packets_missing_at_playout"] == 0 and len(s["streams"]) == 2
    src = Path(runs["clip"]).read_bytes()
    assert (runs["tmp"] / "two.ts").read_bytes() == src
    assert (runs["tmp"] / "two.ts.1").read_bytes() == src
