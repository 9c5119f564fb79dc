"""Options every node kind shares, checked up front (UsageError on bad input)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from twisted.application.service import IService, Service
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from .._files import PRIVATE_UMASK, private_dir
from .._reactor import node_reactor
from ..cluster.node import ClusterNode, ConfigError, NodeConfig, parse_cluster_address, parse_join
from ..cluster.wire import check_scope_name
from ..logs import DEFAULT_MAX_BYTES, DEFAULT_MAX_FILES, node_log_observer, with_log_observer
from ..logs import PER_KEY as LOG_PER_KEY
from ..secret import SecretError, load_or_create_secret
from .privileges import RunAs, code_dirs, lookup_account, unreadable_for

#: The smallest --log-max-bytes accepted (a smaller file would rotate on every event).
MIN_LOG_BYTES = 4096


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
        ["log-format", None, "text", "Log lines as text or json (twisted.logger's JSON)."],
        ["log-max-bytes", None, str(DEFAULT_MAX_BYTES),
         "Rotate the --logfile when it reaches this many bytes."],
        ["log-max-files", None, str(DEFAULT_MAX_FILES),
         "Keep at most this many rotated log files (older ones are deleted)."],
        ["log-rate", None, str(LOG_PER_KEY),
         "At most this many log events per source (same message, or same client) "
         "per 10 s, then one 'suppressed N' line; 0: no limit."],
        ["user", None, None, "Start as root, bind the ports, then run as this user."],
        ["group", None, None, "Group to run as with --user (default: the user's group)."],
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
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError("--log-format must be text or json")
        for name, least in (
            ("log-max-bytes", MIN_LOG_BYTES),
            ("log-max-files", 1),
            ("log-rate", 0),
        ):
            value = str(self[name])
            if not value.isdigit() or int(value) < least:
                raise usage.UsageError(f"--{name} must be a whole number >= {least}")
            self[name] = int(value)
        self["cluster-name"] = self["cluster-name"] or self.kind
        try:
            check_scope_name(self["cluster-name"], "--cluster-name")
        except ValueError as e:
            raise usage.UsageError(str(e)) from e
        data_dir = Path(self["data-dir"]).absolute()
        self["data-dir"] = data_dir
        self["secret-file"] = Path(self["secret-file"] or data_dir / "cluster.secret")
        if self["group"] and not self["user"]:
            raise usage.UsageError("--group needs --user")
        self["run-as"] = None
        if self["user"]:
            try:
                self["run-as"] = lookup_account(self["user"], self["group"])
            except (KeyError, ValueError) as e:
                raise usage.UsageError(str(e.args[0] if e.args else e)) from e
            if os.geteuid() != 0 and self["run-as"].uid != os.geteuid():
                raise usage.UsageError("--user: the node must start as root to switch user")
            unreadable = unreadable_for(self["run-as"], code_dirs())
            if unreadable:
                raise usage.UsageError(
                    f"--user {self['user']} cannot read {', '.join(unreadable)}: Python and "
                    "yimaporc must be installed where that user can read them"
                )


#: What the disk can refuse while a node is built (a full or read-only data disk,
#: a directory it may not write): the node then exits with one line that says so.
DISK_ERRORS: tuple[type[BaseException], ...] = (OSError, sqlite3.Error)


def cannot_start(kind: str, error: BaseException) -> SystemExit:
    """The exit of a node that could not be built from its data directory (a full
    disk at start, for one): twistd prints this line and exits 1, no traceback."""
    return SystemExit(f"{kind}-node cannot start: {error}")


def node_config(options: NodeOptions) -> tuple[NodeConfig, bytes]:
    """The :class:`NodeConfig` and cluster secret of parsed ``options``.

    Sets the process umask to 077 first: whatever the node creates is its own
    user's alone (0600 files, 0700 directories).
    """
    data_dir: Path = options["data-dir"]
    os.umask(PRIVATE_UMASK)
    private_dir(data_dir)
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
        tls_cert=Path(options["tls-cert"]) if options["tls-cert"] else None,
        tls_key=Path(options["tls-key"]) if options["tls-key"] else None,
        tls_ca=Path(options["tls-ca"]) if options["tls-ca"] else None,
        cluster_name=options["cluster-name"],
    )
    return config, secret


def run_as(options: NodeOptions) -> RunAs | None:
    """With ``--user``, the service that switches user before the ports are bound."""
    account = options.get("run-as")
    if account is None:
        return None
    disks = [Path(path).absolute() for path, _ in options.get("disks", [])]
    return RunAs(account, [options["data-dir"], *disks], _ports(options))


def _ports(options: NodeOptions) -> list[int]:
    """Every TCP/UDP port number the node's options name (for the bind capability)."""
    ports = [int(options["cluster-port"])]
    for name in ("admin", "smtp", "pop3", "imap", "rtsp"):
        value = options.get(name) if hasattr(options, "get") else None
        if value:
            fields = str(value).split(":")
            digits = [f for f in fields[1:2] if f.isdigit()]
            ports.append(int(digits[0]) if digits else -1)  # -1: not known
    return ports


class StopIfCannotStart(Service):
    """The tap's answer to a port that cannot be bound: log it and stop the reactor.

    The node only reports it (:meth:`ClusterNode.when_ready` fails); an
    embedding application chooses its own answer.  Added as the node's last
    child, so every other child has started listening when this one starts.
    """

    log = Logger()

    def __init__(self, node: ClusterNode, reactor: IReactorCore) -> None:
        self.node = node
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
        self.node.when_ready().addErrback(self._stop)

    def _stop(self, failure: Failure) -> None:
        self.log.critical(
            "node {node} cannot start: {why}", node=self.node.node_id, why=failure.getErrorMessage()
        )
        # Ports may fail while twistd is still starting the reactor up.
        self.reactor.callWhenRunning(self.reactor.stop)


def install_logging(service: IService, options: NodeOptions, reactor: IReactorCore) -> IService:
    """``service`` set up so that twistd logs per ``--log-format``/``--log-max-*``."""
    observer = node_log_observer(
        options,
        node_reactor(reactor),
        log_format=options["log-format"],
        max_bytes=options["log-max-bytes"],
        max_files=options["log-max-files"],
        rate=options["log-rate"],
    )
    if isinstance(service, ClusterNode):
        StopIfCannotStart(service, reactor).setServiceParent(service)
    return with_log_observer(service, observer)
