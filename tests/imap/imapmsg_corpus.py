"""Real-world message shapes for the IMAP message, search and section tests.

Each is CRLF-terminated raw RFC 5322 bytes, as APPEND and SMTP deliver them. The
expected ENVELOPE/BODYSTRUCTURE/SEARCH values in the tests were checked against
Dovecot 2.3.19 fed these very bytes (APPEND, then FETCH/SEARCH over IMAP).
"""

from __future__ import annotations

from email.message import EmailMessage
from email.policy import SMTP


def _crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


#: No Content-Type at all, body ends without a newline, comment-form address.
PLAIN = _crlf(
    "Date: Mon, 7 Feb 1994 21:52:25 -0800\n"
    "From: fred@example.com (Fred Foobar)\n"
    "Subject: afternoon meeting\n"
    "To: mooch@owatagu.siam.edu\n"
    "Message-Id: <B27397-0100000@example.com>\n"
    "\n"
    "Hello Joe, do you think we can meet at 3:30 tomorrow?\n"
    "Regards"
)

#: Raw UTF-8 in headers (subject and display name) and an 8bit body.
UTF8_HEADERS = _crlf(
    "From: Jörg Müller <joerg@example.de>\n"
    "To: Zoë <zoe@example.org>\n"
    "Subject: Grüße aus Köln\n"
    "Date: Tue, 01 Mar 2022 23:30:00 +0100\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "Content-Transfer-Encoding: 8bit\n"
    "\n"
    "Schöne Grüße!\n"
)

#: RFC 2047 words, folding, groups, a missing domain, empty Reply-To, lower-case names.
ENCODED_GROUPS = (
    b"from: =?utf-8?q?J=C3=B6rg?= M <joerg@example.de>\r\n"
    b'To: Friends: a@example.org, "B, b" <b@example.net>;, c@example.com\r\n'
    b"Cc: undisclosed-recipients:;\r\n"
    b"Bcc: root\r\n"
    b"Reply-To:\r\n"
    b"Subject: =?utf-8?b?R3LDvMOfZQ==?=\r\n"
    b" and more\r\n"
    b"Subject: second subject\r\n"
    b"In-Reply-To: <parent@example.org>\r\n"
    b"X-TUID: abcDEF\r\n"
    b"Date: Sat, 31 Dec 2022 23:59:59 -0500\r\n"
    b"\r\n"
    b"body with needle inside\r\n"
)

#: Route address and a quoted display name with an escaped quote.
ROUTE = (
    b'From: "Joe \\"Q\\" Public" <@relay1.example,@relay2.example:joe@example.com>\r\n'
    b"Sender: Secretary <sec@example.com>\r\n"
    b"To: John   Doe <jdoe@example.net>\r\n"
    b"Subject: routes\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"line one\r\n"
    b"line two\r\n"
)


def _attachment() -> bytes:
    """multipart/mixed: a QP text part and a base64 attachment with a quoted name."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = "Alice <alice@example.com>"
    msg["To"] = "bob@example.com"
    msg["Subject"] = "report attached"
    msg["Date"] = "Wed, 15 Jun 2022 10:00:00 +0000"
    msg["Message-ID"] = "<attach-1@example.com>"
    msg.set_content("Résumé of the quarter: see attachment.\n", cte="quoted-printable")
    msg.add_attachment(
        bytes(range(256)) * 2,
        maintype="application",
        subtype="octet-stream",
        filename="m3.bin",
    )
    msg.set_boundary("==BOUNDARY-attach==")
    msg.get_payload()[1]["Content-ID"] = "<part2@example.com>"
    msg.get_payload()[1]["Content-Description"] = "raw numbers"
    msg.get_payload()[1]["Content-Language"] = "en"
    return msg.as_bytes()


ATTACHMENT = _attachment()


def _alternative() -> bytes:
    """multipart/alternative: plain text and base64 HTML in UTF-8."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = "news@example.com"
    msg["To"] = "reader@example.com"
    msg["Subject"] = "Newsletter"
    msg["Date"] = "Thu, 16 Jun 2022 08:00:00 +0200"
    msg.set_content("Plain version: Straße\n")
    msg.add_alternative("<p>HTML version: Fußball</p>\n", subtype="html", cte="base64")
    msg.set_boundary("alt-boundary")
    return msg.as_bytes()


ALTERNATIVE = _alternative()

#: multipart/mixed holding a text part, a forwarded message/rfc822 (itself
#: multipart/alternative) and an attachment named with RFC 2231 continuations.
NESTED = _crlf(
    "From: outer@example.com\n"
    "To: someone@example.com\n"
    "Subject: Fwd: inner\n"
    "Date: Fri, 17 Jun 2022 12:00:00 +0000\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="outer"\n'
    "\n"
    "This is a preamble.\n"
    "--outer\n"
    'Content-Type: Text/Plain; Charset="UTF-8"; Format=Flowed\n'
    "Content-Transfer-Encoding: QUOTED-PRINTABLE\n"
    "\n"
    "See below =E2=80=94 forwarded.\n"
    "--outer\n"
    "Content-Type: message/rfc822\n"
    "Content-Disposition: inline\n"
    "\n"
    "From: inner@example.org\n"
    "To: outer@example.com\n"
    "Subject: inner\n"
    "Message-ID: <inner@example.org>\n"
    "Content-Type: multipart/alternative; boundary=inner\n"
    "\n"
    "--inner\n"
    "Content-Type: text/plain\n"
    "\n"
    "inner plain\n"
    "--inner\n"
    "Content-Type: text/html\n"
    "\n"
    "<b>inner html</b>\n"
    "--inner--\n"
    "\n"
    "--outer\n"
    "Content-Type: application/pdf;\n"
    ' name*0="long-";\n'
    ' name*1="name.pdf"\n'
    "Content-Disposition: attachment;\n"
    " filename*0*=utf-8''%E2%82%AC;\n"
    " filename*1*=%20rate.pdf\n"
    "Content-Transfer-Encoding: base64\n"
    "\n"
    "JVBERi0xLjQK\n"
    "--outer--\n"
    "epilogue\n"
)

CORPUS: dict[str, bytes] = {
    "plain": PLAIN,
    "utf8_headers": UTF8_HEADERS,
    "encoded_groups": ENCODED_GROUPS,
    "route": ROUTE,
    "attachment": ATTACHMENT,
    "alternative": ALTERNATIVE,
    "nested": NESTED,
}
