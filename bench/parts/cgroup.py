"""Scaled-down nodes: each node process in its own cgroup v1 CPU group with a fixed quota.

    /sys/fs/cgroup/cpu/yimaporc-bench-<name>/
        cpu.cfs_period_us = 100000
        cpu.cfs_quota_us  = quota x period      (0.1 core -> 10000)

The process is moved in by a ``/bin/sh`` wrapper that writes its own PID to the group's
``cgroup.procs`` and then ``exec``s the node: the node runs its first instruction inside
the group, long before it serves, and every thread and child it makes stays there. The
group is removed when the run ends (after its processes are stopped).

``CpuMeter`` checks that the quota holds: the CPU the group's processes used (from
``/proc/PID/stat``, every thread, plus waited-for children) over the wall time of a
window, beside the quota, and the kernel's own throttling counters (``cpu.stat``). A
node that used more than its quota (a group the kernel did not enforce) makes the
measurement fail instead of being reported as scaled down.

Only the standard library: the bench runs this module in its own interpreter, the
tests import it directly.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Sequence
from pathlib import Path

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
PREFIX = "yimaporc-bench-"
PERIOD_US = 100_000
# CFS weight of a node's group (the default is 1024): a node runnable within its quota goes
# before the machine's other work, so it gets the quota it is measured with (the quota
# still caps it; 8 nodes of 0.1 core leave 1.2 of 2 cores to everything else)
SHARES = 8192
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The wrapper: "$0" is the group's cgroup.procs, "$@" the node's argv.
_WRAP = 'echo $$ > "$0" && exec "$@"'


class CgroupUnavailable(Exception):
    """No writable cgroup v1 CPU hierarchy here (not root, cgroup v2 only, ...)."""


def available(root: Path = CGROUP_CPU) -> str | None:
    """None when CPU groups can be made under ``root``, else the reason they cannot."""
    if not (root / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {root}"
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (the bench must run as root)"
    return None


def proc_ticks(pid: int) -> int | None:
    """utime + stime + cutime + cstime of ``pid`` in clock ticks (None once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: fields start after the last ')'
    fields = raw[raw.rindex(")") + 2 :].split()
    return sum(int(x) for x in fields[11:15])


class CpuGroup:
    """One CPU group with ``quota`` cores (e.g. 0.1) per ``period_us`` period."""

    def __init__(
        self, name: str, quota: float, root: Path = CGROUP_CPU, period_us: int = PERIOD_US
    ) -> None:
        if not 0.0 < quota <= 64.0:
            raise ValueError(f"quota must be a positive number of cores, not {quota}")
        self.name = PREFIX + name
        self.quota = quota
        self.period_us = period_us
        self.quota_us = max(1000, round(quota * period_us))  # the kernel's minimum is 1 ms
        self.path = root / self.name
        self.created = False

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def create(self) -> CpuGroup:
        """Make the group (a stale one of an earlier run is reused) and set its quota."""
        try:
            self.path.mkdir(exist_ok=True)
        except OSError as e:
            raise CgroupUnavailable(f"cannot create {self.path}: {e}") from e
        self.created = True
        # period first: the kernel checks quota against it
        self._write("cpu.cfs_period_us", str(self.period_us))
        self._write("cpu.cfs_quota_us", str(self.quota_us))
        self._write("cpu.shares", str(SHARES))
        return self

    def limit(self, on: bool = True) -> None:
        """Hold the group to its quota (``on``) or lift it (-1: set-up, ingest, joins)."""
        self._write("cpu.cfs_quota_us", str(self.quota_us if on else -1))

    def _write(self, name: str, value: str) -> None:
        with open(self.path / name, "w") as f:
            f.write(value + "\n")

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run so that the process enters this group before it execs."""
        return ["/bin/sh", "-c", _WRAP, str(self.procs_file), *argv]

    def pids(self) -> list[int]:
        """The processes in the group now."""
        try:
            text = self.procs_file.read_text()
        except OSError:
            return []
        return [int(x) for x in text.split()]

    def stat(self) -> dict[str, int]:
        """The kernel's ``cpu.stat``: nr_periods, nr_throttled, throttled_time (ns), ..."""
        try:
            lines = (self.path / "cpu.stat").read_text().splitlines()
        except OSError:
            return {}
        out = {}
        for line in lines:
            k, _, v = line.partition(" ")
            if v.strip().isdigit():
                out[k] = int(v)
        return out

    def read_quota(self) -> tuple[int, int]:
        """(quota_us, period_us) as the kernel holds them."""
        q = int((self.path / "cpu.cfs_quota_us").read_text())
        p = int((self.path / "cpu.cfs_period_us").read_text())
        return q, p

    def remove(self, timeout: float = 10.0) -> None:
        """Remove the group once its processes are gone (they are stopped by PID first)."""
        if not self.created:
            return
        end = time.monotonic() + timeout
        while True:
            try:
                self.path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno == errno.ENOTEMPTY:
                    # a plain directory standing in for the hierarchy (tests): a real
                    # cgroup is removed with its control files, or refused with EBUSY
                    for f in self.path.iterdir():
                        f.unlink()
                    continue
                if e.errno != errno.EBUSY or time.monotonic() > end:
                    raise
                time.sleep(0.1)  # a process still exiting
                continue
            break
        self.created = False


class CpuMeter:
    """CPU used by a group's processes over a window, against the group's quota."""

    def __init__(self, groups: Sequence[CpuGroup]) -> None:
        self.groups = list(groups)
        self.t0 = time.monotonic()
        self.start = [self._ticks(g) for g in self.groups]
        self.stat0 = [g.stat() for g in self.groups]

    @staticmethod
    def _ticks(g: CpuGroup) -> dict[int, int]:
        out = {}
        for pid in g.pids():
            t = proc_ticks(pid)
            if t is not None:
                out[pid] = t
        return out

    def stop(self) -> list[dict[str, float]]:
        """Per group: cores used (CPU s / wall s), quota, throttled periods in the window."""
        wall = time.monotonic() - self.t0
        rows = []
        for g, t0, s0 in zip(self.groups, self.start, self.stat0, strict=True):
            t1 = self._ticks(g)
            ticks = sum(v - t0.get(pid, 0) for pid, v in t1.items())
            s1 = g.stat()
            rows.append(
                {
                    "cores": ticks / CLK_TCK / wall if wall > 0 else 0.0,
                    "quota": g.quota,
                    "wall_s": wall,
                    "periods": s1.get("nr_periods", 0) - s0.get("nr_periods", 0),
                    "throttled": s1.get("nr_throttled", 0) - s0.get("nr_throttled", 0),
                }
            )
        return rows


def quota_held(row: dict[str, float], slack: float = 0.1) -> bool:
    """The group used no more than its quota (10 % and one tick of /proc's resolution over)."""
    tick = 1.0 / CLK_TCK / row["wall_s"] if row["wall_s"] > 0 else 0.0
    return row["cores"] <= row["quota"] * (1.0 + slack) + 2 * tick


def cleanup_stale(root: Path = CGROUP_CPU) -> list[str]:
    """Remove empty groups an interrupted earlier run left behind; names removed."""
    gone = []
    if not root.is_dir():
        return gone
    for d in root.glob(PREFIX + "*"):
        with contextlib.suppress(OSError):
            d.rmdir()
            gone.append(d.name)
    return gone
