# ruff: noqa
# Copied from /work/shared/peers/benchutil.py (peer benchmark kit); see bench/peers/NOTE.md.
"""Small stdlib-only helpers shared by the peer benchmarks (Linux /proc)."""

import os
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid, include_children=True):
    """user+system CPU seconds of one process (all its threads), plus the CPU
    of its already-reaped children when include_children.  None if gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    ut, st, cut, cst = (int(x) for x in fields[11:15])
    tot = ut + st + (cut + cst if include_children else 0)
    return tot / CLK_TCK


def descendants(pid):
    """All live descendant pids of pid (reads /proc/*/stat)."""
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                s = f.read()
        except OSError:
            continue
        ppid = int(s[s.rindex(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def tree_cpu_seconds(pids):
    """CPU seconds of the given pids and all their live descendants, plus
    CPU of reaped children (counted in the parents' cutime/cstime)."""
    seen = set()
    total = 0.0
    for pid in pids:
        for p in [pid] + descendants(pid):
            if p in seen:
                continue
            seen.add(p)
            v = proc_cpu_seconds(p)
            if v is not None:
                total += v
    return total


def system_cpu():
    """(busy_seconds, total_seconds) summed over all cores from /proc/stat."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def self_cpu_seconds():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuMeter:
    """Measures, over a window, CPU% of: the whole machine, this process
    (plus reaped children), and optional server process trees.
    Percentages are of ONE core (200% = both cores of a 2-core box)."""

    def __init__(self, server_pids=()):
        self.server_pids = list(server_pids)
        self.start()

    def start(self):
        self.t0 = time.monotonic()
        self.sys0 = system_cpu()
        self.self0 = self_cpu_seconds()
        self.srv0 = tree_cpu_seconds(self.server_pids) if self.server_pids else None

    def stop(self, extra_self_cpu=0.0):
        dt = time.monotonic() - self.t0
        sys1 = system_cpu()
        busy = sys1[0] - self.sys0[0]
        res = {
            "wall_s": dt,
            "sys_cpu_pct": 100.0 * busy / dt,
            "gen_cpu_pct": 100.0 * (self_cpu_seconds() - self.self0 + extra_self_cpu) / dt,
            "ncpu": os.cpu_count(),
        }
        if self.server_pids:
            res["server_cpu_pct"] = 100.0 * (tree_cpu_seconds(self.server_pids) - self.srv0) / dt
        return res


def udp_errors():
    """(RcvbufErrors, InErrors) system-wide counters from /proc/net/snmp."""
    with open("/proc/net/snmp") as f:
        lines = [l.split() for l in f if l.startswith("Udp:")]
    hdr, val = lines[0], lines[1]
    d = dict(zip(hdr[1:], (int(v) for v in val[1:])))
    return d.get("RcvbufErrors", 0), d.get("InErrors", 0)


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    if n == 0:
        return float("nan")
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])
