#!/usr/bin/env python3
"""``twistd`` with counters, to see on what a mail session waits (issue 20).

Run a node through it instead of ``twistd`` (same arguments); each SIGUSR1 appends
the counters since the last one to ``MAIL_TRACE_OUT`` (default
``/tmp/mail-node-trace.txt``) and starts them again:

    MAIL_TRACE_OUT=/tmp/t.txt PYTHONPATH=src .venv/bin/python bench/mail_node_trace.py \\
        -n --pidfile= porcupine-node --node-id n1 ...
    kill -USR1 PID          # after a load window (bench/mail_phases.py, mail_load.py)

What it counts (by patching a few methods in this process only; diagnostics, not
for production):

- ``cmd.<IMAP command>.sync|.waited``: time from a command's start to its tagged
  answer, split by whether it was answered before ``run()`` returned (nothing
  awaited) or later (a pool job, an RPC, a timer);
- ``pool.wait.<pool>`` / ``pool.run.<function>``: a thread-pool job's time in the queue
  and running; ``pool.jobs.<command>.<function>``: jobs by the IMAP command that
  started them (``-`` for none: POP3, SMTP, the cluster);
- ``rpc.<command>.<IMAP command>``: cluster RPCs;
- ``write.<protocol>`` / ``send.<protocol>``: ``transport.write`` calls and ``send()``
  system calls (one send per write: no reply split over several segments);
- ``stall``: the reactor did not turn for over 80 ms (a watchdog thread samples the
  main thread's stack then: ``stall.at`` says where it was).

The reactor thread's own CPU time and its time waiting for a CPU are in
``/proc/PID/task/PID/schedstat`` (first and second field, ns): on a busy machine
compare them over the same window.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

from twisted.internet import abstract, tcp
from twisted.python import threadpool

import yimaporc.cluster.rpc as rpc
import yimaporc.imap._session as session

OUT = os.environ.get("MAIL_TRACE_OUT", "/tmp/mail-node-trace.txt")
LOCK = threading.Lock()
COUNTS: collections.Counter[str] = collections.Counter()
TIMES: dict[str, list[float]] = collections.defaultdict(list)
CURRENT: dict[str, str | None] = {"cmd": None}


def _patch_commands() -> None:
    run = session.CommandRunner.run

    def traced(self: Any, cmd: Any) -> Any:
        name = type(cmd).__name__
        t0 = time.perf_counter()
        returned = [False]
        before, CURRENT["cmd"] = CURRENT["cmd"], name
        try:
            d = run(self, cmd)
        finally:
            CURRENT["cmd"] = before

        def done(result: Any) -> Any:
            kind = "waited" if returned[0] else "sync"
            TIMES[f"cmd.{name}.{kind}"].append(time.perf_counter() - t0)
            return result

        d.addBoth(done)
        returned[0] = True
        return d

    session.CommandRunner.run = traced  # type: ignore[method-assign]


def _patch_pool() -> None:
    call = threadpool.ThreadPool.callInThreadWithCallback

    def traced(self: Any, on_result: Any, f: Any, *a: Any, **kw: Any) -> None:
        t0 = time.perf_counter()
        tag = CURRENT["cmd"] or "-"
        name = getattr(f, "__qualname__", repr(f))

        def timed(*aa: Any, **kk: Any) -> Any:
            t1 = time.perf_counter()
            try:
                return f(*aa, **kk)
            finally:
                with LOCK:
                    TIMES[f"pool.wait.{self.name}"].append(t1 - t0)
                    TIMES[f"pool.run.{name}"].append(time.perf_counter() - t1)
                    COUNTS[f"pool.jobs.{tag}.{name}"] += 1

        call(self, on_result, timed, *a, **kw)

    threadpool.ThreadPool.callInThreadWithCallback = traced  # type: ignore[method-assign]


def _patch_rpc() -> None:
    call = rpc.RpcClient.call

    def traced(self: Any, address: str, command: Any, **kw: Any) -> Any:
        COUNTS[f"rpc.{getattr(command, '__name__', command)}.{CURRENT['cmd'] or '-'}"] += 1
        return call(self, address, command, **kw)

    rpc.RpcClient.call = traced  # type: ignore[method-assign]


def _patch_io() -> None:
    write = abstract.FileDescriptor.write
    send = tcp.Connection.writeSomeData

    def traced_write(self: Any, data: bytes) -> None:
        COUNTS[f"write.{type(getattr(self, 'protocol', None)).__name__}"] += 1
        write(self, data)

    def traced_send(self: Any, data: bytes) -> Any:
        COUNTS[f"send.{type(self.protocol).__name__}"] += 1
        return send(self, data)

    abstract.FileDescriptor.write = traced_write  # type: ignore[method-assign]
    tcp.Connection.writeSomeData = traced_send  # type: ignore[method-assign]


BEAT = {"t": time.monotonic()}
MAIN = threading.get_ident()


def _watchdog() -> None:
    reported = 0.0
    while True:
        time.sleep(0.02)
        beat = BEAT["t"]
        lag = time.monotonic() - beat
        if lag > 0.08 and beat != reported:
            frame = sys._current_frames().get(MAIN)
            where = traceback.format_stack(frame, limit=3)[-1].strip() if frame else "?"
            with LOCK:
                TIMES["stall"].append(lag)
                COUNTS["stall.at " + " ".join(where.split())[:200]] += 1
            reported = beat


def _dump() -> None:
    with LOCK:
        counts, times = dict(COUNTS), {k: sorted(v) for k, v in TIMES.items()}
        COUNTS.clear()
        TIMES.clear()
    lines = [f"=== {time.strftime('%H:%M:%S')}"]
    lines += [f"{k} {v}" for k, v in sorted(counts.items())]
    for k, v in sorted(times.items()):
        n = len(v)
        lines.append(
            f"{k}: n={n} mean={1000 * sum(v) / n:.2f} p50={1000 * v[n // 2]:.2f} "
            f"p90={1000 * v[int(n * 0.9)]:.2f} p99={1000 * v[min(n - 1, int(n * 0.99))]:.2f} "
            f"max={1000 * v[-1]:.2f} ms sum={sum(v):.3f} s"
        )
    with open(OUT, "a") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    from twisted.internet import reactor, task
    from twisted.scripts.twistd import run

    _patch_commands()
    _patch_pool()
    _patch_rpc()
    _patch_io()

    def beat() -> None:
        BEAT["t"] = time.monotonic()

    reactor.callWhenRunning(lambda: task.LoopingCall(beat).start(0.01))  # type: ignore[attr-defined]
    threading.Thread(target=_watchdog, daemon=True).start()
    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(_dump))  # type: ignore[attr-defined]
    sys.argv[0] = "twistd"
    run()


if __name__ == "__main__":
    main()
