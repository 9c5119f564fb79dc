"""bench/parts/cgroup.py: scaled-down nodes, each process in its own CPU group with a quota.

The fake-root tests use a plain directory for the hierarchy (the wrapper's PID write
and the quota files are ordinary files there); the last test uses the real cgroup v1
CPU controller and checks that the kernel holds a busy loop to its quota.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from yimaporc.testing.procs import wait_for

CGROUP = Path(__file__).resolve().parents[2] / "bench" / "parts" / "cgroup.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("yimaporc_bench_cgroup", CGROUP)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


cg = load()

WAIT_STDIN = [sys.executable, "-c", "import sys; sys.stdin.read()"]


def test_group_gets_period_and_quota_in_microseconds(tmp_path: Path) -> None:
    """A 0.15-core group is written as 15000 us of CPU per 100000 us period."""
    g = cg.CpuGroup("n1", 0.15, root=tmp_path).create()
    assert g.path == tmp_path / "yimaporc-bench-n1"
    assert g.read_quota() == (15000, 100000)
    with pytest.raises(ValueError):
        cg.CpuGroup("n2", 0.0, root=tmp_path)


def test_wrapped_process_enters_the_group_before_it_execs(tmp_path: Path) -> None:
    """The wrapper writes its own PID to cgroup.procs, then execs the node in that PID."""
    g = cg.CpuGroup("n1", 0.1, root=tmp_path).create()
    p = subprocess.Popen(g.wrap(WAIT_STDIN), stdin=subprocess.PIPE)
    try:
        wait_for(lambda: g.pids(), 10, "the wrapper's PID in cgroup.procs")
        assert g.pids() == [p.pid]

        def execed() -> bool:
            cmd = Path(f"/proc/{p.pid}/cmdline").read_bytes().split(b"\0")
            return cmd[:2] == [sys.executable.encode(), b"-c"]

        wait_for(execed, 10, "the node's argv in the same PID (exec, not a child)")
    finally:
        assert p.stdin is not None
        p.stdin.close()
        assert p.wait(timeout=10) == 0
    g.remove()
    assert not g.path.exists()


def test_quota_held_allows_the_quota_and_not_more() -> None:
    """Within 10 % (and /proc's tick) of the quota holds; 30 % over does not."""
    row = {"cores": 0.105, "quota": 0.1, "wall_s": 5.0, "periods": 50, "throttled": 20}
    assert cg.quota_held(row)
    assert not cg.quota_held(dict(row, cores=0.13))


def test_proc_ticks_of_a_gone_process_is_none() -> None:
    """CPU of a live process is a tick count; a reaped PID has none."""
    assert cg.proc_ticks(os.getpid()) is not None
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert cg.proc_ticks(p.pid) is None


def test_kernel_holds_a_busy_loop_to_its_quota() -> None:
    """A busy loop in a real 0.1-core group is throttled and uses <= 0.1 core over the window."""
    why = cg.available()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cgroup v1 cpu controller needed: {why}")
        pytest.skip(why)
    g = cg.CpuGroup(f"test-{os.getpid()}", 0.1).create()
    p = subprocess.Popen(g.wrap([sys.executable, "-c", "while True: pass"]))
    try:
        wait_for(lambda: p.pid in g.pids(), 10, "the busy loop in its group")
        meter = cg.CpuMeter([g])
        start = g.stat()

        def enough() -> bool:
            s = g.stat()
            return (
                s["nr_periods"] - start["nr_periods"] >= 15
                and s["nr_throttled"] - start["nr_throttled"] >= 3
            )

        wait_for(enough, 60, "15 CFS periods with 3 throttled")
        (row,) = meter.stop()
        assert row["throttled"] >= 3
        assert cg.quota_held(row), row
    finally:
        p.kill()
        p.wait()
        g.remove()
    assert not g.path.exists()
