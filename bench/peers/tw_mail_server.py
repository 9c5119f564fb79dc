#!/usr/bin/env python3
# ruff: noqa
# Copied from /work/shared/peers/tw_mail_server.py (peer benchmark kit); see bench/peers/NOTE.md.
"""Peer: minimal Twisted mail server (twisted.mail), ESMTP + POP3 on Maildir.

  python3 tw_mail_server.py --maildir-root DIR --users user001,...,pop050
        [--password pw] [--smtp-port 2525] [--pop3-port 1110] [--mode stock|fixed]

--mode stock: Twisted's own stack as `twist mail --maildirdbmdomain` wires it
   (MailService + MaildirDirdbmDomain + ESMTPFactory + POP3Factory).
--mode fixed (default): the same objects, with two Python 3 bugs of the
   stock Maildir code worked around (seen in Twisted 26.10):
   * SMTP delivery (AbstractMaildirDomain.startMessage) mixes str and bytes
     paths and writes bytes to a text-mode file -> "550 Internal server
     error"; replaced by a small IMessageDelivery that writes binary, using
     twisted.mail.maildir's own Maildir name generator;
   * POP3 (MaildirMailbox.getMessage) opens messages in text mode -> RETR
     fails; a subclass opens them binary.
   POP3 logins must be user@DOMAIN (MailService picks the domain's portal).
Maildir files are written synchronously in the reactor thread (tmp -> new
rename, no fsync).  Mail for unknown users is rejected at RCPT.
"""

import argparse
import os
import signal
import sys

from zope.interface import implementer
from twisted.cred import checkers, portal
from twisted.internet import defer, endpoints, reactor
from twisted.mail import mail, maildir, protocols, smtp


@implementer(smtp.IMessage)
class BinaryMaildirMessage:
    def __init__(self, dirpath, header):
        self.dirpath = dirpath
        name = maildir._generateMaildirName()
        self.name = name.decode() if isinstance(name, bytes) else name
        self.tmp = os.path.join(dirpath, "tmp", self.name)
        self.fp = open(self.tmp, "wb")
        self.fp.write(header)
        self.size = len(header)

    def lineReceived(self, line):
        self.fp.write(line + b"\n")
        self.size += len(line) + 1

    def eomReceived(self):
        self.fp.close()
        final = os.path.join(self.dirpath, "new", "%s,S=%d" % (self.name, self.size))
        os.rename(self.tmp, final)
        return defer.succeed(final)

    def connectionLost(self):
        self.fp.close()
        try:
            os.remove(self.tmp)
        except OSError:
            pass


@implementer(smtp.IMessageDelivery)
class MaildirDelivery:
    def __init__(self, root, domain, users):
        self.root = root
        self.domain = domain.encode()
        self.users = set(u.encode() for u in users)

    def receivedHeader(self, helo, origin, recipients):
        return b"Received: from " + (helo[0] or b"unknown") + b" by tw-mail-peer"

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        local = user.dest.local
        if user.dest.domain.lower() != self.domain or local not in self.users:
            raise smtp.SMTPBadRcpt(user)
        d = os.path.join(self.root, local.decode())
        hdr = b"Delivered-To: " + local + b"@" + self.domain + b"\n"
        return lambda: BinaryMaildirMessage(d, hdr)


class BinaryMaildirMailbox(maildir.MaildirMailbox):
    """twisted.mail.maildir.MaildirMailbox opens messages in text mode, which
    the bytes-based POP3 protocol cannot send on Python 3; open them binary."""

    def getMessage(self, i):
        return open(self.list[i], "rb")


class FixedMaildirDirdbmDomain(maildir.MaildirDirdbmDomain):
    def requestAvatar(self, avatarId, mind, *interfaces):
        iface, mbox, logout = maildir.MaildirDirdbmDomain.requestAvatar(
            self, avatarId, mind, *interfaces
        )
        if isinstance(mbox, maildir.MaildirMailbox):
            mbox.__class__ = BinaryMaildirMailbox
        return iface, mbox, logout


@implementer(portal.IRealm)
class DeliveryRealm:
    def __init__(self, delivery):
        self.delivery = delivery

    def requestAvatar(self, avatarId, mind, *interfaces):
        if smtp.IMessageDelivery in interfaces:
            return smtp.IMessageDelivery, self.delivery, lambda: None
        raise NotImplementedError()


def with_nodelay(factory):
    """Set TCP_NODELAY on every accepted connection: without it the POP3
    RETR response (several small writes) meets the client's delayed ACK and
    each RETR stalls ~40 ms (Nagle)."""
    orig = factory.buildProtocol

    def buildProtocol(addr):
        p = orig(addr)
        if p is not None:
            mk = p.makeConnection

            def makeConnection(transport):
                try:
                    transport.setTcpNoDelay(True)
                except Exception:  # noqa: BLE001
                    pass
                return mk(transport)

            p.makeConnection = makeConnection
        return p

    factory.buildProtocol = buildProtocol
    return factory


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--maildir-root", required=True)
    ap.add_argument("--domain", default="bench.test")
    ap.add_argument("--users", required=True, help="comma-separated local parts")
    ap.add_argument("--password", default="pw")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--smtp-port", type=int, default=2525)
    ap.add_argument("--pop3-port", type=int, default=1110)
    ap.add_argument("--mode", choices=("stock", "fixed"), default="fixed")
    ap.add_argument(
        "--no-nodelay",
        action="store_true",
        help="leave Nagle on (Twisted's default); default sets TCP_NODELAY",
    )
    a = ap.parse_args()
    root = os.path.abspath(a.maildir_root)
    os.makedirs(root, exist_ok=True)
    users = [u for u in a.users.split(",") if u]

    service = mail.MailService()
    domcls = maildir.MaildirDirdbmDomain if a.mode == "stock" else FixedMaildirDirdbmDomain
    dom = domcls(service, root.encode())
    for u in users:
        dom.addUser(u.encode(), a.password.encode())  # creates DIR/<user> Maildirs
        maildir.initializeMaildir(os.path.join(root, u))
    service.addDomain(a.domain.encode(), dom)
    service.smtpPortal.registerChecker(checkers.AllowAnonymousAccess())

    if a.mode == "stock":
        smtp_factory = service.getESMTPFactory()
        smtp_factory.domain = b"tw-mail-peer"
        smtp_factory.fArgs = (None, None, b"tw-mail-peer")
    else:
        p = portal.Portal(
            DeliveryRealm(MaildirDelivery(root, a.domain, users)), [checkers.AllowAnonymousAccess()]
        )
        smtp_factory = smtp.SMTPFactory(p)
        smtp_factory.protocol = smtp.ESMTP
        smtp_factory.domain = b"tw-mail-peer"
    pop3_factory = service.getPOP3Factory()
    if not a.no_nodelay:
        with_nodelay(smtp_factory)
        with_nodelay(pop3_factory)

    endpoints.TCP4ServerEndpoint(reactor, a.smtp_port, backlog=512, interface=a.host).listen(
        smtp_factory
    )
    endpoints.TCP4ServerEndpoint(reactor, a.pop3_port, backlog=512, interface=a.host).listen(
        pop3_factory
    )
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))
    print(
        "tw_mail_server: smtp %s:%d pop3 %s:%d mode=%s nodelay=%s users=%d pid=%d"
        % (
            a.host,
            a.smtp_port,
            a.host,
            a.pop3_port,
            a.mode,
            not a.no_nodelay,
            len(users),
            os.getpid(),
        ),
        flush=True,
    )
    reactor.run()


if __name__ == "__main__":
    sys.exit(main())
