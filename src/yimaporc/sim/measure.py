"""Membership figures from the simulator: ``python -m yimaporc.sim.measure``.

The nodes are the shipped ``ClusterNode`` shells on the simulation kernel.

For each cluster size: time to converge at boot, time from a crash to the
survivors' new view (failure detection + one round), and the protocol
datagrams (NewGroup, Reply, Commit, Probe) one membership change costs.
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections import Counter

from .cluster import make_cluster
from .kernel import Faults

ROUND_TYPES = ("NewGroup", "Reply", "Commit", "Probe")


def _sent(net: object) -> Counter[str]:
    total: Counter[str] = Counter()
    for node in net.nodes.values():  # type: ignore[attr-defined]
        if node.core is not None:
            total.update(node.core.sent)
    return total


def measure(n: int, seed: int, loss: float) -> dict[str, float]:
    """One run: boot, settle, crash one node, settle."""
    net = make_cluster(n, seed, faults=Faults(loss=loss))
    boot = net.run_until_converged(120)
    if boot is None:
        raise RuntimeError(f"n={n} seed={seed}: no convergence at boot")
    net.run_until(net.now + 3.0)
    victim = random.Random(seed).choice(sorted(net.nodes))
    net.crash(victim)
    before = _sent(net)
    survivors = [x for x in net.nodes.values() if x.up]
    epoch0 = survivors[0].view.epoch
    change = net.run_until_converged(60)
    if change is None:
        raise RuntimeError(f"n={n} seed={seed}: no convergence after crash")
    after = _sent(net)
    msgs = sum(after[t] - before[t] for t in ROUND_TYPES)
    assert all(x.view.epoch > epoch0 for x in survivors)
    net.close()
    return {"boot": boot, "change": change, "msgs": msgs}


def main() -> None:
    """Print a table for 3, 10 and 30 nodes."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--loss", type=float, default=0.0)
    args = p.parse_args()
    print("nodes  boot_s(median)  crash_to_view_s(median,max)  round_datagrams_per_change(median)")
    for n in (3, 10, 30):
        runs = [measure(n, s, args.loss) for s in range(args.seeds)]
        boot = statistics.median(r["boot"] for r in runs)
        ch = [r["change"] for r in runs]
        msgs = statistics.median(r["msgs"] for r in runs)
        print(f"{n:5d}  {boot:14.2f}  {statistics.median(ch):10.2f} {max(ch):6.2f}  {msgs:10.0f}")


if __name__ == "__main__":
    main()
