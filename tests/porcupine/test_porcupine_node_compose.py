"""PorcupineNode.from_config: the Porcupine composition root builds the whole graph once
from its config, and refuses a bad one before anything is built or listens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from yimaporc.cluster.bucketservice import BucketMapService
from yimaporc.cluster.node import ConfigError, NodeConfig
from yimaporc.porcupine.cluster import MailCluster
from yimaporc.porcupine.node import PorcupineConfig, PorcupineNode
from yimaporc.porcupine.replication import ReplicationConfig
from yimaporc.porcupine.replication.mail import MailReplication
from yimaporc.porcupine.retrieval import Fragmented, ReplicatedCopies, SingleCopies
from yimaporc.porcupine.service import MailService

HOST = "127.0.145.9"


def _config(tmp_path: Path, **kw: Any) -> PorcupineConfig:
    node = NodeConfig("p1", "porcupine", tmp_path / "data", HOST, 7946)
    kw.setdefault("domains", ("example.org",))
    return PorcupineConfig(node, b"s" * 32, **kw)


def _close(built: PorcupineNode) -> None:
    built.mail.fragment_store.close()
    built.mail.profiles.close()
    if built.replication is not None:
        built.replication.log_store.close()
        built.replication.objects.close()


def test_from_config_builds_every_part_once_and_wires_it(tmp_path: Path) -> None:
    """One node service parents mail, replication and the cluster wiring (over the node's
    user map); the cluster's profile path and managers are the ones mail uses."""
    built = PorcupineNode.from_config(
        MemoryReactorClock(), _config(tmp_path, smtp=f"tcp:0:interface={HOST}")
    )
    try:
        children = list(built.service)
        assert built.mail in children and built.cluster in children
        assert built.replication in children and built.cluster.buckets is built.user_map
        assert isinstance(built.mail, MailService) and isinstance(built.cluster, MailCluster)
        assert isinstance(built.replication, MailReplication)
        assert isinstance(built.user_map, BucketMapService)
        assert built.mail.replicator is built.cluster.replicator
        assert built.cluster.replicator.push == built.replication.push_profiles
        assert built.mail.delivery.replicated == built.replication.store
        assert built.mail.users_for("ann@example.org") is built.cluster.user_manager
        assert built.mail.mailboxes_for("p1") is built.cluster._local_mailboxes
        assert built.mail.delivery_latency is not None
        assert built.mail.endpoints["smtp"] == f"tcp:0:interface={HOST}"
    finally:
        _close(built)


def test_without_replication_no_update_log_is_built(tmp_path: Path) -> None:
    """replication=None: no MailReplication child, deliveries are plain stores."""
    built = PorcupineNode.from_config(MemoryReactorClock(), _config(tmp_path, replication=None))
    try:
        assert built.replication is None
        assert not any(isinstance(s, MailReplication) for s in built.service)
        assert built.mail.delivery.replicated is None
        assert not (tmp_path / "data" / "mail" / "replication.sqlite").exists()
    finally:
        _close(built)


def test_bad_configuration_fails_before_anything_is_built(tmp_path: Path) -> None:
    """No domain, a lone TLS file, a bad endpoint string, a bad admin string: ConfigError."""
    with pytest.raises(ConfigError, match="--domain"):
        _config(tmp_path, domains=())
    with pytest.raises(ConfigError, match="--tls-cert"):
        PorcupineConfig(
            NodeConfig("p1", "porcupine", tmp_path, HOST, 7946, tls_cert=tmp_path / "c.pem"),
            b"s" * 32,
            domains=("example.org",),
        )
    with pytest.raises(ConfigError, match="--imap"):
        PorcupineNode.from_config(MemoryReactorClock(), _config(tmp_path, imap="nonsense:1"))
    with pytest.raises(ConfigError, match="--admin"):
        PorcupineNode.from_config(MemoryReactorClock(), _config(tmp_path, admin="nonsense:1"))


