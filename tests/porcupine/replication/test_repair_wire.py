"""The re-replication wire (:mod:`yimaporc.porcupine.replication.repair`): pure codecs."""

from __future__ import annotations

import pytest

from yimaporc.porcupine.replication import MalformedMessage, Timestamp, Update
from yimaporc.porcupine.replication.repair import (
    decode_inventory,
    decode_updates,
    encode_inventory,
    encode_updates,
)


def test_inventory_round_trip() -> None:
    """Object ids and versions survive the inventory encoding."""
    items = [
        ("msg/a@x.org/" + "0" * 32, Timestamp(17, "n1")),
        ("profile/a@x.org", Timestamp(3, "n2")),
    ]
    assert decode_inventory(encode_inventory(items)) == items


@pytest.mark.parametrize("blob", [b"", b"{", b"[[1]]", b'[["a", "x", "n"]]', b"[1]"])
def test_malformed_inventory_is_refused(blob: bytes) -> None:
    """A broken inventory is a MalformedMessage, never another exception."""
    with pytest.raises(MalformedMessage):
        decode_inventory(blob)


def test_updates_round_trip() -> None:
    """Whole updates (bodies and tombstones) survive the fetch encoding."""
    ups = [
        Update("msg/a@x.org/" + "1" * 32, Timestamp(5, "n1"), b"{}\nbody"),
        Update("p", Timestamp(6, "n2"), None),
    ]
    assert decode_updates(encode_updates(ups)) == ups


def test_truncated_updates_are_refused() -> None:
    """A cut fetch answer is a MalformedMessage."""
    blob = encode_updates([Update("x", Timestamp(5, "n1"), b"abc")])
    with pytest.raises(MalformedMessage):
        decode_updates(blob[:-2])
