"""Real nodes on 127.0.127.x: Prometheus ``/metrics`` and the dashboard in headless Chromium.

Three ``porcupine-node`` processes; every node's ``/metrics`` parses with
prometheus_client's own parser and agrees with its ``/api/status``; Debian's
Chromium loads ``/`` from one node, runs its JavaScript without an error and shows
all three nodes up; after SIGKILL of one node the page shows it unreachable or gone.
The operator CLI (``mail users``, ``status --watch``, ``media rm``, ``--json``) runs
against the same real nodes; a yima pair covers the yima metrics, ``media rm`` and the
dashboard's disks, streaming and running-sessions tables while a player streams.

``YIMAPORC_SCREENSHOTS=DIR`` writes the screenshots docs/ shows (dashboard.png,
dashboard-node-down.png, dashboard-yima.png) into DIR.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from yimaporc.testing.chromium import Browser, Page
from yimaporc.testing.procs import NodeProc, mail_node, three_nodes, views_agree, wait_for
from yimaporc.yima.media.sample import make_sample_ts

PORT, ADMIN, SMTP, RTSP = 7946, 8080, 2525, 8554
ROW = re.compile(r'<tr[^>]*data-node="([^"]+)"[^>]*data-health="([^"]+)"')


def host(i: int) -> str:
    return f"127.0.127.{i}"


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


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    """A headless Chromium driven over the DevTools protocol (real time, one live page)."""
    b = Browser(chromium(), tmp_path / "live-profile")
    try:
        yield b
    finally:
        b.close()


MEMBERS = """Object.fromEntries(Array.from(document.querySelectorAll("#members tbody tr"))
             .map(tr => [tr.dataset.node, tr.dataset.health]))"""
BUCKETS = """Object.fromEntries(Array.from(document.querySelectorAll("#bucket-map span"))
             .map(s => [s.dataset.member, +s.dataset.buckets]))"""
SESSIONS = """Array.from(document.querySelectorAll("#session-table tbody tr"))
              .map(tr => Array.from(tr.cells).map(td => td.textContent))"""


def points(page: Page, chart: str) -> int:
    """Samples drawn on the chart ``chart`` (0 while it does not exist)."""
    got = page.evaluate(
        f"(document.getElementById('chart-{chart}') || {{dataset: {{}}}}).dataset.points"
    )
    return int(got or 0)


def page_errors(page: Page) -> list[str]:
    """What the page caught itself (its #errors box) and what Chromium reported."""
    caught = page.evaluate("document.getElementById('errors').textContent") or ""
    return ([caught] if caught.strip() else []) + page.errors()


def screenshot(name: str) -> Path | None:
    """Where to write the screenshot ``name`` (``YIMAPORC_SCREENSHOTS``), if asked."""
    folder = os.environ.get("YIMAPORC_SCREENSHOTS")
    return Path(folder) / name if folder else None


def segments(dom: str) -> dict[str, int]:
    """member -> buckets of the bucket-map bar."""
    return {
        m: int(n)
        for m, n in re.findall(r'<span[^>]*data-member="([^"]+)"[^>]*data-buckets="(\d+)"', dom)
    }


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
        # the mail cluster talks over RPC: calls and their latency histogram by command
        assert sum(got["yimaporc_rpc_calls_total"].values()) > 0
        counts = got["yimaporc_rpc_call_duration_seconds_count"]
        assert counts == {k: v for k, v in got["yimaporc_rpc_calls_total"].items()}


def send_mail(node: NodeProc, n: int) -> None:
    """``n`` messages to ops@example.org over SMTP to ``node``."""
    with smtplib.SMTP(node.host, SMTP, timeout=30) as s:
        for i in range(n):
            s.sendmail("a@remote.test", ["ops@example.org"], f"Subject: {i}\r\n\r\nhi\r\n")


def test_dashboard_shows_cluster_and_a_killed_node(
    cluster: list[NodeProc], browser: Browser
) -> None:
    """One live page in Chromium shows all three nodes up, the bucket map, mail rates and
    replication lag, with charts filling over real seconds and no JS error; after SIGKILL
    of p3 the same page shows p3 unreachable or gone, then the bucket map without p3.
    Mail sent meanwhile moves the delivery histogram and the SMTP counters in /metrics."""
    p1 = cluster[0]
    run_cli(p1, "mail", "adduser", "ops@example.org", "--password", "pw", "--replicas", "2")
    send_mail(p1, 3)
    got = scrape(p1)
    assert got["yimaporc_mail_delivery_duration_seconds_count"][()] == 3
    assert got["yimaporc_mail_sessions_total"][(("protocol", "smtp"),)] >= 1
    assert got["yimaporc_mail_commands_total"][(("protocol", "smtp"),)] >= 3 * 3 + 1
    assert got["yimaporc_reactor_lag_seconds_count"][()] > 0
    assert got["yimaporc_membership_suspicions_total"][()] >= 0
    page = browser.open(p1.admin_url + "/")
    wait_for(lambda: page.evaluate(MEMBERS) == {"p1": "up", "p2": "up", "p3": "up"}, 30,
             "the page to show three nodes up", interval=0.5)  # fmt: skip
    buckets = page.evaluate(BUCKETS)
    assert set(buckets) == {"p1", "p2", "p3"} and sum(buckets.values()) == 256
    text = page.evaluate("document.body.innerText")
    assert "Mail (Porcupine)" in text and "replication lag" in text
    send_mail(p1, 5)  # between two polls: a rate to show
    # two polls or more per node on the charts: they draw lines, not dots
    wait_for(lambda: points(page, "mail") >= 3 and points(page, "lag") >= 9, 40,
             "the charts to fill", interval=0.5)  # fmt: skip
    accepted = page.evaluate(
        "document.querySelector('#mail-table tr[data-node=\"p1\"]').cells[2].textContent"
    )
    assert accepted == "8"
    assert page_errors(page) == []
    shot = screenshot("dashboard.png")
    if shot:  # for docs/: half a minute of mail on the charts first
        wait_for(lambda: send_mail(p1, 2) or points(page, "mail") >= 45, 120, "30 s of mail",
                 interval=0.3)  # fmt: skip
        page.screenshot(shot)
    cluster[2].kill(signal.SIGKILL)
    wait_for(lambda: page.evaluate(MEMBERS).get("p3") in ("unreachable", "gone"), 30,
             "the same page to show p3 down", interval=0.5)  # fmt: skip
    members = page.evaluate(MEMBERS)
    assert members["p1"] == "up" and members["p2"] in ("up", "degraded")
    wait_for(lambda: set(page.evaluate(BUCKETS)) == {"p1", "p2"}, 60,
             "the bucket map to drop p3", interval=0.5)  # fmt: skip
    assert sum(page.evaluate(BUCKETS).values()) == 256
    assert page_errors(page) == []
    shot = screenshot("dashboard-node-down.png")
    if shot:
        page.screenshot(shot)


def run_cli(node: NodeProc, *args: str) -> str:
    """``yimaporc ARGS --admin node`` in a child process; its stdout (must exit 0)."""
    argv = [sys.executable, "-m", "yimaporc.cli", *args, "--admin", node.admin_url]
    argv += ["--secret-file", str(node.secret_file)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_operator_cli_on_real_mail_nodes(cluster: list[NodeProc]) -> None:
    """adduser --json, mail users (and its alias list) with the token, status --watch
    --count 2 --json against real nodes; /metrics then counts the user."""
    p1, p2, _ = cluster
    added = json.loads(run_cli(p1, "mail", "adduser", "ops@example.org", "--password", "pw",
                               "--json"))  # fmt: skip
    assert isinstance(added, dict)
    users = json.loads(run_cli(p2, "mail", "users", "--json"))["users"]
    assert [u["address"] for u in users] == ["ops@example.org"]
    assert run_cli(p2, "mail", "list").split()[0] == "ops@example.org"
    lines = run_cli(p2, "status", "--watch", "--count", "2", "--interval", "0.2", "--json")
    docs = [json.loads(line) for line in lines.splitlines()]
    assert [d["node_id"] for d in docs] == ["p2", "p2"] and docs[1]["uptime"] > docs[0]["uptime"]
    wait_for(lambda: scrape(p1)["yimaporc_mail_users"][()] == 1, 20, "metrics to count the user")


YIMA_HOST = "127.0.127.{}"


@pytest.fixture
def yima_pair(tmp_path: Path) -> Iterator[list[NodeProc]]:
    """Two yima nodes on 127.0.113.11-12 with two --disk each."""
    secret = tmp_path / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    nodes = []
    for i in (1, 2):
        h = YIMA_HOST.format(10 + i)
        extra = ["--disk", str(tmp_path / f"y{i}" / "a"), "--disk", str(tmp_path / f"y{i}" / "b"),
                 "--rtsp", f"tcp:{RTSP}:interface={h}"]  # fmt: skip
        join = [] if i == 1 else [f"{YIMA_HOST.format(11)}:{PORT}"]
        nodes.append(NodeProc("yima", f"y{i}", h, tmp_path / f"y{i}" / "data", PORT, ADMIN,
                              extra=extra, join=join, secret_file=secret))  # fmt: skip
    try:
        for n in nodes:
            n.start()
        wait_for(lambda: views_agree(nodes), 40, "two yima nodes to agree")
        wait_for(
            lambda: all(len((n.status() or {}).get("disks", [])) == 4 for n in nodes),
            40,
            "four disks registered",
        )
        yield nodes
    finally:
        for n in nodes:
            n.kill(signal.SIGTERM)


def test_yima_metrics_media_rm_and_dashboard(yima_pair: list[NodeProc], tmp_path: Path) -> None:
    """Yima /metrics has the disks and catalog; media rm --json deletes every block of a
    title on both nodes; the dashboard shows the four disks and both nodes up."""
    y1, y2 = yima_pair
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(300_000))
    run_cli(y1, "media", "ingest", str(blob), "--opaque", "--block-size", "8192")
    placed = sum(scrape(y2)["yimaporc_yima_disk_blocks"].values())
    assert placed > 300_000 // 8192
    got = scrape(y2)
    assert got["yimaporc_yima_media"][()] == 1
    assert len(got["yimaporc_yima_disk_blocks"]) == 4
    assert got["yimaporc_yima_packets_sent_total"][()] == 0
    out = json.loads(run_cli(y2, "media", "rm", "blob", "--json"))
    assert out == {"name": "blob", "blocks_deleted": placed, "blocks_not_reached": 0}
    assert json.loads(run_cli(y1, "media", "list", "--json"))["media"] == []
    files = [p for p in tmp_path.glob("y*/[ab]/**/*") if p.suffix in (".blk", ".par")]
    assert files == []
    wait_for(lambda: scrape(y1)["yimaporc_yima_media"][()] == 0, 20, "y1 to see the catalog")
    dom, log = browse(y1.admin_url + "/", tmp_path / "profile")
    assert js_errors(dom, log) == []
    assert rows(dom) == {"y1": "up", "y2": "up"}
    assert sorted(re.findall(r'data-disk="([^"]+)"', dom)) == ["y1-0", "y1-1", "y2-0", "y2-1"]
    assert "Media (Yima)" in dom


def test_dashboard_shows_running_sessions_while_a_player_streams(
    yima_pair: list[NodeProc], tmp_path: Path, browser: Browser
) -> None:
    """While ``yimaporc play`` streams a clip from both nodes, a live page lists the
    session (its media, both nodes serving it, its bit rate, packets sent) and the disks'
    fill, without a JS error; /metrics counts block-cache misses and late packets."""
    y1, y2 = yima_pair
    shot = screenshot("dashboard-yima.png")
    seconds = 40 if shot else 20  # for docs/: long enough to chart half a minute of it
    clip = make_sample_ts(tmp_path / "clip.ts", seconds)
    run_cli(y1, "media", "ingest", str(clip), "--name", "clip", "--block-size", "13160")
    player = subprocess.Popen(
        [sys.executable, "-m", "yimaporc.cli", "play", f"rtsp://{y1.host}:{RTSP}/clip",
         "--duration", str(seconds - 5), "--bind", YIMA_HOST.format(30), "--out", str(tmp_path / "out.ts"),
         "--stats", str(tmp_path / "stats.json")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:

        def serving() -> bool:
            return all((n.status() or {}).get("streaming", {}).get("running") for n in yima_pair)

        wait_for(serving, 30, "both nodes to serve the session")
        page = browser.open(y2.admin_url + "/")

        def session_with_rate() -> list[str] | None:
            rows = page.evaluate(SESSIONS)
            return rows[0] if len(rows) == 1 and rows[0][3] not in ("", "\u2013") else None

        cells = wait_for(session_with_rate, 30, "the session and its bit rate", interval=0.5)
        assert cells[1] == "clip" and cells[2] == "y1, y2"
        assert float(cells[3]) > 0 and int(cells[4]) > 0
        disks = page.evaluate("Array.from(document.querySelectorAll('#disk-table tr[data-disk]'))"
                              ".map(tr => tr.dataset.disk)")  # fmt: skip
        assert sorted(disks) == ["y1-0", "y1-1", "y2-0", "y2-1"]
        got = scrape(y1)
        assert got["yimaporc_yima_block_cache_misses_total"][()] > 0
        assert () in got["yimaporc_yima_block_cache_hits_total"]
        assert () in got["yimaporc_yima_late_packets_total"]
        assert got["yimaporc_yima_sessions"][(("mode", "bipartite"),)] == 1
        wait_for(lambda: points(page, "mbits") >= 4, 30, "the bit-rate chart", interval=0.5)
        assert page_errors(page) == []
        if shot:  # for docs/: half a minute on the charts first
            wait_for(lambda: points(page, "mbits") >= 30, 60, "the clip's charts", interval=0.5)
            page.screenshot(shot)
    finally:
        player.kill()
        player.wait()