def test_domains_are_normalised_and_deduplicated(tmp_path: Path) -> None:
    """--domain values: stripped, lower-cased, first one kept first, duplicates dropped."""
    config = _config(tmp_path, domains=(" Example.ORG", "b.example", "example.org", ""))
    assert config.domains == ("example.org", "b.example")


def test_replication_tunables_reach_the_replication_service(tmp_path: Path) -> None:
    """The config's ReplicationConfig is the one the node's replication core runs with."""
    tunables = ReplicationConfig(retention=3600.0, acks_before_reply=1)
    built = PorcupineNode.from_config(MemoryReactorClock(), _config(tmp_path, replication=tunables))
    try:
        assert built.replication is not None
        assert built.replication.replication.config is tunables
    finally:
        _close(built)


def test_the_tap_only_turns_options_into_a_config(tmp_path: Path) -> None:
    """twistd porcupine-node options -> PorcupineConfig, field by field (the tap builds
    nothing itself: makeService hands this to PorcupineNode.from_config)."""
    import os

    from yimaporc.tap.porcupine import Options, porcupine_config

    options = Options()
    options.parseOptions(
        ["--node-id", "p7", "--data-dir", str(tmp_path / "d"), "--cluster", f"{HOST}:7946",
         "--domain", "Example.org", "--domain", "b.example", "--smtp", f"tcp:0:interface={HOST}",
         "--imap", f"tcp:0:interface={HOST}", "--acks-before-reply", "1",
         "--mail-index-rows", "0", "--max-message-size", "4096", "--auth-cache-ttl", "0",
         "--forward-deliveries"]
    )  # fmt: skip
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        config = porcupine_config(options)
    finally:
        os.umask(umask)  # node_config sets the node's private umask
    assert (config.node.node_id, config.node.cluster_port) == ("p7", 7946)
    assert config.domains == ("example.org", "b.example")
    assert (config.smtp, config.imap, config.pop3) == (f"tcp:0:interface={HOST}",) * 2 + (None,)
    assert config.replication is not None and config.replication.acks_before_reply == 1
    assert (config.mail_index_rows, config.max_message_size, config.auth_cache_ttl) == (
        0,
        4096,
        0.0,
    )
    assert (tmp_path / "d" / "cluster.secret").exists() and len(config.secret) >= 16
    assert config.forward_deliveries, "--forward-deliveries (off by default)"


def test_from_config_chooses_fragments_and_copies_read_from_the_least_loaded(
    tmp_path: Path,
) -> None:
    """A clustered node with replication: fragments over the cluster (home from the
    cluster, replication's hooks, this node's UIDNEXT record) and replicated copies read
    in the order of the cluster balancer's load figures."""
    reactor = MemoryReactorClock()
    built = PorcupineNode.from_config(reactor, _config(tmp_path))
    try:
        retrieval = built.mail.retrieval
        layout, copies = retrieval.layout, retrieval.copy_policy
        assert isinstance(layout, Fragmented) and layout.replica is built.replication
        assert isinstance(copies, ReplicatedCopies)
        mail = retrieval.open("ann@example.org")
        assert mail.home == built.cluster.home_of("ann@example.org")
        assert mail.local == "p1" and mail.shown is not None and mail.now is not None
        built.cluster.balancer.observe("p2", 9.0, reactor.seconds())
        built.cluster.balancer.observe("p3", 1.0, reactor.seconds())
        assert copies.read_order(mail, ["p2", "p3"]) == ["p3", "p2"]
    finally:
        _close(built)


def test_from_config_without_replication_keeps_single_copies(tmp_path: Path) -> None:
    """replication=None: fragments over the cluster without replication's hooks, and
    one copy of each message (changes go to every node listing it)."""
    built = PorcupineNode.from_config(MemoryReactorClock(), _config(tmp_path, replication=None))
    try:
        layout = built.mail.retrieval.layout
        assert isinstance(layout, Fragmented) and layout.replica is None
        assert isinstance(built.mail.retrieval.copy_policy, SingleCopies)
    finally:
        _close(built)
