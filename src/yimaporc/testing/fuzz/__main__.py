"""``python -m yimaporc.testing.fuzz``: fuzz front doors of real nodes, or replay a saved input."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ._check import Bounds
from ._lab import DOORS, Lab
from ._run import DoorFuzzer, DoorReport, Options, load_replay, replay


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m yimaporc.testing.fuzz", description=__doc__)
    p.add_argument("--target", choices=(*DOORS, "all"), default="all", help="door to fuzz")
    p.add_argument("--inputs", type=_positive(int), default=10_000, help="inputs per door")
    p.add_argument("--seed", type=int, default=0, help="random seed (a seed reproduces a run)")
    p.add_argument(
        "--workers", type=_positive(int), default=32, help="connections in flight (max 150)"
    )
    p.add_argument("--batch", type=_positive(int), default=5_000, help="inputs between checks")
    p.add_argument(
        "--udp-rate", type=_positive(float), default=3_000.0, help="datagrams per second"
    )
    p.add_argument("--corpus", type=Path, default=Path("fuzz-corpus"), help="where reproducers go")
    p.add_argument("--base-dir", type=Path, help="node data and logs (default: a temporary dir)")
    p.add_argument(
        "--triage-seconds", type=float, default=60.0, help="time per door to isolate reproducers"
    )
    p.add_argument(
        "--max-seconds", type=_positive(float), default=float("inf"), help="time cap per door"
    )
    p.add_argument("--rss-growth-mib", type=_positive(int), default=200, help="allowed RSS growth")
    p.add_argument("--fd-growth", type=_positive(int), default=64, help="allowed fd growth")
    p.add_argument(
        "--client-timeout", type=_positive(float), default=10.0, help="real client bound (s)"
    )
    p.add_argument("--json", type=Path, help="write the report as JSON here")
    p.add_argument(
        "--replay", type=Path, metavar="FILE", help="send a saved input (.bin/.jsonl) once"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run; exit 0 when every door stayed clean, 1 otherwise, 2 on bad arguments."""
    args = parser().parse_args(argv)
    if args.workers > 150:
        parser().error("--workers is at most 150 (one source address each)")
    bounds = Bounds(args.rss_growth_mib * 1024, args.fd_growth, args.client_timeout)
    options = Options(
        args.inputs,
        args.seed,
        args.workers,
        args.batch,
        args.udp_rate,
        args.triage_seconds,
        args.max_seconds,
        bounds,
    )
    with tempfile.TemporaryDirectory(prefix="yimaporc-fuzz-") as tmp:
        root = (args.base_dir or Path(tmp)).resolve()
        lab = Lab(root / "nodes-0")
        if args.replay is not None:
            door, jobs = load_replay(args.replay, None if args.target == "all" else args.target)
            lab.start({door})
            try:
                result, sent = replay(lab, door, jobs, options)
            finally:
                lab.stop()
            print(f"replayed {len(jobs)} connection(s) to {door}: {dict(sent.counters)}")
            for problem in result.problems:
                print("problem:", problem)
            for tb in result.tracebacks:
                print(f"traceback: {tb.exception}  [{tb.signature}]")
            return 1 if result.problems else 0
        doors = list(DOORS) if args.target == "all" else [args.target]
        reports: list[DoorReport] = []
        try:
            for door in doors:
                if reports and not reports[-1].clean:
                    # the last door left its node dirty: the next one starts on fresh nodes
                    lab.stop()
                    lab = Lab(root / f"nodes-{len(reports)}")
                lab.start({door})
                fuzzer = DoorFuzzer(lab, door, options, args.corpus.resolve())
                reports.append(fuzzer.run())
        finally:
            lab.stop()
    print()
    for r in reports:
        print(r.summary())
    if args.json:
        args.json.write_text(json.dumps([r.as_json() for r in reports], indent=1) + "\n")
    return 0 if all(r.clean for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
