"""``twistd porcupine-node``: options -> service."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from .common import NodeOptions, build_node


class Options(NodeOptions):
    """porcupine-node options (CONTRACT §2)."""

    kind = "porcupine"
    optParameters: list[list[Any]] = [
        *NodeOptions.optParameters,
        ["domain", None, None, "Mail domain this cluster serves (required)."],
        ["smtp", None, None, "SMTP endpoint, e.g. tcp:2525:interface=127.0.1.1."],
        ["pop3", None, None, "POP3 endpoint."],
        ["imap", None, None, "IMAP endpoint."],
    ]

    def postOptions(self) -> None:
        """Common checks, then the mail ones."""
        super().postOptions()
        from twisted.python import usage

        if not self["domain"]:
            raise usage.UsageError("--domain is required")


def makeService(options: Options) -> IService:
    """The node, its user map, and whatever mail services exist."""
    from twisted.internet import reactor

    from ..cluster.bucketservice import BucketMapService

    node = build_node(reactor, options)
    user_map = BucketMapService(node)
    node.add_status(user_map.status)
    return node
