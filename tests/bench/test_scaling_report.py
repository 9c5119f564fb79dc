"""bench/parts/scaling.py: the issues' scaling ratios, the printed table and the prediction,
from a synthetic measurement (no process is started)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def scaling() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # bench/ is a directory of scripts, parts/ its package
    try:
        from parts import scaling as mod
    finally:
        sys.path.remove(str(BENCH))
    return mod


def yrow(n: int, streams: float, cpu_per_stream: float) -> dict[str, Any]:
    return {
        "nodes": n,
        "max_sessions": streams,
        "server_cpu_pct_per_stream": cpu_per_stream,
        "node_cores": [0.09] * n,
        "quota": 0.1,
        "gen_cpu_pct": 12.0,
    }


def prow(n: int, rate: float, cpu_s: float) -> dict[str, Any]:
    return {
        "msgs_per_s": rate,
        "server_cpu_s_per_msg": cpu_s,
        "node_cores": [0.1] * n,
        "quota": 0.1,
        "gen_cpu_pct": [5.0] * n,
    }


@pytest.fixture
def measured() -> dict[str, Any]:
    one = yrow(1, 10, 1.0)
    return {
        "yima": {
            "quota": 0.1,
            "clip": {"mbps": 2.3},
            "fanout": {"1": one, "8": yrow(8, 72, 1.1)},
            "relay": {"1": one, "8": yrow(8, 30, 1.43)},
            "master-slave": {"1": one, "8": {"nodes": 8, "error": "ramp cut"}},
        },
        "porcupine": {
            "quota": 0.1,
            # two nodes only: the simulator's Porcupine at 8 full cores takes long
            "1": {"1": prow(1, 36.0, 0.00275), "2": prow(2, 240.0, 0.0032)},
            "2": {"2": prow(2, 150.0, 0.0053)},
            "3": {},
            "retrieval": {"1": {"msgs_per_s": 10.0}, "2": {"msgs_per_s": 70.0}},
        },
    }


def test_targets_are_the_issues_ratios_in_one_run(
    scaling: ModuleType, measured: dict[str, Any]
) -> None:
    """8/1 node ratios, relayed CPU per stream over fan-out's, replicas printed, met or not."""
    got = {t["name"]: t for t in scaling.targets(measured)}
    fan = got["Yima-2 fan-out streams at 8 nodes / at 1"]
    assert fan["value"] == pytest.approx(7.2) and fan["met"] is True
    ms = got["Yima-1 master-slave streams at 8 nodes / at 1"]
    assert ms["value"] is None and ms["met"] is False  # its 8-node ramp failed
    relay = got["relayed CPU per stream / fan-out's, 8 nodes"]
    assert relay["value"] == pytest.approx(1.3) and relay["met"] is True
    r1 = got["Porcupine deliveries/s at 2 nodes, replicas 1 / 1 node"]
    assert r1["value"] == pytest.approx(240 / 36) and r1["met"] is True
    r2 = got["Porcupine deliveries/s at 2 nodes, replicas 2 / 1 node"]
    assert r2["value"] == pytest.approx(150 / 36) and r2["met"] is None
    assert "Porcupine deliveries/s at 2 nodes, replicas 3 / 1 node" not in got
    assert got["Porcupine retrievals/s at 2 nodes / 1 node"]["value"] == pytest.approx(7.0)


def test_table_shows_failed_cells_and_unmet_targets(
    scaling: ModuleType, measured: dict[str, Any]
) -> None:
    """A failed ramp prints FAILED in its cell (never a number), an unmet target NOT met."""
    text = "\n".join(scaling.report_lines(measured))
    eight = [line for line in text.splitlines() if line.strip().startswith("8 ")]
    assert "FAILED" in eight[0] and "72" in eight[0]
    assert "NOT met" in text
    assert "0.1 core" in text


def test_prediction_scales_the_measured_costs_by_the_quota(
    scaling: ModuleType, measured: dict[str, Any]
) -> None:
    """The model's 1-node figures land near the measured ones; more nodes never predict less."""
    pred = scaling.predict(measured, quick=True)
    y, p = pred["yima"], pred["porcupine"]
    assert y["nodes"] == [1, 8] and p["nodes"] == [1, 2]
    assert 5 <= y["fanout"][0] <= 15  # measured 10 at 1 node
    assert y["fanout"][1] > 4 * y["fanout"][0]  # placement of ~40 blocks: not quite 8x
    assert y["master-slave"][1] < 2 * y["master-slave"][0]
    assert 25 <= p["1"][0] <= 50  # measured 36 at 1 node
    assert p["1"][1] > p["1"][0]
    assert p["2"][0] is None and p["2"][1] is not None and p["3"] == [None, None]


def test_plot_writes_a_png(scaling: ModuleType, measured: dict[str, Any], tmp_path: Path) -> None:
    """Measured and model lines for both systems land in one PNG."""
    measured["model"] = scaling.predict(measured, quick=True)
    out = tmp_path / "scaling.png"
    scaling.plot(measured, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_retrieval_users_spread_over_managers(scaling: ModuleType) -> None:
    """spread_users picks retrieval users whose managers (bucket owners) and homes are
    spread: on an 8-node map of contiguous ranges no node manages more than 2 of 10 users
    (pop001.. puts 3 on one; no other prefix can help, CRC-32 is affine), on 2 nodes 5 and
    5 (pop001..: 7 and 3); one node takes pop001.."""
    from yimaporc.cluster.buckets import BucketMap
    from yimaporc.porcupine.usermap import N_BUCKETS, bucket_of

    def owners_of(nodes: list[str]) -> list[str]:
        m = BucketMap.empty(N_BUCKETS)
        for k in range(1, len(nodes) + 1):
            m = m.reassign(nodes[:k], k)
        return list(m.owners)

    for n, most in ((8, 2), (2, 5)):
        nodes = [f"pb{i}" for i in range(1, n + 1)]
        owners = owners_of(nodes)
        naive = [owners[bucket_of(f"pop{u:03d}@bench.test")] for u in range(1, 11)]
        assert max(naive.count(x) for x in nodes) > most
        first, per_node = scaling.spread_users(owners, nodes, 10)
        assert sum(per_node) == 10 and max(per_node) <= most
        managed = [owners[bucket_of(f"pop{first + u:03d}@bench.test")] for u in range(1, 11)]
        assert [managed.count(x) for x in nodes] == per_node
    assert scaling.spread_users(["pb1"] * N_BUCKETS, ["pb1"], 10) == (0, [10])
