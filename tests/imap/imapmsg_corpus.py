"""Real-world message shapes for the IMAP message, search and section tests.

Each is CRLF-terminated raw RFC 5322 bytes, as APPEND and SMTP deliver them. The
expected ENVELOPE/BODYSTRUCTURE/SEARCH values in the tests were checked against
Dovecot 2.3.19 fed these very bytes (APPEND, then FETCH/SEARCH over IMAP).
"""

from __future__ import annotations


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


# The next two were written by Python 3.11's email package (EmailMessage, policy SMTP:
# set_content with quoted-printable, add_attachment of bytes(range(256)) * 2 named
# "m3.bin"; add_alternative with base64 HTML) and are frozen here, so the sizes Dovecot
# reported for them hold whatever a later Python writes. The live email package is
# exercised by the hypothesis tests in test_message.py.

#: multipart/mixed: a QP text part and a base64 attachment with a quoted name.
ATTACHMENT = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.com\r\n"
    b"Subject: report attached\r\n"
    b"Date: Wed, 15 Jun 2022 10:00:00 +0000\r\n"
    b"Message-ID: <attach-1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="==BOUNDARY-attach=="\r\n'
    b"\r\n"
    b"--==BOUNDARY-attach==\r\n"
    b'Content-Type: text/plain; charset="utf-8"\r\n'
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"R=C3=A9sum=C3=A9 of the quarter: see attachment.\r\n"
    b"\r\n"
    b"--==BOUNDARY-attach==\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b'Content-Disposition: attachment; filename="m3.bin"\r\n'
    b"MIME-Version: 1.0\r\n"
    b"Content-ID: <part2@example.com>\r\n"
    b"Content-Description: raw numbers\r\n"
    b"Content-Language: en\r\n"
    b"\r\n"
    b"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4\r\n"
    b"OTo7PD0+P0BBQkNERUZHSElKS0xNTk9QUVJTVFVWV1hZWltcXV5fYGFiY2RlZmdoaWprbG1ub3Bx\r\n"
    b"cnN0dXZ3eHl6e3x9fn+AgYKDhIWGh4iJiouMjY6PkJGSk5SVlpeYmZqbnJ2en6ChoqOkpaanqKmq\r\n"
    b"q6ytrq+wsbKztLW2t7i5uru8vb6/wMHCw8TFxsfIycrLzM3Oz9DR0tPU1dbX2Nna29zd3t/g4eLj\r\n"
    b"5OXm5+jp6uvs7e7v8PHy8/T19vf4+fr7/P3+/wABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhsc\r\n"
    b"HR4fICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj9AQUJDREVGR0hJSktMTU5PUFFSU1RV\r\n"
    b"VldYWVpbXF1eX2BhYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ent8fX5/gIGCg4SFhoeIiYqLjI2O\r\n"
    b"j5CRkpOUlZaXmJmam5ydnp+goaKjpKWmp6ipqqusra6vsLGys7S1tre4ubq7vL2+v8DBwsPExcbH\r\n"
    b"yMnKy8zNzs/Q0dLT1NXW19jZ2tvc3d7f4OHi4+Tl5ufo6err7O3u7/Dx8vP09fb3+Pn6+/z9/v8=\r\n"
    b"\r\n"
    b"--==BOUNDARY-attach==--\r\n"
)

#: multipart/alternative: plain text and base64 HTML in UTF-8.
ALTERNATIVE = (
    b"From: news@example.com\r\n"
    b"To: reader@example.com\r\n"
    b"Subject: Newsletter\r\n"
    b"Date: Thu, 16 Jun 2022 08:00:00 +0200\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="alt-boundary"\r\n'
    b"\r\n"
    b"--alt-boundary\r\n"
    b'Content-Type: text/plain; charset="utf-8"\r\n'
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Plain version: Stra\xc3\x9fe\r\n"
    b"\r\n"
    b"--alt-boundary\r\n"
    b'Content-Type: text/html; charset="utf-8"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"MIME-Version: 1.0\r\n"
    b"\r\n"
    b"PHA+SFRNTCB2ZXJzaW9uOiBGdcOfYmFsbDwvcD4NCg==\r\n"
    b"\r\n"
    b"--alt-boundary--\r\n"
)

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
