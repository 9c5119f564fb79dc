"""Fixtures for the porcupine mail tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from mailtest_helpers import ImmediateReactor, SyncPool, fast_hash

from yimaporc.porcupine.fragments import FragmentStore, MailboxManager
from yimaporc.porcupine.profiledb import ProfileDB


@pytest.fixture
def mail_reactor() -> ImmediateReactor:
    """A synchronous reactor fake."""
    return ImmediateReactor()


@pytest.fixture
def fragment_store(tmp_path: Path) -> FragmentStore:
    """A fragment store on a fresh data dir, clock fixed at 1,700,000,000."""
    return FragmentStore(tmp_path, "n1", lambda: 1_700_000_000.0)


@pytest.fixture
def mailbox_manager(
    mail_reactor: ImmediateReactor, fragment_store: FragmentStore
) -> MailboxManager:
    """A mailbox manager running synchronously."""
    return MailboxManager(mail_reactor, SyncPool(), fragment_store)  # type: ignore[arg-type]


@pytest.fixture
def profile_db(mail_reactor: ImmediateReactor, tmp_path: Path) -> ProfileDB:
    """A profile DB with cheap hashing."""
    return ProfileDB(
        mail_reactor,
        SyncPool(),  # type: ignore[arg-type]
        tmp_path / "mail" / "profiles.sqlite",
        lambda: 1_700_000_000.0,
        hasher=fast_hash,
    )
