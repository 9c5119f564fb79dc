"""The shared pieces of the mail store's wrappers: PassThroughMailboxes hands every
ILocalMailboxes call to the manager it wraps, and write_file writes a body file once."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import succeed
from zope.interface.verify import verifyObject

from yimaporc.porcupine._passthrough import PassThroughMailboxes
from yimaporc.porcupine.fragments import write_file
from yimaporc.porcupine.interfaces import ILocalMailboxes


class Recorder:
    """Answers any call with a Deferred of its own name and arguments."""

    node_id = "n1"

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kw: succeed((name, args, kw))


def test_every_call_reaches_the_wrapped_manager_unchanged() -> None:
    """Each method of ILocalMailboxes is passed to ``inner`` with the caller's arguments."""
    wrapper = PassThroughMailboxes(Recorder())  # type: ignore[arg-type]
    assert verifyObject(ILocalMailboxes, wrapper) and wrapper.node_id == "n1"
    names = [n for n in ILocalMailboxes.names(all=True) if n != "node_id"]
    assert len(names) >= 18
    for name in names:
        params = list(inspect.signature(getattr(wrapper, name)).parameters)
        args = tuple(f"{name}-{p}" for p in params)
        got: list[Any] = []
        getattr(wrapper, name)(*args).addCallback(got.append)
        assert got == [(name, args, {})], name


def test_write_file_truncates_or_refuses_an_existing_file(tmp_path: Path) -> None:
    """A rewrite replaces the whole file (no old tail left); ``exclusive`` never
    overwrites a file that is there."""
    path = tmp_path / "k.m"
    write_file(path, b"a longer first body", sync=True)
    write_file(path, b"short", sync=False)
    assert path.read_bytes() == b"short"
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        write_file(path, b"other", sync=False, exclusive=True)
    assert path.read_bytes() == b"short"
