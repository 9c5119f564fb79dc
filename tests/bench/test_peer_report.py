"""bench/parts: a streaming ramp's figures against GStreamer's and issue 19's one-node
targets, from synthetic load-generator output (no process is started)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def parts() -> dict[str, ModuleType]:
    sys.path.insert(0, str(BENCH))  # bench/ is a directory of scripts, parts/ its package
    try:
        from parts import common, loads, report
    finally:
        sys.path.remove(str(BENCH))
    return {"common": common, "loads": loads, "report": report}


def ramp_output(budget_cut: int, capped: int = 0) -> str:
    """rtsp_load.py --ramp's last lines: 256 passing at 115 % CPU, 1000 Mbit/s."""
    return (
        "    trial N=256 pass=True ok=256/256\n"
        "RESULT rtsp label=gstreamer max_sessions=256 first_fail=384 agg_mbps=1000.0 "
        "per_session_mbps=3.906 server_cpu_pct=115 gen_cpu_pct=18 sys_cpu_tick_pct=125 "
        "trials=3 elapsed_s=150 late_pkts=0 lost_pkts=0 expected_pkts=302110 bad_frac=0.00000 "
        f"late_max_ms=42 budget_cut={budget_cut} capped={capped}\n"
    )


def fake_ramp(
    parts: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stdout: str
) -> dict[str, Any]:
    loads = parts["loads"]

    def fake_run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 0, stdout, "")

    monkeypatch.setattr(loads, "run", fake_run)
    s = parts["common"].Settings(True)
    got: dict[str, Any] = loads.rtsp_ramp(
        s, "rtsp://x/test", "gstreamer", [1], 60.0, 128, tmp_path / "load.log"
    )
    return got


def test_a_converged_ramp_reports_capacity_and_cpu_per_stream(
    parts: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A ramp that found its limit gives its N, CPU % per stream and datagrams/core-s."""
    got = fake_ramp(parts, monkeypatch, tmp_path, ramp_output(0))
    assert got["max_sessions"] == 256
    assert got["server_cpu_pct_per_stream"] == pytest.approx(115 / 256)
    assert got["datagrams_per_core_s"] == pytest.approx(1000e6 / 8 / 1316 / 1.15)


@pytest.mark.parametrize("cut,capped", [(1, 0), (0, 1)])
def test_an_unfinished_ramp_fails_but_keeps_its_last_passing_trials_cpu(
    parts: dict[str, ModuleType],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    cut: int,
    capped: int,
) -> None:
    """Budget cut or capped: PartFailed whose row has CPU per stream but no capacity."""
    with pytest.raises(parts["common"].PartFailed) as e:
        fake_ramp(parts, monkeypatch, tmp_path, ramp_output(cut, capped))
    row = e.value.row()
    assert "limit was not found" in row["error"]
    assert "max_sessions" not in row
    assert row["passing_sessions"] == 256
    assert row["server_cpu_pct_per_stream"] == pytest.approx(115 / 256)


def measured(gst: dict[str, Any]) -> dict[str, Any]:
    return {
        "udp": {"gso": {"tx_pps_per_core": 1_000_000.0}},
        "rtsp": {"gstreamer": gst},
        "yima": {
            "bipartite-fanout-w1-1": {
                "mode": "bipartite-fanout",
                "nodes": 1,
                "max_sessions": 624.0,
                "server_cpu_pct_per_stream": 0.112,
                "datagrams_per_core_s": 280_000.0,
            },
            "bipartite-fanout-3": {"max_sessions": 900.0},
        },
    }


def test_cpu_ratio_is_made_against_a_peer_whose_limit_was_not_found(
    parts: dict[str, ModuleType],
) -> None:
    """GStreamer's ramp cut: no streams ratio, a CPU ratio noted as at its last passing N."""
    gst = {"error": "ran out of its time budget", "passing_sessions": 256.0}
    gst["server_cpu_pct_per_stream"] = 0.448
    rows = {r["metric"]: r for r in parts["report"].ratio_rows(measured(gst))}
    streams = rows["Yima bipartite-fanout-w1 x1: max streams"]
    assert streams["ratio"] is None and streams["peer_note"] == "FAILED"
    cpu = rows["Yima bipartite-fanout-w1 x1: CPU %/stream"]
    assert cpu["ratio"] == pytest.approx(0.112 / 0.448)
    assert "gstreamer" in cpu["note"] and "limit not found" in cpu["note"]


def test_one_node_targets_are_the_issues_ratios_in_one_run(
    parts: dict[str, ModuleType],
) -> None:
    """Streams >= 2x, CPU/stream <= 0.5x GStreamer's, datagrams/core-s >= 0.5x GSO's."""
    gst = {"max_sessions": 256.0, "server_cpu_pct_per_stream": 0.448}
    got = {t["name"]: t for t in parts["report"].single_node_targets(measured(gst))}
    assert set(got) == {
        "bipartite-fanout-w1: streams / GStreamer's",
        "bipartite-fanout-w1: CPU %/stream / GStreamer's",
        "bipartite-fanout-w1: datagrams per core-s / udp gso's",
    }
    assert got["bipartite-fanout-w1: streams / GStreamer's"]["value"] == pytest.approx(624 / 256)
    assert got["bipartite-fanout-w1: streams / GStreamer's"]["met"] is True
    assert got["bipartite-fanout-w1: CPU %/stream / GStreamer's"]["met"] is True
    dpc = got["bipartite-fanout-w1: datagrams per core-s / udp gso's"]
    assert dpc["value"] == pytest.approx(0.28) and dpc["met"] is False


def test_a_target_without_the_peers_figure_is_not_met(parts: dict[str, ModuleType]) -> None:
    """No GStreamer capacity (its ramp failed): the streams target is n/a and NOT met."""
    got = {t["name"]: t for t in parts["report"].single_node_targets(measured({"error": "x"}))}
    t = got["bipartite-fanout-w1: streams / GStreamer's"]
    assert t["value"] is None and t["met"] is False
