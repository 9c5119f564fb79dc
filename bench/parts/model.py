"""Part ``model``: the cost model (bench/model.py), SIMULATED, fed with this run's costs."""

from __future__ import annotations

from typing import Any

from parts.common import Settings, model_module, say


def part_model(s: Settings, res: dict[str, Any], errors: list[str]) -> None:
    """Scaling with one core and one disk per node, simulated with the costs measured
    above (or, for a figure this run lacks, bench/results/ or the reference run's)."""
    try:
        out = model_module().run_model(res, s.quick)
    except Exception as e:  # a model bug must not hide the measured figures
        errors.append(f"cost model: {e!r}")
        res["model"] = {"error": repr(e)}
        return
    res["model"] = out
    y, p = out["yima"], out["porcupine"]
    say(
        f"  model (simulated): Yima-2 fan-out {y['fanout'][0]:.0f} -> {y['fanout'][-1]:.0f} "
        f"streams, Yima-1 {y['master-slave'][0]:.0f} -> {y['master-slave'][-1]:.0f}, "
        f"Porcupine R=1 {p['1'][0]:.0f} -> {p['1'][-1]:.0f} deliveries/s "
        f"({y['nodes'][0]} -> {y['nodes'][-1]} nodes; {out['elapsed_s']:.1f} s)"
    )
