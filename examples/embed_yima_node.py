"""Embed a Yima node in your own Twisted application, built the way ``twistd yima-node`` is.

    python examples/embed_yima_node.py DATA_DIR CLIP.ts [HOST] [RTSP_PORT]
    ffplay rtsp://HOST:RTSP_PORT/clip

``YimaNode.from_config`` builds the whole node once (cluster membership and RPC, the
storage service with its disks, the streaming service with its RTSP endpoint); the
application then owns it: it parents the service, decides what a port that cannot
be bound means (``when_ready()`` fails; the node never stops the reactor), and uses
the storage service directly, here to ingest CLIP.ts as ``clip``.  Other members
join with ``--join``-style seeds in ``NodeConfig(join=...)``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, inlineCallbacks

from yimaporc.cluster.node import NodeConfig
from yimaporc.cluster.routes import ApiError
from yimaporc.secret import load_or_create_secret
from yimaporc.yima.node import YimaConfig, YimaNode


@inlineCallbacks
def ingest(yima: YimaNode, clip: Path) -> Any:
    """Store ``clip`` once the node has registered its disk (a moment after start)."""
    while True:
        try:
            with clip.open("rb") as content:
                result = yield yima.storage.ingest(content, "clip")
            return result
        except ApiError as e:
            if e.status != 503:  # 503: no disks registered yet
                raise
            yield task.deferLater(reactor, 0.2, lambda: None)


def main(data_dir: str, clip: str, host: str = "127.0.0.1", port: str = "8554") -> None:
    data = Path(data_dir).absolute()
    data.mkdir(parents=True, exist_ok=True)
    config = YimaConfig(
        NodeConfig("embedded", "yima", data, host, int(port) + 1000),
        load_or_create_secret(data / "cluster.secret"),
        rtsp=f"tcp:{port}:interface={host}",
    )
    yima = YimaNode.from_config(reactor, config)
    application = MultiService()  # your application's own service tree
    yima.service.setServiceParent(application)
    application.startService()
    reactor.addSystemEventTrigger("before", "shutdown", application.stopService)

    def ready(_: object) -> Deferred[Any]:
        return ingest(yima, Path(clip))

    def serving(result: dict[str, Any]) -> None:
        print(f"ingested {result['blocks']} blocks; serving rtsp://{host}:{port}/clip", flush=True)

    def failed(failure: Any) -> None:
        print("cannot serve:", failure.getErrorMessage(), flush=True)
        reactor.stop()

    yima.when_ready().addCallback(ready).addCallbacks(serving, failed)
    reactor.run()


if __name__ == "__main__":
    main(*sys.argv[1:])
