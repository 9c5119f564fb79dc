"""Embed a yimaporc cluster node in your own Twisted application.

Run two of these (they find each other through --join) and watch the views:

    python examples/embed_cluster_node.py a 127.0.0.1:7001
    python examples/embed_cluster_node.py b 127.0.0.1:7002 127.0.0.1:7001

The node brings membership (TRM), authenticated RPC and the common clock; your
application adds its own RPC commands and listens to membership changes.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from twisted.internet import reactor, task
from twisted.protocols import amp
from zope.interface import implementer

from yimaporc.cluster.membership import IMembershipListener, View
from yimaporc.cluster.node import ClusterNode, NodeConfig


class Hello(amp.Command):
    """This application's own node-to-node command."""

    arguments = [(b"name", amp.Unicode())]
    response = [(b"greeting", amp.Unicode())]


@implementer(IMembershipListener)
class Greeter:
    """Greets every new member over RPC."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node

    def membership_changed(self, old: View, new: View) -> None:
        print(f"epoch {new.epoch}: {', '.join(new.node_ids)}")
        for m in new.members:
            if m.node_id != self.node.node_id and old.member(m.node_id) is None:
                d = self.node.rpc.call(m.address, Hello, name=self.node.node_id)
                d.addCallback(lambda r: print("  ", r["greeting"]))
                d.addErrback(lambda f: print("   rpc failed:", f.getErrorMessage()))


def main(node_id: str, address: str, *join: str) -> None:
    host, _, port = address.rpartition(":")
    data = Path(tempfile.mkdtemp(prefix=f"yimaporc-{node_id}-"))
    config = NodeConfig(node_id, "example", data, host, int(port), join=join)
    node = ClusterNode(reactor, config, secret=b"example shared secret, use a file")
    node.registry.register(Hello, lambda name: {"greeting": f"{node_id} says hello to {name}"})
    node.subscribe(Greeter(node))
    node.startService()
    # A port that cannot be bound is reported, not fatal: the application decides.
    node.when_ready().addErrback(lambda f: print("cannot start:", f.getErrorMessage()))
    task.LoopingCall(lambda: print(f"cluster time {node.cluster_time():.3f}")).start(5.0)
    reactor.run()


if __name__ == "__main__":
    main(*sys.argv[1:])
