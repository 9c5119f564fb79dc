"""Workloads for the replication scenario (:mod:`.replication`) and the figures quoted in
docs/replication.md (``python -m yimaporc.sim.replication_figures`` prints them)."""

from __future__ import annotations

from .replication import Faults, ReplicationSim

__all__ = [
    "catch_up_time",
    "main",
    "messages_per_update",
    "random_workload",
    "steady_log_size",
]


def random_workload(
    sim: ReplicationSim,
    *,
    objects: int,
    updates: tuple[int, int] = (1, 4),
    replicas: tuple[int, int] = (1, 3),
    window: float = 2.0,
    delete: float = 0.2,
    prefix: str = "o",
) -> None:
    """Schedule agent updates: each object gets a fixed replica set and a few updates."""
    rng = sim.rng
    nodes = sorted(sim.nodes)
    for k in range(objects):
        r = min(rng.randint(*replicas), len(nodes))
        targets = rng.sample(nodes, r)
        for j in range(rng.randint(*updates)):
            body = None if j and rng.random() < delete else f"{prefix}{k}.{j}".encode()
            sim.submit_at(sim.now + rng.uniform(0, window), f"{prefix}{k}", body, targets)


def messages_per_update(r: int, *, loss: float = 0.0, updates: int = 300, seed: int = 1) -> float:
    """Replication messages (Push+Ack+Retire) per update with ``r`` replicas."""
    sim = ReplicationSim(seed, max(r, 3), faults=Faults(loss=loss))
    nodes = sorted(sim.nodes)[:r]
    for k in range(updates):
        sim.submit_at(sim.now + k * 0.01, f"m{k}", b"body", nodes)
    sim.run_until(sim.now + updates * 0.01)
    sim.run_until_quiet(600)
    return sum(sim.sent.values()) / updates


def catch_up_time(n: int, *, seed: int = 1, disk_time: float = 0.0) -> float:
    """Simulated seconds for a restarted replica to receive ``n`` updates it missed."""
    sim = ReplicationSim(seed, 3, disk_time=disk_time)
    sim.crash("n2")
    sim.run_until(sim.now + 0.1)
    for k in range(n):
        sim.submit(f"m{k}", b"x" * 100, ["n0", "n1", "n2"], via=sim.rng.choice(["n0", "n1"]))
    sim.run_until(sim.now + 5 + 3 * n * disk_time)
    sim.restart("n2")
    took = sim.run_until_quiet(3600, step=0.001)
    assert took is not None
    return took


def steady_log_size(
    rate: float, *, nodes: int = 5, r: int = 3, seconds: float = 20.0, down: bool = False
) -> tuple[float, int]:
    """Mean and max log entries per node under ``rate`` updates/s (optionally one node down)."""
    sim = ReplicationSim(1, nodes, faults=Faults(loss=0.01))
    if down:
        sim.crash(f"n{nodes - 1}")
    names = sorted(sim.nodes)
    t0 = sim.now
    k = 0
    samples: list[int] = []
    while sim.now < t0 + seconds:
        for _ in range(int(rate * 0.1)):
            targets = sim.rng.sample(names, r)
            sim.submit_at(sim.now + sim.rng.uniform(0, 0.1), f"m{k}", b"x", targets)
            k += 1
        sim.run_until(sim.now + 0.1)
        samples.extend(len(n.disk.log.entries) for n in sim.nodes.values() if n.up)
    return sum(samples) / len(samples), max(samples)


def main() -> None:
    """Print the figures quoted in docs/replication.md."""
    print("messages per update (Push+Ack+Retire), latency 0.5-5 ms")
    for r in (1, 2, 3, 5):
        clean = messages_per_update(r)
        lossy = messages_per_update(r, loss=0.1)
        print(f"  R={r}: {clean:.2f} no loss, {lossy:.2f} with 10% loss")
    print("catch-up of a restarted replica (simulated s; disk: instant / 2 ms per write)")
    for n in (100, 1000, 10000):
        fast, slow = catch_up_time(n), catch_up_time(n, disk_time=0.002)
        print(f"  {n} updates: {fast:.3f} s / {slow:.2f} s")
    print("log entries per node under steady load (5 nodes, R=3, 1% loss)")
    for rate in (100, 1000):
        mean, peak = steady_log_size(rate)
        mean_d, peak_d = steady_log_size(rate, down=True)
        print(
            f"  {rate}/s: mean {mean:.1f} max {peak}; one node down 20 s: "
            f"mean {mean_d:.0f} max {peak_d}"
        )


if __name__ == "__main__":
    main()
