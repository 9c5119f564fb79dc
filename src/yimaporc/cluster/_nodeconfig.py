"""What a node is told: :class:`NodeConfig` and the checks of the options every node
kind shares (``--cluster``, ``--join``, TLS files), failing with :class:`ConfigError`.

Re-exported by :mod:`.node`, where :class:`~.node.ClusterNode` runs with it.
"""

from __future__ import annotations

from pathlib import Path

import attrs
from twisted.internet import ssl

from .membership import TrmConfig
from .wire import Scope


class ConfigError(Exception):
    """A node option is wrong (the message is user-facing)."""


def parse_cluster_address(value: str) -> tuple[str, int]:
    """``tcp:7946:interface=127.0.1.1``, ``udp:...`` or ``HOST:PORT`` -> (host, port)."""
    parts = value.split(":")
    if parts[0] in ("tcp", "udp"):
        if len(parts) < 2 or not parts[1].isdigit():
            raise ConfigError(f"--cluster {value!r}: expected tcp:PORT:interface=IP")
        port = int(parts[1])
        opts = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
        unknown = set(opts) - {"interface"}
        if unknown:
            raise ConfigError(
                f"--cluster {value!r}: unknown option(s) {', '.join(sorted(unknown))}"
            )
        host = opts.get("interface", "")
        if not host or host in ("0.0.0.0", "::"):
            raise ConfigError(
                f"--cluster {value!r}: give interface=IP so peers can reach this node"
            )
    else:
        host, sep, p = value.rpartition(":")
        if not sep or not host or not p.isdigit():
            raise ConfigError(f"--cluster {value!r}: expected HOST:PORT or tcp:PORT:interface=IP")
        port = int(p)
    if not 0 < port < 65536:
        raise ConfigError(f"--cluster {value!r}: port out of range")
    return host, port


def parse_join(value: str) -> str:
    """Check a ``--join HOST:PORT`` seed."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--join {value!r}: expected HOST:PORT")
    return f"{host}:{int(port)}"


@attrs.frozen
class NodeConfig:
    """Options every node kind shares."""

    node_id: str
    kind: str
    data_dir: Path
    cluster_host: str
    cluster_port: int
    join: tuple[str, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    trm: TrmConfig = attrs.field(factory=TrmConfig)
    cluster_name: str = ""
    tls_ca: Path | None = None

    @property
    def cluster_address(self) -> str:
        """``host:port`` peers use for datagrams and RPC."""
        return f"{self.cluster_host}:{self.cluster_port}"

    @property
    def scope(self) -> Scope:
        """The cluster this node belongs to: its name (default: the kind) and its kind."""
        try:
            return Scope(self.cluster_name or self.kind, self.kind)
        except ValueError as e:
            raise ConfigError(str(e)) from e


def load_tls(cert: Path | None, key: Path | None) -> ssl.PrivateCertificate | None:
    """The node's certificate and key (PEM files), if configured."""
    if cert is None or key is None:
        return None
    try:
        return ssl.PrivateCertificate.loadPEM(cert.read_text() + "\n" + key.read_text())
    except (OSError, ValueError, Exception) as e:
        raise ConfigError(f"cannot load --tls-cert/--tls-key: {e}") from e


def load_ca(path: Path) -> ssl.Certificate:
    """The CA certificate (PEM) that signs every member's cluster certificate."""
    try:
        return ssl.Certificate.loadPEM(path.read_bytes())
    except (OSError, ValueError, Exception) as e:
        raise ConfigError(f"cannot load --tls-ca {path}: {e}") from e
