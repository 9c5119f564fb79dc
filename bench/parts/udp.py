"""Part ``udp``: the loopback ceiling (sendto and UDP GSO from one Python process)."""

from __future__ import annotations

from typing import Any

from parts.common import PEERS, PY, PartFailed, Settings, fnum, parse_result, run, say


# --------------------------------------------------------------------------- udp ceiling
def part_udp(s: Settings, res: dict[str, Any]) -> None:
    out = {}
    for stack in ("sendto", "gso"):
        r = run(
            [
                PY,
                str(PEERS / "udp_ceiling.py"),
                "--stack",
                stack,
                "--duration",
                str(s.udp_duration),
                "--warmup",
                "0.5",
            ],
            s.udp_duration + 60,
        )
        kv = parse_result(r.stdout, "udp")
        if kv is None or not fnum(kv.get("tx_pps")):
            raise PartFailed(f"udp {stack}: no result ({r.stderr.strip()[-300:]})")
        d = {k: fnum(v) if fnum(v) is not None else v for k, v in kv.items()}
        d["tx_mbps"] = d["tx_pps"] * 1316 * 8 / 1e6
        # on a shared machine the sender may not get a whole core: per core-second too
        if d.get("tx_cpu_pct"):
            d["tx_pps_per_core"] = d["tx_pps"] / (d["tx_cpu_pct"] / 100.0)
        out[stack] = d
        say(
            f"  udp {stack:6s} tx_pps={d['tx_pps']:.0f} ({d['tx_mbps']:.0f} Mbit/s, "
            f"{d['tx_mbps'] / 4.0:.0f} x 4 Mbit/s streams) rx_pps={d['rx_pps']:.0f} "
            f"sender_cpu={d['tx_cpu_pct']:.0f}%"
        )
    res["udp"] = out
