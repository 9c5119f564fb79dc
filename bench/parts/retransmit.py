"""Part ``retransmit``: missing at playout vs loss, simulator then the real player."""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from parts.cluster import Cluster, cli_missing, require_service
from parts.common import PORTS, PY, WORK, PartFailed, Settings, run, say, scoped


def part_retransmit(s: Settings, res: dict[str, Any], errors: list[str], clip: Path) -> None:
    """Packets missing at playout vs loss rate, with and without retransmission: the
    protocol in the deterministic simulator (the kernel: 3 nodes' send path, the player shell),
    then the real player (``yimaporc play --drop RATE``) against 3 bipartite nodes."""
    out = res.setdefault("retransmit", {})
    r = run(
        [
            PY,
            "-c",
            "import json, sys; from yimaporc.sim.player import loss_table; "
            "print(json.dumps(loss_table(range(int(sys.argv[1])), "
            "[float(x) for x in sys.argv[2].split(',')], float(sys.argv[3]))))",
            str(s.retx_seeds),
            ",".join(str(x) for x in s.retx_rates),
            str(s.retx_sim_s),
        ],
        300,
    )
    try:
        rows = json.loads(r.stdout.strip().splitlines()[-1])
        out["simulator"] = [
            {"drop": d, "missing_without": a, "missing_with": b, "nacked": c} for d, a, b, c in rows
        ]
        for row in out["simulator"]:
            say(
                f"  simulator drop {row['drop']:.2%}: missing at playout "
                f"{row['missing_without']:.3%} without, {row['missing_with']:.3%} with retransmission"
            )
    except (IndexError, ValueError):
        errors.append(f"retransmission simulator: {r.stderr.strip()[-300:]}")
        out["simulator"] = {"error": r.stderr.strip()[-300:]}
    work = WORK / "retransmit"
    try:
        with scoped():
            c = Cluster("yima", 3, WORK / "yima-retransmit", ["--mode", "bipartite"])
            c.start()
            ing = c.cli("media", "ingest", str(clip), "--name", "test", "--admin", c.admin(0))
            if ing.returncode != 0:
                if cli_missing(ing):
                    raise PartFailed("yimaporc has no 'media ingest' command yet")
                raise PartFailed(f"yimaporc media ingest: {ing.stderr.strip()[-300:]}")
            require_service(c, "rtsp", PORTS["rtsp"])
            url = f"rtsp://{c.hosts[0]}:{PORTS['rtsp']}/test"
            work.mkdir(parents=True, exist_ok=True)

            def play(rate: float) -> dict[str, Any]:
                stats = work / f"play-{rate}.json"
                with contextlib.suppress(OSError):
                    stats.unlink()
                p = c.cli(
                    "play",
                    url,
                    "--duration",
                    str(s.retx_play_s),
                    "--drop",
                    str(rate),
                    "--seed",
                    "1",
                    "--stats",
                    str(stats),
                    timeout=s.retx_play_s + 60,
                )
                if p.returncode != 0:
                    if cli_missing(p):
                        raise PartFailed("yimaporc has no 'play' command yet")
                    raise PartFailed(f"yimaporc play --drop {rate}: {p.stderr.strip()[-300:]}")
                st = json.loads(stats.read_text())
                exp = st.get("packets_expected") or 0
                if not exp:
                    raise PartFailed(f"yimaporc play --drop {rate}: no packet expected ({st})")
                return {
                    "drop": rate,
                    "missing_with": st["packets_missing_at_playout"] / exp,
                    # what would be missing without retransmission: the loss rate among
                    # arrivals (the server sends ahead of --duration, so not / expected)
                    "missing_without": st["packets_dropped_simulated"]
                    / max(1, st.get("packets_received") or 0),
                    "nacks_sent": st.get("nacks_sent"),
                    "retransmissions_received": st.get("retransmissions_received"),
                    "packets_expected": exp,
                    "late_packets": st.get("late_packets"),
                }

            # the players run side by side: a few 4 Mbit/s streams are far below capacity
            with ThreadPoolExecutor(max_workers=len(s.retx_rates)) as ex:
                real = list(ex.map(play, s.retx_rates))
            out["player"] = real
            for row in real:
                say(
                    f"  yimaporc play drop {row['drop']:.2%}: missing at playout "
                    f"{row['missing_with']:.3%} with retransmission "
                    f"({row['missing_without']:.3%} dropped)"
                )
    except PartFailed as e:
        errors.append(f"target yima retransmission (3 nodes, yimaporc play): {e}")
        out["player"] = {"error": str(e)}
