"""The in-memory body cache (porcupine/bodycache.py)."""

from __future__ import annotations


def test_split_separates_held_bodies_from_keys_to_read_and_counts_each() -> None:
    """BodyCache.split: the bodies it holds by UID, the keys still to read by UID, one
    hit or miss counted per key (as get counts them)."""
    from yimaporc.porcupine.bodycache import BodyCache

    cache = BodyCache(1 << 20)
    cache.put("u@x", "k1", b"one")
    found, missing = cache.split("u@x", {1: "k1", 2: "k2"})
    assert found == {1: b"one"} and missing == {2: "k2"}
    assert (cache.hits, cache.misses) == (1, 1)
