"""``twistd porcupine-node``: options -> :class:`PorcupineConfig` -> the node built by
:meth:`PorcupineNode.from_config` (the tap only parses and checks options)."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from .._reactor import node_reactor
from ..cluster.node import ConfigError
from ..porcupine.node import PorcupineConfig, PorcupineNode
from .common import DISK_ERRORS, NodeOptions, cannot_start, install_logging, node_config, run_as


class Options(NodeOptions):
    """porcupine-node options (CONTRACT §2)."""

    kind = "porcupine"
    optParameters: list[list[Any]] = [
        *NodeOptions.optParameters,
        ["smtp", None, None, "SMTP endpoint, e.g. tcp:2525:interface=127.0.1.1."],
        ["pop3", None, None, "POP3 endpoint."],
        ["imap", None, None, "IMAP endpoint."],
        ["max-message-size", None, str(25 << 20), "Largest message SMTP accepts (bytes)."],
        ["replication-retention", None, str(7 * 86400),
         "Seconds an update-log entry is kept; a node away longer must be wiped (issue 8)."],
        ["acks-before-reply", None, "2",
         "Durable copies of a replicated message before SMTP says 250 (1 or more)."],
        ["auth-throttle", None, "",
         "Login throttling, KEY=VALUE,... (delay, max-delay, per-connection, pair-failures, "
         "address-failures, account-failures, concurrent, window, lockout, trust, "
         "max-entries); see docs/operations.md."],
        ["auth-cache-ttl", None, "300",
         "Seconds a verified login (user + password, as a keyed hash tied to the stored "
         "hash) skips scrypt; 0 disables the cache; see docs/security.md."],
        ["auth-cache-size", None, "10000",
         "Verified logins kept at most (least recently used dropped first); 0 disables."],
        ["pop3s", None, None, "POP3 over implicit TLS (port 995 style; tcp: uses --tls-cert)."],
        ["imaps", None, None, "IMAP over implicit TLS (port 993 style; tcp: uses --tls-cert)."],
        ["submission", None, None,
         "Submission endpoint (port 587 style: STARTTLS, AUTH before MAIL; needs --tls-cert)."],
        ["submissions", None, None,
         "Submission over implicit TLS (port 465 style; a tcp: endpoint uses --tls-cert)."],
        ["smarthost", None, None, "Send all outbound mail through HOST:PORT instead of MX."],
        ["smarthost-auth-file", None, None,
         "File whose first line is USER:PASSWORD for AUTH at the --smarthost."],
        ["queue-retry", None, "60,300,900,1800,3600,7200,14400",
         "Seconds between outbound attempts, comma-separated; the last repeats."],
        ["queue-lifetime", None, str(5 * 86400),
         "Seconds a message may wait in the outbound queue before it bounces."],
        ["mail-index-rows", None, "200000",
         "Bound of the in-memory mailbox index: messages plus mailboxes over all users "
         "(about 350 bytes each; least recently used users dropped first; 0 turns it off)."],
        ["mail-workers", None, "0",
         "POP3/IMAP worker processes sharing the --pop3/--imap sockets (0: the main "
         "process serves them); see docs/operations.md."],
        ["mail-body-cache-bytes", None, str(64 << 20),
         "Bound of the in-memory cache of message bodies read or stored recently, in bytes "
         "(least recently used first out; needs the mailbox index; 0 turns it off)."],
    ]  # fmt: skip

    optFlags: list[list[Any]] = [
        *getattr(NodeOptions, "optFlags", []),
        ["forward-deliveries", None,
         "Hand a delivery for a user with one replica to the user's manager node, which "
         "stores it there while its load allows: one call between nodes instead of "
         "~3, but a user's mail then stays on fewer nodes (docs/mail.md, the hand-over)."],
        ["allow-plaintext-auth", None,
         "Let IMAP LOGIN and POP3 USER/PASS/AUTH run before STARTTLS/STLS when a "
         "certificate is configured (SMTP AUTH stays TLS-only)."],
    ]  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self["transport"] = {}
        self["domain"] = []

    def opt_domain(self, value: str) -> None:
        """A mail domain this cluster serves (required; may repeat, the first is the default
        for logins without @domain)."""
        domain = value.strip().lower()
        if domain and domain not in self["domain"]:
            self["domain"].append(domain)

    def opt_transport(self, value: str) -> None:
        """DOMAIN=HOST:PORT: send mail for DOMAIN there instead of its MX (may repeat)."""
        from ..porcupine.outbound import parse_hostport

        domain, sep, target = value.partition("=")
        try:
            if not sep or not domain.strip():
                raise ValueError(f"not DOMAIN=HOST:PORT: {value!r}")
            self["transport"][domain.strip().lower()] = parse_hostport(target)
        except ValueError as e:
            raise usage.UsageError(f"--transport: {e}") from e

    def postOptions(self) -> None:
        """Common checks, then the mail ones."""
        super().postOptions()
        from twisted.python import usage

        if not self["domain"]:
            raise usage.UsageError("--domain is required")
        if not str(self["max-message-size"]).isdigit():
            raise usage.UsageError("--max-message-size must be a number of bytes")
        from ..porcupine.replication import ReplicationConfig

        try:
            retention = float(self["replication-retention"])
        except ValueError:
            retention = -1.0
        if not retention > 0:
            raise usage.UsageError("--replication-retention must be a positive number of seconds")
        if not str(self["acks-before-reply"]).isdigit() or int(self["acks-before-reply"]) < 1:
            raise usage.UsageError("--acks-before-reply must be a whole number >= 1")
        self.replication = ReplicationConfig(
            retention=retention, acks_before_reply=int(self["acks-before-reply"])
        )
        from ..porcupine.throttle import ThrottlePolicy

        try:
            self.auth_throttle = ThrottlePolicy.parse(self["auth-throttle"] or "")
        except (ValueError, TypeError) as e:
            raise usage.UsageError(f"--auth-throttle: {e}") from e
        from ..porcupine.authcache import MAX_SIZE, MAX_TTL

        try:
            self.auth_cache_ttl = float(self["auth-cache-ttl"])
        except ValueError:
            self.auth_cache_ttl = -1.0
        if not 0 <= self.auth_cache_ttl <= MAX_TTL:  # also refuses nan and inf
            raise usage.UsageError(f"--auth-cache-ttl must be 0 to {MAX_TTL:g} seconds")
        size = str(self["auth-cache-size"]).strip()
        if not size.isdigit() or int(size) > MAX_SIZE:
            raise usage.UsageError(f"--auth-cache-size must be a whole number 0 to {MAX_SIZE}")
        self.auth_cache_size = int(size)
        from ..porcupine.outbound import RetryPolicy, Routes, parse_hostport

        try:
            smarthost = parse_hostport(self["smarthost"]) if self["smarthost"] else None
        except ValueError as e:
            raise usage.UsageError(f"--smarthost: {e}") from e
        auth = None
        if self["smarthost-auth-file"]:
            if smarthost is None:
                raise usage.UsageError("--smarthost-auth-file needs --smarthost")
            try:
                first = open(self["smarthost-auth-file"], "rb").read().splitlines()[:1]
            except OSError as e:
                raise usage.UsageError(f"--smarthost-auth-file: {e.strerror}") from e
            user, sep, password = (first[0] if first else b"").partition(b":")
            if not sep or not user:
                raise usage.UsageError(
                    "--smarthost-auth-file: the first line must be USER:PASSWORD"
                )
            auth = (user, password)
        self.routes = Routes(dict(self["transport"]), smarthost, auth)
        try:
            backoff = tuple(float(x) for x in str(self["queue-retry"]).split(","))
            lifetime = float(self["queue-lifetime"])
        except ValueError:
            backoff, lifetime = (), 0.0
        if not backoff or min(backoff) <= 0 or not lifetime > 0:
            raise usage.UsageError(
                "--queue-retry takes positive seconds like 60,300,900; "
                "--queue-lifetime positive seconds"
            )
        self.retry = RetryPolicy(backoff, lifetime)
        rows = str(self["mail-index-rows"]).strip()
        if not rows.isdigit() or int(rows) > 100_000_000:
            raise usage.UsageError(
                "--mail-index-rows must be a whole number from 0 (off) to 100000000"
            )
        self.mail_index_rows = int(rows)
        body = str(self["mail-body-cache-bytes"]).strip()
        if not body.isdigit() or int(body) > 16 << 30:
            raise usage.UsageError(
                "--mail-body-cache-bytes must be a whole number from 0 (off) to 17179869184"
            )
        self.mail_body_cache_bytes = int(body)
        from ..porcupine._mailworkers import MAX_WORKERS

        workers = str(self["mail-workers"]).strip()
        if not workers.isdigit() or int(workers) > MAX_WORKERS:
            raise usage.UsageError(f"--mail-workers must be a whole number from 0 to {MAX_WORKERS}")
        if int(workers) and not (self["pop3"] or self["imap"]):
            raise usage.UsageError("--mail-workers needs --pop3 or --imap")
        self.mail_workers = int(workers)


def porcupine_config(options: Options) -> PorcupineConfig:
    """The :class:`PorcupineConfig` of parsed ``options`` (creates the data dir and secret)."""
    node, secret = node_config(options)
    try:
        return PorcupineConfig(
            node,
            secret,
            domains=options["domain"],
            smtp=options["smtp"],
            submission=options["submission"],
            submissions=options["submissions"],
            pop3=options["pop3"],
            pop3s=options["pop3s"],
            imap=options["imap"],
            imaps=options["imaps"],
            admin=options["admin"],
            max_message_size=int(options["max-message-size"]),
            replication=options.replication,
            auth_throttle=options.auth_throttle,
            auth_cache_ttl=options.auth_cache_ttl,
            auth_cache_size=options.auth_cache_size,
            routes=options.routes,
            retry=options.retry,
            allow_plaintext_auth=bool(options["allow-plaintext-auth"]),
            forward_deliveries=bool(options["forward-deliveries"]),
            mail_index_rows=options.mail_index_rows,
            mail_body_cache_bytes=options.mail_body_cache_bytes,
            mail_workers=options.mail_workers,
        )
    except ConfigError as e:
        raise usage.UsageError(str(e)) from e


def makeService(options: Options) -> IService:
    """The Porcupine node built by its composition root, with twistd's logging."""
    from twisted.internet import reactor

    try:
        config = porcupine_config(options)
        switch = run_as(options)
        node = PorcupineNode.from_config(
            node_reactor(reactor), config, first=[switch] if switch is not None else []
        )
    except ConfigError as e:
        raise usage.UsageError(str(e)) from e
    except DISK_ERRORS as e:
        raise cannot_start("porcupine", e) from e
    return install_logging(node.service, options, reactor)
