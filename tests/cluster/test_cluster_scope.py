"""Cluster scope (name + node kind): datagrams, keys, options and persisted state."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.python import usage

from yimaporc.cluster import wire
from yimaporc.cluster.membership import Membership, View
from yimaporc.cluster.node import ClusterNode, ConfigError, NodeConfig
from yimaporc.cluster.udp import MembershipProtocol
from yimaporc.local_cluster import node_argv, secret_path
from yimaporc.secret import cluster_key, derive_key
from yimaporc.tap import porcupine as porcupine_tap
from yimaporc.tap import yima as yima_tap

SECRET = b"one secret for both clusters"
MAIL = wire.Scope("mail", "porcupine")
MEDIA = wire.Scope("media", "yima")


def key(scope: wire.Scope) -> bytes:
    return cluster_key(SECRET, "membership", scope.cluster, scope.kind)


def ping(scope: wire.Scope, seq: int = 1) -> bytes:
    header = wire.Header("p1", "10.0.1.1:7946", 5, seq, 3)
    return wire.serialize(key(scope), scope, header, wire.Ping(4, 9))


def shell(scope: wire.Scope) -> tuple[MembershipProtocol, list[View]]:
    views: list[View] = []
    me = wire.Member("y1", "10.0.2.1:7946", 1)
    core = Membership(me, rng=random.Random(1))
    proto = MembershipProtocol(core, key(scope), Clock(), lambda o, n: views.append(n), scope=scope)
    proto.startProtocol()
    return proto, views


def test_keys_differ_per_cluster_and_kind_with_one_secret() -> None:
    """One secret gives different membership keys per cluster name and per kind."""
    keys = {
        cluster_key(SECRET, "membership", c, k)
        for c in ("mail", "media")
        for k in ("porcupine", "yima")
    }
    assert len(keys) == 4
    assert cluster_key(SECRET, "rpc", "mail", "porcupine") != key(MAIL)
    assert derive_key(SECRET, "membership") not in keys


@pytest.mark.parametrize(
    "other", [MEDIA, wire.Scope("mail", "yima"), wire.Scope("media", "porcupine")]
)
def test_datagram_of_one_scope_is_refused_by_another(other: wire.Scope) -> None:
    """A genuine datagram of mail/porcupine is WrongScope for any other cluster or kind."""
    with pytest.raises(wire.WrongScope):
        wire.parse(key(other), other, ping(MAIL))
    assert wire.parse(key(MAIL), MAIL, ping(MAIL)).header.sender == "p1"


def test_relabelled_datagram_fails_the_mac() -> None:
    """Rewriting the scope label of a captured datagram breaks its MAC, even with one secret."""
    raw = ping(MAIL)
    relabelled = raw.replace(b"\x04mail\x09porcupine", b"\x05media\x04yima", 1)
    assert relabelled != raw
    with pytest.raises(wire.BadMac):
        wire.parse(key(MEDIA), MEDIA, relabelled)


def test_version_1_datagram_is_malformed() -> None:
    """A datagram in the old unscoped format (magic YPM1) never parses."""
    raw = ping(MAIL)
    with pytest.raises(wire.MalformedPacket, match="magic"):
        wire.parse(key(MAIL), MAIL, b"YPM1" + raw[4:])


def test_scope_names_are_checked() -> None:
    """Scope names are 1-64 ASCII letters, digits, '.', '_' or '-'."""
    for bad in ("", "a b", "x" * 65, "-lead", "caf\u00e9", "a\0b"):
        with pytest.raises(ValueError):
            wire.Scope(bad, "yima")
    assert wire.Scope("Prod.eu-1_a", "yima").cluster == "Prod.eu-1_a"


def test_shell_drops_other_scope_and_still_refuses_replays() -> None:
    """A yima shell drops a porcupine datagram (counted, no view change); a mail shell
    accepts it once and refuses its replay."""
    media, media_views = shell(MEDIA)
    data = ping(MAIL)
    for _ in range(3):
        media.datagramReceived(data, ("10.0.1.1", 7946))
    assert media.stats["dropped_wrong_scope"] == 3 and media.stats["accepted"] == 0
    assert [v.node_ids for v in media_views] == [("y1",)]
    assert media.core.known_addresses() == []
    mail, _ = shell(MAIL)
    mail.datagramReceived(data, ("10.0.1.1", 7946))
    mail.datagramReceived(data, ("10.0.1.1", 7946))
    assert mail.stats["accepted"] == 1 and mail.stats["dropped_replayed"] == 1


def node(tmp_path: Path, kind: str = "yima", name: str = "") -> ClusterNode:
    cfg = NodeConfig("n1", kind, tmp_path, "127.0.0.1", 7946, cluster_name=name)
    return ClusterNode(Clock(), cfg, SECRET, rng=random.Random(1))


def test_node_default_cluster_name_is_its_kind(tmp_path: Path) -> None:
    """Without a cluster name a node's scope is kind/kind, and its keys are that scope's."""
    n = node(tmp_path)
    assert n.scope == wire.Scope("yima", "yima")
    assert n.membership_key == cluster_key(SECRET, "membership", "yima", "yima")
    assert n.status()["cluster"] == "yima"
    assert node(tmp_path / "b", name="media").membership_key != n.membership_key


def test_state_from_before_scopes_forgets_known_addresses(tmp_path: Path) -> None:
    """A membership.json written before scopes keeps its epoch but not its addresses."""
    old = {"epoch": 7, "lamport": 9, "incarnation": 3, "known": ["10.0.1.1:7946"]}
    (tmp_path / "membership.json").write_text(json.dumps(old))
    n = node(tmp_path)
    assert (n.state.epoch, n.state.known) == (7, [])
    assert (n.state.cluster, n.state.kind) == ("yima", "yima")


def test_state_of_the_same_scope_is_kept(tmp_path: Path) -> None:
    """Addresses remembered under this node's own scope survive a restart."""
    doc = {"epoch": 7, "lamport": 9, "incarnation": 3, "known": ["10.0.2.2:7946"],
           "cluster": "yima", "kind": "yima"}  # fmt: skip
    (tmp_path / "membership.json").write_text(json.dumps(doc))
    assert node(tmp_path).state.known == ["10.0.2.2:7946"]


