"""``twistd yima-node``: options -> service."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from .common import NodeOptions, build_node, install_logging


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
        if self["mode"] not in ("bipartite", "master-slave"):
            raise usage.UsageError("--mode must be bipartite or master-slave")


def makeService(options: Options) -> IService:
    """The node with Yima's storage service (and whatever media services exist)."""
    from twisted.internet import reactor

    from ..yima.service import YimaStorageService

    node = build_node(reactor, options)
    storage = YimaStorageService.from_config(node, reactor, options["disks"])
    storage.setServiceParent(node)
    from ..yima.rtspservice import YimaStreamingService

    streaming = YimaStreamingService(
        node, reactor, storage, rtsp_endpoint=options["rtsp"], mode=options["mode"]
    )
    streaming.setServiceParent(node)
    return install_logging(node, options, reactor)
