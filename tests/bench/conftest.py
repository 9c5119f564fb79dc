"""tests/bench: the bench's own modules import by name (bench/ is a directory of
scripts; ``mailmodel`` is its mail cost model package)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = str(Path(__file__).resolve().parents[2] / "bench")
if BENCH not in sys.path:
    sys.path.append(BENCH)
