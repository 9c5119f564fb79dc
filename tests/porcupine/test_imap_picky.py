"""What a picky user sees from Porcupine's IMAP in corners the client suites miss:
the right answer and response code, the mailbox left as it was, no traceback."""

from __future__ import annotations

from typing import Any

import test_mail_hostile
from test_mail_hostile import Mail, send, tagged

# the fixtures of the hostile-input suite: one synchronous node, tracebacks collected
mail = test_mail_hostile.mail
failures = test_mail_hostile.failures


def test_delete_of_a_mailbox_with_children_is_inuse_not_nonexistent(
    mail: Mail, failures: list[dict[str, Any]]
) -> None:
    """DELETE of a listed, selectable mailbox that has children answers NO [INUSE] (not
    "no such mailbox") and keeps it; once the children are gone DELETE succeeds."""
    p, t = mail.imap()
    assert tagged(send(mail, p, t, b"a CREATE A/x")).startswith(b"OK")
    out = tagged(send(mail, p, t, b"a DELETE A"))
    assert out.startswith(b"NO [INUSE]"), out
    assert b"below" in out, out
    assert tagged(send(mail, p, t, b"a SELECT A")).startswith(b"OK")
    assert tagged(send(mail, p, t, b"a UNSELECT")).startswith(b"OK")
    assert tagged(send(mail, p, t, b"a DELETE A/x")).startswith(b"OK")
    assert tagged(send(mail, p, t, b"a DELETE A")).startswith(b"OK")
    assert b'"A"' not in send(mail, p, t, b'a LIST "" *')
    assert tagged(send(mail, p, t, b"a DELETE A")).startswith(b"NO [NONEXISTENT]")
    assert not failures
