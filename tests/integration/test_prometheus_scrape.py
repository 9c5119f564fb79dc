"""A real Prometheus server (Debian's package) scrapes every node of the demo cluster."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

from yimaporc.testing.procs import wait_for

PROM = "127.0.1.200:9090"
TARGETS = ["127.0.1.1:8080", "127.0.1.2:8080", "127.0.2.1:8080"]


def api(path: str) -> Any:
    """Prometheus's HTTP API answer for ``path`` (its ``data``), or None while it is down."""
    try:
        with urllib.request.urlopen(f"http://{PROM}{path}", timeout=5) as r:
            return json.load(r)["data"]
    except OSError:
        return None


def health() -> dict[str, str]:
    """Scrape health per target as Prometheus sees it."""
    data = api("/api/v1/targets") or {"activeTargets": []}
    return {t["labels"]["instance"]: t["health"] for t in data["activeTargets"]}


def test_prometheus_scrapes_every_demo_node_and_sees_one_go(tmp_path: Path) -> None:
    """local-cluster with 2 mail and 1 media node: Prometheus finds all three up with the
    yimaporc metrics; after SIGTERM of the cluster every target is down."""
    cluster = subprocess.Popen(
        [sys.executable, "-m", "yimaporc.cli", "local-cluster", "--porcupine", "2", "--yima", "1",
         "--base-dir", str(tmp_path / "demo")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    lines: list[str] = []
    threading.Thread(
        target=lambda: [lines.append(x.strip()) for x in cluster.stdout or []], daemon=True
    ).start()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: yimaporc\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: {json.dumps(TARGETS)}\n"
    )
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address={PROM}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: "ready" in lines or cluster.poll() is not None, 120, "the demo cluster")
        assert "ready" in lines, lines
        wait_for(lambda: set(health().values()) == {"up"} and len(health()) == 3, 60, "3 up")
        members = api("/api/v1/query?query=yimaporc_membership_members")
        got = {r["metric"]["instance"]: float(r["value"][1]) for r in members["result"]}
        assert got == {"127.0.1.1:8080": 2.0, "127.0.1.2:8080": 2.0, "127.0.2.1:8080": 1.0}
        lag = api("/api/v1/query?query=yimaporc_reactor_lag_max_seconds")
        assert lag is not None and len(lag["result"]) == 3
    finally:
        cluster.send_signal(signal.SIGTERM)
        cluster.wait(timeout=60)
    try:
        wait_for(lambda: set(health().values()) == {"down"}, 30, "every target down")
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
