"""``make test``: the unit tier and the integration tier as two pytest runs side by side.

The integration tests run real processes on fixed loopback addresses, so they run
in order in one process; the unit tier (CPU-bound simulators, protocol cores) runs
beside them on the other core.  Each tier writes its own log; when both are done,
both logs are printed (unit tier first) and the exit status is the worse of the two.
Ctrl-C or a kill stops both.  Extra arguments go to both runs (``PYTEST_ARGS``).

(pytest-xdist's ``--dist loadgroup`` would do this with one command, but with
pytest 9 it no longer keeps a group on one worker.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIERS = {
    "unit": ["--ignore=tests/integration"],
    "integration": ["tests/integration"],
}


def main(argv: list[str]) -> int:
    """Run both tiers, print their logs, return the worse status."""
    root = Path(__file__).resolve().parent.parent
    logs = Path(tempfile.mkdtemp(prefix="yimaporc-tests-"))
    procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    started = time.monotonic()
    try:
        for name, args in TIERS.items():
            log = logs / f"{name}.log"
            with log.open("wb") as out:
                procs[name] = (
                    subprocess.Popen(
                        [sys.executable, "-m", "pytest", *args, *argv],
                        cwd=root,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    ),
                    log,
                )
        codes = {name: p.wait() for name, (p, _) in procs.items()}
    except BaseException:
        for p, _ in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p, _ in procs.values():
            p.wait()
        print(f"tiers stopped; their logs are in {logs}", file=sys.stderr)
        raise
    for name, (_, log) in procs.items():
        print(f"===== {name} tier: exit {codes[name]} =====", flush=True)
        sys.stdout.write(log.read_text(errors="replace"))
    shutil.rmtree(logs, ignore_errors=True)
    elapsed = time.monotonic() - started
    print(
        f"===== both tiers in {elapsed:.0f} s: "
        + ", ".join(f"{n} exit {c}" for n, c in codes.items())
    )
    # pytest's 5 means "no tests collected": a failure here too
    return max(codes.values())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
