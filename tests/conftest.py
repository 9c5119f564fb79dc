"""Shared pytest configuration."""

import gc
import os

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["yimaporc.testing.pytest_plugin"]

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=30, deadline=None)
# `make test-slow` runs every hypothesis test again under this one.
settings.register_profile(
    "fuzz", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` (the full player matrix) run only when ``-m`` names them
    (``make test-slow``); otherwise they are deselected, not skipped."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what collection left alive (modules, test items, parameters) into the
    permanent GC generation.

    The safety-net plugin runs a full ``gc.collect()`` after every test so that an
    unhandled Deferred error is logged inside the test that left it; without the freeze
    each collection walks every imported module's objects again (about 35 ms a test,
    5.6 of the 6.6 CPU seconds of tests/rtsp).  Objects made by tests are created
    after the freeze, so they are still collected and their errors still reported.
    """
    gc.collect()
    gc.freeze()
