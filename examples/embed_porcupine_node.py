"""Embed a Porcupine mail node in your own Twisted application, built the way
``twistd porcupine-node`` is.

    python examples/embed_porcupine_node.py DATA_DIR [HOST] [CLUSTER_PORT] [SMTP_PORT]

``PorcupineNode.from_config`` builds the whole node once (cluster membership and
RPC, the user map, the mail service with SMTP, POP3 and IMAP, replication, the
cluster wiring); the application then owns it: it parents the service and decides
what a port that cannot be bound means (``when_ready()`` fails with ``CannotStart``;
the node never stops the reactor).  The mail listeners here are on port 0 (SMTP
too unless SMTP_PORT is given): the node tells which ports it got.  Once ready the
application adds the user ann@example.org (password ``secret``) and prints one
line per listener, then ``ready``.  Other members join with ``--join``-style seeds
in ``NodeConfig(join=...)``; the cluster port is fixed (UDP and TCP share it).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure

from yimaporc.cluster.node import NodeConfig
from yimaporc.porcupine.node import PorcupineConfig, PorcupineNode
from yimaporc.porcupine.values import UserExists
from yimaporc.secret import load_or_create_secret


def main(data_dir: str, host: str = "127.0.0.1", cluster_port: str = "7946", smtp: str = "0") -> None:  # fmt: skip
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    data = Path(data_dir).absolute()
    data.mkdir(parents=True, exist_ok=True)
    config = PorcupineConfig(
        NodeConfig("m1", "porcupine", data, host, int(cluster_port)),
        load_or_create_secret(data / "cluster.secret"),
        domains=("example.org",),
        smtp=f"tcp:{smtp}:interface={host}",
        pop3=f"tcp:0:interface={host}",
        imap=f"tcp:0:interface={host}",
    )
    mail = PorcupineNode.from_config(reactor, config)
    application = MultiService()  # your application's own service tree
    mail.service.setServiceParent(application)
    application.startService()
    reactor.addSystemEventTrigger("before", "shutdown", application.stopService)

    def add_user(_: object) -> Deferred[Any]:
        def exists(f: Failure) -> None:
            f.trap(UserExists)  # already there from an earlier run

        return mail.mail.add_user("ann@example.org", "secret").addErrback(exists)

    def serving(_: object) -> None:
        for name in ("smtp", "pop3", "imap"):
            print(name, mail.address_of(name), flush=True)
        print("ready", flush=True)

    def failed(failure: Failure) -> None:
        print("cannot serve:", failure.getErrorMessage(), flush=True)
        reactor.stop()  # this application's choice: the node itself never stops it

    mail.when_ready().addCallback(add_user).addCallbacks(serving, failed)
    reactor.run()


if __name__ == "__main__":
    main(*sys.argv[1:])
