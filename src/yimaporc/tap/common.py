"""Options every node kind shares, checked up front (UsageError on bad input)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from twisted.python import usage

from ..cluster.node import ClusterNode, ConfigError, NodeConfig, parse_cluster_address, parse_join
from ..cluster.wire import check_scope_name
from ..secret import SecretError, load_or_create_secret


class NodeOptions(usage.Options):
    """``--node-id --data-dir --cluster [--join ...] [--admin] [--secret-file] [--tls-*]``."""

    optParameters: list[list[Any]] = [
        ["node-id", None, None, "This node's id (unique in the cluster)."],
        ["data-dir", None, None, "Directory for this node's state."],
        ["cluster", None, None, "Membership/RPC address, e.g. tcp:7946:interface=127.0.1.1."],
        ["admin", None, None, "Admin API endpoint, e.g. tcp:8080:interface=127.0.1.1."],
        ["secret-file", None, None, "Shared cluster secret (default DATA_DIR/cluster.secret)."],
        ["tls-cert", None, None, "PEM certificate (enables TLS where supported)."],
        ["tls-key", None, None, "PEM private key for --tls-cert."],
        ["tls-ca", None, None,
         "PEM CA certificate that signs every member's --tls-cert; cluster peers must "
         "present a certificate it verifies (default: --tls-cert itself)."],
        ["cluster-name", None, None,
         "Name of this cluster (default: the node kind); part of every membership "
         "datagram and RPC handshake, so clusters sharing a secret stay apart."],
    ]  # fmt: skip
    kind = "node"

    def __init__(self) -> None:
        super().__init__()
        self["join"] = []

    def opt_join(self, value: str) -> None:
        """An existing member HOST:PORT (may repeat)."""
        try:
            self["join"].append(parse_join(value))
        except ConfigError as e:
            raise usage.UsageError(str(e)) from e

    def postOptions(self) -> None:
        """Fail fast on missing or malformed options."""
        for name in ("node-id", "data-dir", "cluster"):
            if not self[name]:
                raise usage.UsageError(f"--{name} is required")
        node_id = self["node-id"]
        if (
            len(node_id.encode()) > 64
            or not node_id.replace("-", "").replace("_", "").replace(".", "").isalnum()
        ):
            raise usage.UsageError("--node-id: use 1-64 letters, digits, '-', '_' or '.'")
        try:
            self["cluster-host"], self["cluster-port"] = parse_cluster_address(self["cluster"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from e
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        if self["tls-ca"] and not self["tls-cert"]:
            raise usage.UsageError("--tls-ca needs --tls-cert and --tls-key")
        for name in ("tls-cert", "tls-key", "tls-ca"):
            if self[name] and not Path(self[name]).is_file():
                raise usage.UsageError(f"--{name} {self[name]}: no such file")
        self["cluster-name"] = self["cluster-name"] or self.kind
        try:
            check_scope_name(self["cluster-name"], "--cluster-name")
        except ValueError as e:
            raise usage.UsageError(str(e)) from e
        data_dir = Path(self["data-dir"]).absolute()
        self["data-dir"] = data_dir
        self["secret-file"] = Path(self["secret-file"] or data_dir / "cluster.secret")


def build_node(reactor: Any, options: NodeOptions) -> ClusterNode:
    """The common :class:`ClusterNode` for parsed ``options``."""
    data_dir: Path = options["data-dir"]
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        secret = load_or_create_secret(options["secret-file"])
    except SecretError as e:
        raise usage.UsageError(str(e)) from e
    config = NodeConfig(
        node_id=options["node-id"],
        kind=options.kind,
        data_dir=data_dir,
        cluster_host=options["cluster-host"],
        cluster_port=options["cluster-port"],
        join=tuple(options["join"]),
        admin=options["admin"],
        tls_cert=Path(options["tls-cert"]) if options["tls-cert"] else None,
        tls_key=Path(options["tls-key"]) if options["tls-key"] else None,
        tls_ca=Path(options["tls-ca"]) if options["tls-ca"] else None,
        cluster_name=options["cluster-name"],
    )
    try:
        return ClusterNode(reactor, config, secret, rng=random.SystemRandom())
    except ConfigError as e:
        raise usage.UsageError(str(e)) from e
