"""A Porcupine mail node (SMTP, POP3, IMAP) inside your own Twisted application.

    python examples/embed_mail_service.py DATA_DIR [HOST] [SMTP_PORT]
    swaks --server 127.0.0.1:2525 --to ann@example.org --body hi
    curl -u ann@example.org:secret 'imap://127.0.0.1:1143/INBOX;UID=1'

``MailService`` is a Twisted ``MultiService``: twisted.mail's SMTP, POP3 and IMAP4
protocols in front of Porcupine's managers (durable mailbox fragments with fsync,
scrypt-hashed profiles, group commit).  On its own it is a cluster of one; inside
a ``ClusterNode`` (see ``yimaporc.tap.porcupine``) the same service spreads users
over the cluster.  Here the application adds a user at start and counts deliveries.
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.application.service import MultiService
from twisted.internet import task
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure

from yimaporc.porcupine.service import MailService
from yimaporc.porcupine.values import UserExists

log = Logger()


def main(argv: list[str]) -> None:
    from twisted.internet import reactor

    data_dir = Path(argv[1])
    host = argv[2] if len(argv) > 2 else "127.0.0.1"
    smtp = int(argv[3]) if len(argv) > 3 else 2525
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])

    app = MultiService()  # your application's own services would sit here too
    mail = MailService(
        reactor,
        node_id="m1",
        data_dir=data_dir,
        domain="example.org",
        smtp=f"tcp:{smtp}:interface={host}",
        pop3=f"tcp:{smtp - 1415}:interface={host}",  # 1110 by default
        imap=f"tcp:{smtp - 1382}:interface={host}",  # 1143 by default
    )
    mail.setServiceParent(app)
    app.startService()

    def ready(_: object) -> None:
        print(f"mail for ann@example.org (password secret) on {host}: smtp {smtp}", flush=True)

    def exists(f: Failure) -> None:
        f.trap(UserExists)  # already there from an earlier run

    mail.add_user("ann@example.org", "secret").addErrback(exists).addCallback(ready)
    task.LoopingCall(lambda: log.info("{n} messages delivered", n=mail.delivered)).start(30)
    reactor.addSystemEventTrigger("before", "shutdown", app.stopService)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv)
