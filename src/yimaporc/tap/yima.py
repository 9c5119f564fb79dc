"""``twistd yima-node``: options -> service."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from .._reactor import node_reactor
from ..cluster.node import ConfigError
from ..yima._rtsp_relay import MAX_RELAY_BATCH, RELAY_BATCH
from ..yima.node import MAX_SEND_AHEAD, MODES, YimaConfig, YimaNode
from ..yima.streaming import DEFAULT_CACHE_BYTES
from ..yima.workers import default_workers
from .common import DISK_ERRORS, NodeOptions, cannot_start, install_logging, node_config, run_as

# --rtsp-NAME, RtspServerFactory keyword, default, help, type (docs/wire.md, "Sessions
# under load"); "auto" leaves the keyword out (the factory's default).
RTSP_GUARDS: list[tuple[str, str, str, str, type]] = [
    ("max-sessions", "max_sessions", "1024", "RTSP sessions of this node in all (503 beyond).",
     int),
    ("max-sessions-per-client", "max_sessions_per_client", "64",
     "RTSP sessions of one client address (453 beyond).", int),
    ("setup-timeout", "setup_timeout", "15",
     "Seconds a SETUP never followed by PLAY lives without a request.", float),
    ("idle-timeout", "idle_timeout", "30",
     "Seconds an RTSP connection without a request and without a live session stays open.",
     float),
    ("max-connections", "max_connections", "auto",
     "RTSP connections of this node in all (503 beyond; auto: half the open-file limit "
     "less 128, at least 16).", int),
]  # fmt: skip


class Options(NodeOptions):
    """yima-node options (CONTRACT §2)."""

    kind = "yima"
    optParameters: list[list[Any]] = [
        *NodeOptions.optParameters,
        ["rtsp", None, None, "RTSP endpoint, e.g. tcp:8554:interface=127.0.2.1."],
        [
            "mode",
            None,
            "bipartite",
            "Delivery design: bipartite (Yima-2) or master-slave (Yima-1).",
        ],
        [
            "send-path",
            None,
            "auto",
            "How RTP leaves the node: auto, gso (one sendmsg per batch with UDP_SEGMENT), "
            "sendmmsg, or sendto (one call per datagram). auto: the first the kernel has.",
        ],
        [
            "send-ahead-ms",
            None,
            "10",
            "Milliseconds a delivery tick looks ahead: a session's packets due within it "
            "leave together in one send (GSO), none more than this early (0..200).",
        ],
        [
            "relay-send-ahead-ms",
            None,
            "10",
            "Milliseconds a relay release looks ahead: a relayed session's packets due "
            "within it are forwarded in one send (GSO), none more than this early (0..200).",
        ],
        [
            "relay-batch-ms",
            None,
            f"{RELAY_BATCH * 1000:g}",
            "Milliseconds of a relayed session's packets the nodes send at once (the "
            "sessions this node relays: the relay holds each to its due instant anyway); "
            f"0: the nodes' own send-ahead (0..{MAX_RELAY_BATCH * 1000:.0f}).",
        ],
        [
            "block-cache-mb",
            None,
            str(DEFAULT_CACHE_BYTES >> 20),
            "Memory bound of the delivery block cache in MiB (the cache holds the "
            "sessions' working set of blocks, up to this).",
        ],
        [
            "workers",
            None,
            "auto",
            "Delivery worker processes: sessions are sharded over N processes that "
            "schedule and send their packets (auto, the default: one per core, at most 8, "
            "so 1 on a single core; 0 or 1: in this process).",
        ],
        *(
            [f"rtsp-{name}", None, default, text]
            for name, _key, default, text, _kind in RTSP_GUARDS
        ),
    ]

    def __init__(self) -> None:
        super().__init__()
        self["disks"] = []

    def opt_disk(self, value: str) -> None:
        """A disk PATH[:CAPACITY] (may repeat; default DATA_DIR/disks/0)."""
        path, sep, cap = value.rpartition(":")
        if sep and cap.isdigit():
            self["disks"].append((path, int(cap)))
        else:
            self["disks"].append((value, None))

    def postOptions(self) -> None:
        """Common checks, then the media ones."""
        super().postOptions()
        if self["mode"] not in MODES:
            raise usage.UsageError("--mode must be bipartite or master-slave")
        from ..yima.sendpath import SEND_PATHS

        if self["send-path"] not in SEND_PATHS:
            raise usage.UsageError(f"--send-path must be one of {', '.join(SEND_PATHS)}")
        try:
            cache_mb = int(self["block-cache-mb"])
        except ValueError:
            raise usage.UsageError("--block-cache-mb must be a whole number of MiB") from None
        if cache_mb < 1:
            raise usage.UsageError("--block-cache-mb must be at least 1")
        self["cache_bytes"] = cache_mb << 20
        try:
            ahead_ms = float(self["send-ahead-ms"])
        except ValueError:
            raise usage.UsageError("--send-ahead-ms must be a number of milliseconds") from None
        if not 0 <= ahead_ms <= MAX_SEND_AHEAD * 1000:
            raise usage.UsageError(
                f"--send-ahead-ms must be 0..{MAX_SEND_AHEAD * 1000:.0f} milliseconds"
            )
        self["send_ahead"] = ahead_ms / 1000.0
        try:
            relay_ms = float(self["relay-send-ahead-ms"])
        except ValueError:
            raise usage.UsageError(
                "--relay-send-ahead-ms must be a number of milliseconds"
            ) from None
        if not 0 <= relay_ms <= MAX_SEND_AHEAD * 1000:
            raise usage.UsageError(
                f"--relay-send-ahead-ms must be 0..{MAX_SEND_AHEAD * 1000:.0f} milliseconds"
            )
        self["relay_send_ahead"] = relay_ms / 1000.0
        try:
            batch_ms = float(self["relay-batch-ms"])
        except ValueError:
            raise usage.UsageError("--relay-batch-ms must be a number of milliseconds") from None
        if not 0 <= batch_ms <= MAX_RELAY_BATCH * 1000:
            raise usage.UsageError(
                f"--relay-batch-ms must be 0..{MAX_RELAY_BATCH * 1000:.0f} milliseconds"
            )
        self["relay_batch"] = batch_ms / 1000.0
        if self["workers"] == "auto":
            self["workers_n"] = default_workers()
        else:
            try:
                self["workers_n"] = int(self["workers"])
            except ValueError:
                raise usage.UsageError("--workers must be auto or a whole number") from None
            if not 0 <= self["workers_n"] <= 256:
                raise usage.UsageError("--workers must be auto or 0..256")
        guards: dict[str, Any] = {}
        for name, key, default, _text, kind in RTSP_GUARDS:
            if self[f"rtsp-{name}"] == "auto" == default:
                continue
            try:
                value = kind(self[f"rtsp-{name}"])
            except ValueError:
                what = "a number or auto" if default == "auto" else "a number"
                raise usage.UsageError(f"--rtsp-{name} must be {what}") from None
            if not value > 0:
                raise usage.UsageError(f"--rtsp-{name} must be positive")
            guards[key] = value
        self["rtsp_guards"] = guards


def yima_config(options: Options) -> YimaConfig:
    """The :class:`YimaConfig` of parsed ``options`` (creates the data dir and secret)."""
    node, secret = node_config(options)
    try:
        return YimaConfig(
            node,
            secret,
            disks=options["disks"],
            rtsp=options["rtsp"],
            admin=options["admin"],
            mode=options["mode"],
            rtsp_guards=options["rtsp_guards"],
            send_path=options["send-path"],
            cache_bytes=options["cache_bytes"],
            workers=options["workers_n"],
            send_ahead=options["send_ahead"],
            relay_send_ahead=options["relay_send_ahead"],
            relay_batch=options["relay_batch"],
        )
    except ConfigError as e:
        raise usage.UsageError(str(e)) from e


def makeService(options: Options) -> IService:
    """The Yima node built by its composition root, with twistd's logging."""
    from twisted.internet import reactor

    try:
        config = yima_config(options)
        switch = run_as(options)
        node = YimaNode.from_config(
            node_reactor(reactor), config, first=[switch] if switch is not None else []
        )
    except ConfigError as e:
        raise usage.UsageError(str(e)) from e
    except DISK_ERRORS as e:
        raise cannot_start("yima", e) from e
    return install_logging(node.service, options, reactor)
