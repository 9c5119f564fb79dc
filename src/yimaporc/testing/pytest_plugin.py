"""A pytest plugin: a test fails when it logs a failure or leaves an unhandled Deferred error.

Loaded by the project's ``tests/conftest.py`` (``pytest_plugins``); embedders can load
it the same way.  Every twisted.logger event that carries a failure (``log.failure``,
``Deferred`` errors collected at garbage collection) or is logged at ``critical`` level
during a test is recorded; at teardown the test fails listing them.

A test that provokes such a log on purpose takes the ``logged_failures`` fixture and
asserts on what was logged; whatever it takes with :meth:`LoggedFailures.take` no
longer fails it.  ``@pytest.mark.allow_logged_failures`` opts a test out wholesale.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from zope.interface import implementer


@implementer(ILogObserver)
class LoggedFailures:
    """The failure events logged during one test."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if "log_failure" in event or event.get("log_level") is LogLevel.critical:
            self.events.append(event)

    def take(self, exception_type: type[BaseException] | None = None) -> list[dict[str, Any]]:
        """Remove and return the events (only those whose failure is ``exception_type``)."""
        taken = [e for e in self.events if _matches(e, exception_type)]
        self.events = [e for e in self.events if e not in taken]
        return taken

    def describe(self) -> str:
        lines = []
        for e in self.events:
            text = formatEvent(e)
            failure = e.get("log_failure")
            if failure is not None:
                text += "\n" + failure.getTraceback()
            lines.append(text)
        return "\n---\n".join(lines)


def _matches(event: dict[str, Any], exception_type: type[BaseException] | None) -> bool:
    if exception_type is None:
        return True
    failure = event.get("log_failure")
    return failure is not None and failure.check(exception_type) is not None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_logged_failures: the test may log failures (not checked)"
    )


@pytest.fixture(autouse=True)
def _no_logged_failures(request: pytest.FixtureRequest) -> Iterator[LoggedFailures]:
    recorder = LoggedFailures()
    globalLogPublisher.addObserver(recorder)
    request.node._logged_failures = recorder
    try:
        yield recorder
        gc.collect()  # unhandled Deferred errors are logged when the Deferred is collected
    finally:
        globalLogPublisher.removeObserver(recorder)
    if recorder.events and request.node.get_closest_marker("allow_logged_failures") is None:
        pytest.fail(
            f"the test logged {len(recorder.events)} failure(s):\n{recorder.describe()}",
            pytrace=False,
        )


@pytest.fixture
def logged_failures(_no_logged_failures: LoggedFailures) -> LoggedFailures:
    """What the test logged so far; ``take()`` what it expected."""
    return _no_logged_failures
