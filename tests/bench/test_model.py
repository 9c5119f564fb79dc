"""bench/model.py: the cost model's scaling has the shape the designs predict.

The model runs on documented constants here (no results JSON), seeded, so every
figure replays; the checks are the properties that would break if a cost were
charged to the wrong node.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from mailmodel.mailsim import CpuCost, MailConfig, MailSim

from yimaporc.porcupine.reconstruct import READ_LEASE

MODEL = Path(__file__).resolve().parents[2] / "bench" / "model.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("yimaporc_bench_model", MODEL)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


model = load()


@pytest.fixture(scope="module")
def inp() -> dict[str, Any]:
    return model.inputs({}, Path("/nonexistent.json"))  # type: ignore[no-any-return]


def test_inputs_say_where_each_figure_came_from(inp: dict[str, Any]) -> None:
    assert inp["clip_mbps"]["source"].startswith("constant")
    assert inp["yima_send_s_per_packet"]["value"] > 0
    run = {"yima": {"bipartite-1": {"server_cpu_pct_per_stream": 3.0}}}
    got = model.inputs(run, Path("/nonexistent.json"))
    assert got["yima_cpu_pct_per_stream"] == {"value": 3.0, "source": "measured, this run"}


@pytest.fixture(scope="module")
def yima(inp: dict[str, Any]) -> dict[str, Any]:
    return model.yima_table(inp, quick=True, nodes=[1, 2, 8])  # type: ignore[no-any-return]


def test_yima2_fanout_grows_about_linearly(yima: dict[str, Any]) -> None:
    one, two, eight = yima["fanout"]
    assert one >= 5
    assert 1.6 * one <= two <= 2.2 * one
    assert eight >= 5 * one


def test_yima1_master_slave_saturates_at_its_master(yima: dict[str, Any]) -> None:
    one, _, eight = yima["master-slave"]
    assert yima["fanout"][0] == one == yima["relay"][0]  # one node: the same server
    assert eight <= 1.5 * one  # far below 8 x
    assert eight < yima["relay"][2] < yima["fanout"][2]


def rate(inp: dict[str, Any], n: int, r: int) -> float:
    return model.porcupine_rate(n, r, inp, seed=1, window=0.5)  # type: ignore[no-any-return]


def test_porcupine_grows_with_nodes_and_replicas_cost(inp: dict[str, Any]) -> None:
    r1 = [rate(inp, n, 1) for n in (1, 4)]
    assert r1[1] > 2 * r1[0]
    assert rate(inp, 4, 2) < 0.85 * r1[1]


def test_mailsim_replicas_store_every_copy_and_keep_invariants() -> None:
    cfg = MailConfig(replicas=2, cpu=CpuCost(smtp=0.001, rpc=0.0005, store=0.001, log=0.0002))
    sim = MailSim(4, 3, cfg)
    sim.converge()
    sim.start_exchange()  # as MailCluster.startService: the read lease is renewed from boot
    sim.net.run_until(sim.net.now + READ_LEASE)  # moved buckets wait for old read leases
    per_s = sim.closed_loop(20, 0.5, warmup=0.1)
    sim.net.run_until(sim.net.now + 1.0)
    assert per_s > 100
    stores = sum(m.stores for m in sim.mail.values())
    assert stores >= 2 * len(sim.acked)
    assert not sim.mailbox_problems() + sim.fragment_problems()
    assert all(m.cpu_busy > 0 for m in sim.mail.values())
