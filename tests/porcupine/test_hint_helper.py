"""yimaporc.testing.hints.apply_hint: a hint written as it travels reaches the manager as HintList decodes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mailtest_helpers import ImmediateReactor, SyncPool

from yimaporc.cluster.buckets import BucketMap
from yimaporc.porcupine.cluster import ClusterUserManager
from yimaporc.porcupine.profiledb import ProfileDB
from yimaporc.porcupine.usermap import N_BUCKETS, bucket_of
from yimaporc.testing.hints import apply_hint

USER = "ulla@example.org"
B = bucket_of(USER)


def manager(tmp_path: Path) -> ClusterUserManager:
    clock = ImmediateReactor()
    profiles = ProfileDB(clock, SyncPool(), tmp_path / "p.sqlite", clock.seconds)  # type: ignore[arg-type]
    um = ClusterUserManager("n1", profiles, clock)
    um.known = {"n1", "n2"}
    um.install(BucketMap(("n1",) * N_BUCKETS, (2,) * N_BUCKETS), ["n1", "n2"])
    return um


@pytest.mark.parametrize(
    "entry",
    [[], [B, 2], ["x", 2, []], [N_BUCKETS, 2, []], [B, None, []], [B, 2, "users", []]],
)
def test_a_malformed_entry_is_dropped_uncounted(tmp_path: Path, entry: list[Any]) -> None:
    """A list HintList would drop is not merged: False, no hint counted, nothing settles."""
    um = manager(tmp_path)
    assert apply_hint(um, "n2", entry) is False
    assert um.core.hints_received == 0 and B in um.core.settling


def test_a_well_formed_entry_is_merged_as_the_handler_merges_it(tmp_path: Path) -> None:
    """Both members' hints of a bucket: each counts, the user's hinted mail and holder land."""
    um = manager(tmp_path)
    assert apply_hint(um, "n1", [B, 2, [], [], 1, []]) is True
    assert apply_hint(um, "n2", [B, 2, [[USER, True, 40, 3]], [], 700, [[USER, "n3"]]])
    assert um.core.hints_received == 2 and B not in um.core.settling
    assert um.pending[USER] == {"n2": 3} and um.away_of(USER) == ("n3",)
