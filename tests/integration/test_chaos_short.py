"""A short chaos schedule (issue 14, docs/chaos.md) on 5 real porcupine nodes, each in
its own network namespace on 10.123.0.0/24: a clean partition, a bridge, a SIGSTOP
pause longer than failure detection and a SIGKILL with restart, while SMTP clients
deliver to random nodes (users with 1, 2 and 3 replicas) and IMAP readers poll. Afterwards every acknowledged
message is listed exactly once by IMAP and POP3 at every node, and no UID invariant
is broken (none newly visible below a UID shown, since the visibility horizon).
``make chaos`` runs the full schedule (every fault kind, minutes).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from yimaporc.testing.chaos import PREFIX, Chaos, schedule, table, unavailable

#: The fault kinds the short schedule runs (the full schedule passes every kind since
#: the uidfence branch; skew and the rolling restart are left to ``make chaos``: slow).
SHORT = ["partition", "bridge", "pause", "kill"]
#: Invariants not asserted here (printed in the table; allowed by ``make chaos`` too).
#: ``below_seen`` is asserted like the rest since the visibility horizon;
#: ``below_seen_unacked`` (a message that never got a 250 reappearing below UIDs shown
#: meanwhile, after its coordinator was killed or paused past its allocation) is the
#: trade-off in docs/mail.md, "A holder that goes away meanwhile": acknowledged mail
#: stays readable while a node is down, and such a message was never acknowledged.
KNOWN_BROKEN: tuple[str, ...] = ("below_seen_unacked",)


def test_short_chaos_schedule_every_acknowledged_message_once_everywhere(
    tmp_path: Path,
) -> None:
    """A clean partition, a bridge, a pause and a kill under load, users with 1, 2
    and 3 replicas: 0 missing, duplicated or hidden by IMAP and
    POP3 at every node, no UID shared or changed, no acknowledged message newly
    visible below a UID shown, UIDNEXT never lower, UIDVALIDITY
    fixed, every final read answered, one view again after every heal, and the
    namespaces removed."""
    why = unavailable()
    if why is not None:
        pytest.skip(f"chaos needs network namespaces: {why}")
    lines: list[str] = []
    # Users with --replicas 1, 2 and 3 (the Chaos default), as in the full schedule.
    chaos = Chaos(tmp_path, seed=7, log=lines.append)
    with chaos.cluster():
        report = chaos.run(schedule("short", 7, SHORT), quiet=3.0)
    print("\n" + "\n".join(lines) + "\n" + table(report))
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{PREFIX}-" not in left, f"namespaces left behind: {left}"
    assert [f["kind"] for f in report["faults"]] == SHORT
    for fault in report["faults"]:
        assert None not in fault["to_one_view"], f"no one view after {fault['detail']}"
        assert fault["visible_after"] is not None, f"mail of {fault['detail']} never listed"
        assert sum(fault["acked_by_node"].values()) > 0, f"no 250 during {fault['detail']}"
    broken = {
        k: n
        for k, n in report["total"].items()
        if k not in ("attempted", "acknowledged", *KNOWN_BROKEN) and n
    }
    assert not broken, table(report)
