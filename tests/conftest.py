"""Shared pytest configuration."""

import os

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["yimaporc.testing.pytest_plugin"]

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` (the full player matrix) run only when ``-m`` names them
    (``make test-slow``); otherwise they are deselected, not skipped."""
    # Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`) the real-process
    # tests share one worker, in order, as they bind fixed loopback addresses; the
    # CPU-bound unit tier runs beside them on the other core.
    for item in items:
        if "tests/integration/" in item.nodeid or item.nodeid.startswith("integration/"):
            item.add_marker(pytest.mark.xdist_group("integration"))
    if "slow" in (config.getoption("markexpr") or ""):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]