def test_state_of_another_kind_is_refused(tmp_path: Path) -> None:
    """A yima node started on a porcupine node's data dir fails with a clear message."""
    doc = {"epoch": 1, "lamport": 1, "incarnation": 1, "known": [],
           "cluster": "porcupine", "kind": "porcupine"}  # fmt: skip
    (tmp_path / "membership.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="porcupine node"):
        node(tmp_path)


def test_cluster_name_option(tmp_path: Path) -> None:
    """--cluster-name defaults to the kind and rejects names outside the allowed set."""
    base = ["--node-id", "y1", "--data-dir", str(tmp_path), "--cluster", "127.0.0.1:7946"]
    o = yima_tap.Options()
    o.parseOptions(base)
    assert o["cluster-name"] == "yima"
    o = porcupine_tap.Options()
    o.parseOptions([*base, "--domain", "example.org", "--cluster-name", "mail-eu"])
    assert o["cluster-name"] == "mail-eu"
    with pytest.raises(usage.UsageError, match="--cluster-name"):
        yima_tap.Options().parseOptions([*base, "--cluster-name", "no spaces"])
    with pytest.raises(usage.UsageError, match="--tls-ca"):
        yima_tap.Options().parseOptions([*base, "--tls-ca", str(tmp_path / "ca.pem")])


def test_local_cluster_gives_each_cluster_its_secret_and_name(tmp_path: Path) -> None:
    """local-cluster starts mail and media nodes with different secrets and cluster names."""
    argvs = {
        kind: node_argv(kind, 1, tmp_path, secret_path(tmp_path, kind))[2]
        for kind in ("porcupine", "yima")
    }

    def opt(argv: list[str], name: str) -> str:
        return argv[argv.index(name) + 1]

    assert opt(argvs["porcupine"], "--secret-file") != opt(argvs["yima"], "--secret-file")
    assert opt(argvs["porcupine"], "--cluster-name") == "local-porcupine"
    assert opt(argvs["yima"], "--cluster-name") == "local-yima"


_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
_scopes = st.builds(wire.Scope, _names, st.sampled_from(["porcupine", "yima"]))


@given(_scopes, _scopes)
def test_no_datagram_crosses_scopes(a: wire.Scope, b: wire.Scope) -> None:
    """For any two scopes sharing one secret, a datagram of one parses only in its own."""
    data = ping(a)
    if a == b:
        assert wire.parse(key(b), b, data).body == wire.Ping(4, 9)
    else:
        with pytest.raises(wire.WrongScope):
            wire.parse(key(b), b, data)
