"""The safety-net plugin fails a test that logs a failure, unless the test takes it."""

from __future__ import annotations

import gc
import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import settings

pytest_plugins = ["pytester"]

_TESTS = """
import gc
from twisted.internet.defer import fail
from twisted.logger import Logger

log = Logger()

def test_logs_a_failure():
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("oops")

def test_leaves_an_unhandled_deferred_error():
    fail(ValueError("nobody looked"))

def test_takes_what_it_expected(logged_failures):
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("expected")
    assert len(logged_failures.take(ZeroDivisionError)) == 1

def test_quiet():
    log.info("fine")
"""


def test_logged_failures_fail_the_test(pytester: pytest.Pytester) -> None:
    """A logged failure and an unhandled Deferred error each fail their test; a taken one does not."""
    pytester.makeconftest('pytest_plugins = ["yimaporc.testing.pytest_plugin"]\n')
    pytester.makepyfile(test_sample=_TESTS)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, errors=2)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_logs_a_failure*"])
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaves_an_unhandled_deferred_error*"])


_CYCLE_TEST = """
from twisted.internet.defer import fail

def test_leaves_an_error_in_a_cycle():
    d = fail(ValueError("only the cycle collector sees this"))
    holder = {"d": d}
    holder["self"] = holder
    d.addCallback(lambda _, h=holder: h)
"""


def test_frozen_collection_still_reports_errors_left_in_cycles(pytester: pytest.Pytester) -> None:
    """With the project conftest (GC freeze after collection), an unhandled Deferred error
    kept alive only by a reference cycle still fails the test that left it."""
    conftest = Path(__file__).resolve().parents[1] / "conftest.py"
    pytester.makeconftest(conftest.read_text())
    pytester.makepyfile(test_cycle=_CYCLE_TEST)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaves_an_error_in_a_cycle*"])


_LATE_TESTS = """
import gc
from twisted.internet.defer import fail

KEPT = []

def test_keeps_objects_alive():
    KEPT.extend(object() for _ in range(1000))
    KEPT.append({"cycle": KEPT})

def test_a_later_test_still_sees_its_own_error_in_a_cycle():
    d = fail(ValueError("left by the second test"))
    holder = {"d": d}
    holder["self"] = holder
    d.addCallback(lambda _, h=holder: h)

def test_keeps_an_error_past_its_teardown():
    d = fail(KeyError("outlives its test"))
    holder = {"d": d}
    holder["self"] = holder
    d.addCallback(lambda _, h=holder: h)
    KEPT.append(holder)

def test_lets_it_go():
    KEPT.clear()
"""


def test_survivors_are_frozen_after_each_test_and_errors_still_fail(
    pytester: pytest.Pytester,
) -> None:
    """With the project conftest (survivors frozen after each teardown): a later test's
    error in a cycle still fails that test; an error kept past its test's teardown and
    dropped later into a cycle fails the run at the final collection."""
    conftest = Path(__file__).resolve().parents[1] / "conftest.py"
    pytester.makeconftest(conftest.read_text())
    pytester.makepyfile(test_late=_LATE_TESTS)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_a_later_test_still_sees_its_own_error_in_a_cycle*"]
    )
    result.stdout.fnmatch_lines(["*logged failures found by the final collection*"])
    result.stdout.fnmatch_lines(["*KeyError*outlives its test*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_the_suite_runs_with_collection_frozen() -> None:
    """tests/conftest.py froze the collected objects, so the per-test collection stays cheap."""
    assert gc.get_freeze_count() > 1000


def test_hypothesis_profiles_keep_the_default_run_short_and_fuzz_long() -> None:
    """The default profiles (ci, dev) cap examples at 60; `fuzz` (make test-slow) runs 1000."""
    assert settings.get_profile("ci").max_examples <= 60
    assert settings.get_profile("dev").max_examples <= 60
    assert settings.get_profile("fuzz").max_examples >= 1000
    assert (
        settings().max_examples
        == settings.get_profile(
            os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
        ).max_examples
    )


def _root_conftest() -> Any:
    """A fresh copy of tests/conftest.py as a module (its helpers, not its hooks)."""
    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("root_conftest_copy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unit_tier_tmp_path_goes_to_tmpfs_only_with_room_and_without_integration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tmpfs for tmp_path when the run has no integration test, no chosen root and room;
    on disk for any run with an integration test, a chosen root or too little room."""
    conftest = _root_conftest()
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(conftest, "TMPFS", shm)
    monkeypatch.setattr(conftest, "TMPFS_ROOM", 1)
    monkeypatch.delenv("PYTEST_DEBUG_TEMPROOT", raising=False)
    tests = Path(conftest.__file__).parent
    unit = SimpleNamespace(path=tests / "yima" / "test_rtp.py")
    integration = SimpleNamespace(path=tests / "integration" / "test_mail_roundtrip.py")
    assert conftest.tmpfs_root([unit]) == shm
    assert conftest.tmpfs_root([unit, integration]) is None
    monkeypatch.setattr(conftest, "TMPFS_ROOM", 1 << 60)
    assert conftest.tmpfs_root([unit]) is None, "too little room"
    monkeypatch.setattr(conftest, "TMPFS_ROOM", 1)
    monkeypatch.setattr(conftest, "TMPFS", tmp_path / "missing")
    assert conftest.tmpfs_root([unit]) is None, "no tmpfs"
    monkeypatch.setattr(conftest, "TMPFS", shm)
    monkeypatch.setenv("PYTEST_DEBUG_TEMPROOT", str(tmp_path))
    assert conftest.tmpfs_root([unit]) is None, "a root chosen by the user"
