"""Seed sweeps for simulator tests: a few seeds in the default suite, all of them
under ``make test-slow``.

``sweep(range(50), default=12)`` gives pytest parameters for every seed; those
past the first ``default`` carry the ``slow`` marker, so ``make test`` runs 12
and ``make test-slow`` runs the other 38. A failing seed replays alone with
``pytest -m slow -k 'test_name and 37'``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest


def sweep(seeds: Iterable[int], default: int) -> list[Any]:
    """Parameters for ``@pytest.mark.parametrize("seed", ...)``: the first
    ``default`` seeds run by default, the rest are marked ``slow``."""
    out: list[Any] = []
    for i, seed in enumerate(seeds):
        marks = () if i < default else (pytest.mark.slow,)
        out.append(pytest.param(seed, marks=marks, id=str(seed)))
    return out
