"""Shared pytest configuration."""

import gc
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from twisted.logger import globalLogPublisher

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


#: Where the unit tier's temporary directories go when there is room (see
#: :func:`tmpfs_root`).
TMPFS = Path("/dev/shm")
#: Free space tmpfs must have: the tier writes about 0.6 GB a run and pytest keeps the
#: last three runs' directories.
TMPFS_ROOM = 4 << 30
_INTEGRATION = Path(__file__).resolve().parent / "integration"


def tmpfs_root(items: list[pytest.Item]) -> Path | None:
    """tmpfs for ``tmp_path`` when no test of ``items`` is an integration test, no
    temporary root or ``--basetemp`` was chosen, and /dev/shm has room; else None.

    The unit tier's stores fsync SQLite files and mail bodies thousands of times (2 ms
    each on this disk, beside the integration tier's nodes doing the same); what a
    unit test pins is that the code asks for durability (fsync counts through fakes),
    not the disk's.  Real durability across SIGKILL is tests/integration's, on disk.
    """
    if os.environ.get("PYTEST_DEBUG_TEMPROOT"):
        return None
    if any(Path(item.path).is_relative_to(_INTEGRATION) for item in items):
        return None
    try:
        room = shutil.disk_usage(TMPFS).free
    except OSError:
        return None
    if room < TMPFS_ROOM or not os.access(TMPFS, os.W_OK):
        return None
    return TMPFS


def pytest_collection_finish(session: pytest.Session) -> None:
    """Put the unit tier's temporary directories on tmpfs (:func:`tmpfs_root`), then
    freeze what collection left alive (modules, test items, parameters) into the
    permanent GC generation.

    The safety-net plugin runs a full ``gc.collect()`` after every test so that an
    unhandled Deferred error is logged inside the test that left it; without the freeze
    each collection walks every imported module's objects again (about 35 ms a test,
    5.6 of the 6.6 CPU seconds of tests/rtsp).  Objects made by tests are created
    after the freeze, so they are still collected and their errors still reported.
    """
    root = tmpfs_root(session.items) if session.config.option.basetemp is None else None
    if root is not None:
        # pytest's documented root for tmp_path, read when the first test asks for one
        os.environ["PYTEST_DEBUG_TEMPROOT"] = str(root)
    gc.collect()
    gc.freeze()


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """After each test's teardown (where the safety net's ``gc.collect()`` ran), freeze
    what survived it too.

    Objects a test leaves alive (caches, hypothesis' state, a module's registries) would
    otherwise be walked again by every later test's collection: over the ~2,600 tests of
    the unit tier the teardowns grew to 0.2-1.6 s each and took more time than the
    tests.  Each collection now walks only what its own test made.  A Deferred that
    outlives its test and fails unhandled later is still reported: when it is freed by
    reference counting during a later test, or by :func:`pytest_sessionfinish`'s full
    collection when it sits in a reference cycle.
    """
    try:
        return (yield)
    finally:
        gc.freeze()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Unfreeze and collect everything once: an unhandled Deferred error that outlived
    its test in a reference cycle fails the run here."""
    from yimaporc.testing.pytest_plugin import LoggedFailures  # (loaded as a plugin first)

    gc.unfreeze()
    recorder = LoggedFailures()
    globalLogPublisher.addObserver(recorder)
    try:
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(recorder)
    if recorder.events:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = f"{len(recorder.events)} failure(s) logged after the tests:\n{recorder.describe()}"
        if reporter is not None:
            reporter.write_sep("=", "logged failures found by the final collection", red=True)
            reporter.write_line(text)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
