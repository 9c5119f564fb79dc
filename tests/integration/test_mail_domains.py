"""Several local domains on one node (--domain repeated)."""

from __future__ import annotations

import poplib
import smtplib
from pathlib import Path

import pytest
from twisted.python import usage

from yimaporc.porcupine.testing import RunningMail
from yimaporc.tap.porcupine import Options


def test_domain_repeats_and_is_required(tmp_path: Path) -> None:
    """--domain may repeat (the first is the default for bare logins); none is an error."""
    base = ["--node-id", "n", "--data-dir", str(tmp_path),
            "--cluster", "tcp:7946:interface=127.0.116.9"]  # fmt: skip
    o = Options()
    o.parseOptions([*base, "--domain", "Example.org", "--domain", "example.net"])
    assert o["domain"] == ["example.org", "example.net"]
    with pytest.raises(usage.UsageError, match="--domain is required"):
        Options().parseOptions(base)


def test_mail_for_every_local_domain_is_delivered_and_others_refused(tmp_path: Path) -> None:
    """Users in the second domain get mail and log in; an unknown domain is still 550."""
    mail = RunningMail(tmp_path / "data", other_domains=("example.net",))
    try:
        mail.add_user("bob@example.net", "pw-bob")
        mail.add_user("ann@example.org", "pw-ann")
        with smtplib.SMTP("127.0.0.1", mail.port("smtp"), timeout=10) as s:
            refused = s.sendmail("x@y.org", ["bob@example.net", "ann@example.org"],
                                 b"Subject: hi\r\n\r\nx\r\n")  # fmt: skip
            assert refused == {}
            s.mail("x@y.org")
            assert s.rcpt("eve@elsewhere.org")[0] == 550
        p = poplib.POP3("127.0.0.1", mail.port("pop3"), timeout=10)
        p.user("bob@example.net")
        p.pass_("pw-bob")
        assert p.stat()[0] == 1
        p.quit()
        assert mail.service.status()["domains"] == ["example.org", "example.net"]
    finally:
        mail.stop()
