"""Real nodes on 127.0.113.x: Prometheus ``/metrics`` and the dashboard in headless Chromium.

Three ``porcupine-node`` processes; every node's ``/metrics`` parses with
prometheus_client's own parser and agrees with its ``/api/status``; Debian's
Chromium loads ``/`` from one node, runs its JavaScript without an error and shows
all three nodes up; after SIGKILL of one node the page shows it unreachable or gone.
A yima pair does the same for the yima metrics and the disks table.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from yimaporc.testing.procs import NodeProc, mail_node, three_nodes, views_agree, wait_for

PORT, ADMIN, SMTP = 7946, 8080, 2525
ROW = re.compile(r'<tr[^>]*data-node="([^"]+)"[^>]*data-health="([^"]+)"')


def host(i: int) -> str:
    return f"127.0.113.{i}"


def make_node(tmp_path: Path, i: int, secret: Path) -> NodeProc:
    join = [] if i == 1 else [f"{host(1)}:{PORT}"]
    ports = {"cluster": PORT, "admin": ADMIN, "smtp": SMTP}
    return mail_node(tmp_path, f"p{i}", host(i), ports, secret, join)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[NodeProc]]:
    with three_nodes(tmp_path, make_node) as (nodes, _):
        wait_for(lambda: views_agree(nodes), 40, "three nodes to agree")
        yield nodes


def chromium() -> str:
    """Debian's chromium (the Makefile installs it); skipped only outside CI."""
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required under CI (make install)")
        pytest.skip("chromium not installed")
    return path


def browse(url: str, profile: Path, *, screenshot: Path | None = None) -> tuple[str, str]:
    """Load ``url`` in headless Chromium, let its scripts run ~6 s of (virtual) time, and
    return (the DOM as serialized then, Chromium's stderr with console messages)."""
    args = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
        "--virtual-time-budget=6000", "--window-size=1300,1500",
    ]  # fmt: skip
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    done = subprocess.run([*args, url], capture_output=True, text=True, timeout=90, check=False)
    return done.stdout, done.stderr


def rows(dom: str) -> dict[str, str]:
    """node_id -> health of the members table."""
    return dict(ROW.findall(dom))


def js_errors(dom: str, log: str) -> list[str]:
    """JavaScript errors the page caught itself or Chromium's console reported."""
    found = re.search(r'<div id="errors">(.*?)</div>', dom, re.S)
    caught = [found.group(1)] if found and found.group(1).strip() else []
    console = [line for line in log.splitlines() if "CONSOLE" in line and "rror" in line]
    return caught + console


def scrape(node: NodeProc) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``/metrics`` parsed by prometheus_client: sample name -> {labels: value}."""
    with urllib.request.urlopen(node.admin_url + "/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode("utf-8")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_parse_and_match_status(cluster: list[NodeProc]) -> None:
    """Every node's /metrics is valid Prometheus text and agrees with its /api/status."""
    for node in cluster:
        doc = node.status()
        assert doc is not None
        got = scrape(node)
        assert got["yimaporc_membership_epoch"][()] == doc["epoch"]
        assert got["yimaporc_membership_members"][()] == 3
        assert got["yimaporc_membership_view_changes_total"][()] >= 1
        info = got["yimaporc_node_info"]
        assert info == {
            (("cluster", "porcupine"), ("kind", "porcupine"), ("node_id", node.node_id)): 1
        }
        buckets = got["yimaporc_mail_buckets"]
        assert {dict(k)["member"] for k in buckets} == {"p1", "p2", "p3"}
        assert sum(buckets.values()) == 256
        assert got["yimaporc_membership_datagrams_received_total"][()] > 0
        assert (("reason", "bad_mac"),) in got["yimaporc_membership_datagrams_dropped_total"]
        assert got["yimaporc_mail_replication_state"][(("state", "running"),)] == 1
        assert got["yimaporc_mail_outbound_queue_length"][()] == 0
        assert got["yimaporc_admin_refused_requests_total"][(("status", "401"),)] == 0


def test_dashboard_shows_cluster_and_a_killed_node(cluster: list[NodeProc], tmp_path: Path) -> None:
    """Chromium renders / with all three nodes up, no JS error; after SIGKILL of p3 the
    page shows p3 unreachable or gone and the others up."""
    url = cluster[0].admin_url + "/"
    dom, log = browse(url, tmp_path / "profile")
    assert js_errors(dom, log) == []
    assert rows(dom) == {"p1": "up", "p2": "up", "p3": "up"}, dom[-3000:]
    assert "Mail (Porcupine)" in dom and "bucket map" in dom
    shot = os.environ.get("YIMAPORC_DASHBOARD_PNG")
    if shot:
        browse(url, tmp_path / "profile", screenshot=Path(shot))
    cluster[2].kill(signal.SIGKILL)

    def p3_down() -> dict[str, str] | None:
        dom, log = browse(url, tmp_path / "profile")
        assert js_errors(dom, log) == []
        got = rows(dom)
        return got if got.get("p3") in ("unreachable", "gone") else None

    got = wait_for(p3_down, 60, "the page to show p3 down", interval=1.0)
    assert got["p1"] == "up" and got["p2"] in ("up", "degraded")
