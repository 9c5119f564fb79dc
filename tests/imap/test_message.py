"""FETCH data from raw messages: ENVELOPE, BODY[STRUCTURE], sections, sizes and dates.

Expected values were checked against Dovecot 2.3.19 (``imapmsg_dovecot`` holds what it
answered for the corpus; the edge cases below quote its answers inline).
"""

from __future__ import annotations

import email.utils
from email.message import EmailMessage
from email.policy import SMTP

import pytest
from hypothesis import given
from hypothesis import strategies as st
from imapmsg_corpus import CORPUS, ENCODED_GROUPS, NESTED, PLAIN, UTF8_HEADERS
from imapmsg_dovecot import FETCH

from yimaporc.imap._headers import parse_addresses
from yimaporc.imap._message import (
    Message,
    Section,
    SectionError,
    canonical_crlf,
    format_internaldate,
    parse_internaldate,
    parse_section,
)
from yimaporc.imap._parts import MAX_DEPTH


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_envelope_matches_dovecot(name: str) -> None:
    """ENVELOPE of each corpus message equals Dovecot's (raw octets, groups, defaults)."""
    assert Message(CORPUS[name]).envelope() == FETCH[name]["ENVELOPE"]


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_bodystructure_matches_dovecot(name: str) -> None:
    """BODYSTRUCTURE and BODY of each corpus message equal Dovecot's."""
    m = Message(CORPUS[name])
    assert m.body_structure() == FETCH[name]["BODYSTRUCTURE"]
    assert m.body_structure(extended=False) == FETCH[name]["BODY"]


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_rfc822_size_is_every_octet(name: str) -> None:
    """RFC822.SIZE counts every octet of the stored message, as Dovecot reports it."""
    assert Message(CORPUS[name]).size == FETCH[name]["RFC822.SIZE"] == len(CORPUS[name])


def test_raw_utf8_header_stays_bytes() -> None:
    """An 8-bit UTF-8 subject and display name come back as their UTF-8 octets, no error."""
    env = Message(UTF8_HEADERS).envelope()
    assert env[1] == "Grüße aus Köln".encode()
    assert env[2] == (("Jörg Müller".encode(), None, b"joerg", b"example.de"),)


def test_attachment_fields_unquoted_sizes_exclude_mime_header() -> None:
    """The attachment's filename has no quotes, encoding is base64, size is the body only."""
    attachment = Message(CORPUS["attachment"]).body_structure()[1]
    assert attachment[8] == (b"attachment", (b"filename", b"m3.bin"))
    assert attachment[5] == b"base64"
    body = Message(CORPUS["attachment"]).section(Section((2,)))
    assert attachment[6] == len(body)


def test_rfc2231_continuations_joined() -> None:
    """name*0/name*1 join into name; extended filename*0*/1* join under filename*."""
    pdf = Message(NESTED).body_structure()[2]
    assert pdf[2] == (b"name", b"long-name.pdf")
    assert pdf[8] == (b"attachment", (b"filename*", b"utf-8''%E2%82%AC%20rate.pdf"))


# Edge cases, each with the answer Dovecot 2.3.19 gave for the same bytes.
EDGE = [
    (
        b"Content-Type: text/plain; format=flowed\r\nContent-Language: en, de\r\n"
        b"Content-Location: http://x/y\r\n"
        b'Content-Disposition: inline; filename="a b.txt"; size=3\r\n\r\nabc\r\n',
        (b"text", b"plain", (b"format", b"flowed", b"charset", b"us-ascii"), None, None,
         b"7bit", 5, 1, None, (b"inline", (b"filename", b"a b.txt", b"size", b"3")),
         (b"en", b"de"), b"http://x/y"),
    ),
    (
        b"Content-Type: multipart/mixed\r\n\r\nno boundary here\r\n",
        ((b"text", b"plain", (b"charset", b"us-ascii"), None, None, b"7bit", 0, 0,
          None, None, None, None), b"mixed", None, None, None, None),
    ),
    (
        b"Content-Type: bogus\r\nSubject:\r\nFrom: \r\nTo: a@b, , c@d\r\n\r\nx\r\n",
        (b"bogus", b"", None, None, None, b"7bit", 3, None, None, None, None),
    ),
    (
        b'Content-Type: TEXT/PLAIN (comment); charset = "iso-8859-1" (c2)\r\n'
        b"Content-Transfer-Encoding: Base64\r\n\r\nSGk=\r\n",
        (b"TEXT", b"PLAIN", (b"charset", b"iso-8859-1"), None, None, b"Base64", 6, 1,
         None, None, None, None),
    ),
    (
        b"Subject: no body",
        (b"text", b"plain", (b"charset", b"us-ascii"), None, None, b"7bit", 0, 0,
         None, None, None, None),
    ),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "expected"), EDGE)
def test_bodystructure_edge_cases(raw: bytes, expected: tuple[object, ...]) -> None:
    """Charset default appended, no-boundary multipart, bogus type, comments, headerless body."""
    assert Message(raw).body_structure() == expected


def test_envelope_edge_cases() -> None:
    """Empty Subject is "", empty From is NIL, an empty list member is MISSING_*."""
    env = Message(EDGE[2][0]).envelope()
    assert env[1] == b""
    assert env[2] is None and env[3] is None and env[4] is None
    assert env[5] == (
        (None, None, b"a", b"b"),
        (None, None, b"MISSING_MAILBOX", b"MISSING_DOMAIN"),
        (None, None, b"c", b"d"),
    )


def test_envelope_date_unfolded_and_group_after_mailbox() -> None:
    """Date keeps inner and trailing blanks but loses line breaks; an empty name is NIL."""
    raw = b'From: "" <a@b>, Undisclosed:;\r\nDate:   Mon, 7 Feb 1994\r\n   21:52:25 -0800  \r\n\r\n'
    env = Message(raw).envelope()
    assert env[0] == b"Mon, 7 Feb 1994   21:52:25 -0800  "
    assert env[2] == (
        (None, None, b"a", b"b"),
        (None, None, b"Undisclosed", None),
        (None, None, None, None),
    )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (b"HEADER.FIELDS (x-tuid SUBJECT)",
         b"Subject: =?utf-8?b?R3LDvMOfZQ==?=\r\n and more\r\nSubject: second subject\r\n"
         b"X-TUID: abcDEF\r\n\r\n"),
        (b"HEADER.FIELDS.NOT (Subject To Cc Bcc From Reply-To Date)",
         b"In-Reply-To: <parent@example.org>\r\nX-TUID: abcDEF\r\n\r\n"),
        (b"HEADER.FIELDS (Nope)", b"\r\n"),
        (b"1", b"body with needle inside\r\n"),
        (b"2", b""),
        (b"TEXT", b"body with needle inside\r\n"),
    ],
)  # fmt: skip
def test_sections_of_a_simple_message(spec: bytes, expected: bytes) -> None:
    """HEADER.FIELDS keeps original case, folding and duplicates; missing parts are empty."""
    assert Message(ENCODED_GROUPS).section(parse_section(spec)) == expected


def test_mime_of_part_one_is_the_message_header() -> None:
    """BODY[1.MIME] of a non-multipart message is its header, as Dovecot answers."""
    m = Message(ENCODED_GROUPS)
    assert m.section(parse_section(b"1.MIME")) == m.section(parse_section(b"HEADER"))
    assert m.section(parse_section(b"HEADER")).endswith(b"-0500\r\n\r\n")


INNER = (
    b"From: inner@example.org\r\nTo: outer@example.com\r\nSubject: inner\r\n"
    b"Message-ID: <inner@example.org>\r\n"
    b"Content-Type: multipart/alternative; boundary=inner\r\n\r\n"
)
INNER_TEXT = (
    b"--inner\r\nContent-Type: text/plain\r\n\r\ninner plain\r\n--inner\r\n"
    b"Content-Type: text/html\r\n\r\n<b>inner html</b>\r\n--inner--\r\n"
)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (b"2", INNER + INNER_TEXT),
        (b"2.HEADER", INNER),
        (b"2.TEXT", INNER_TEXT),
        (b"2.1", b"inner plain"),
        (b"2.1.1", b"inner plain"),  # Dovecot: a leaf answers to .1 as itself
        (b"2.1.2", b""),
        (b"2.2.MIME", b"Content-Type: text/html\r\n\r\n"),
        (b"2.HEADER.FIELDS (to)", b"To: outer@example.com\r\n\r\n"),
        (b"1", b"See below =E2=80=94 forwarded."),
        (b"1.TEXT", b""),
        (b"3.MIME",
         b"Content-Type: application/pdf;\r\n name*0=\"long-\";\r\n name*1=\"name.pdf\"\r\n"
         b"Content-Disposition: attachment;\r\n filename*0*=utf-8''%E2%82%AC;\r\n"
         b" filename*1*=%20rate.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"),
        (b"3", b"JVBERi0xLjQK"),
        (b"9", b""),
    ],
)  # fmt: skip
def test_sections_of_nested_message(spec: bytes, expected: bytes) -> None:
    """Part numbers walk multiparts and message/rfc822; HEADER/TEXT apply to the embedded one."""
    assert Message(NESTED).section(parse_section(spec)) == expected


def test_partial_fetch() -> None:
    """<origin.count> slices the section; an origin past the end gives an empty string."""
    m = Message(ENCODED_GROUPS)
    assert m.section(Section(), 0, 10) == b"from: =?ut"
    assert m.section(Section(text="TEXT"), 5, 6) == b"with n"
    assert m.section(Section(), 1000, 5) == b""


def test_header_without_blank_line() -> None:
    """A message that is only a header: HEADER is all of it, TEXT and FIELDS.NOT empty."""
    m = Message(b"Subject: no body")
    assert m.section(parse_section(b"HEADER")) == b"Subject: no body"
    assert m.section(parse_section(b"TEXT")) == b""
    assert m.section(parse_section(b"HEADER.FIELDS.NOT (Subject)")) == b""
    assert m.section(parse_section(b"HEADER.FIELDS (Subject)")) == b"Subject: no body\r\n"


@pytest.mark.parametrize(
    ("spec", "section", "label"),
    [
        (b"", Section(), b""),
        (b"header", Section(text="HEADER"), b"HEADER"),
        (b"1.2.3", Section((1, 2, 3)), b"1.2.3"),
        (b"2.MIME", Section((2,), "MIME"), b"2.MIME"),
        (b"HEADER.FIELDS (x-tuid From)", Section((), "HEADER.FIELDS", (b"x-tuid", b"From")),
         b"HEADER.FIELDS (X-TUID FROM)"),
        (b"1.HEADER.FIELDS.NOT (A)", Section((1,), "HEADER.FIELDS.NOT", (b"A",)),
         b"1.HEADER.FIELDS.NOT (A)"),
    ],
)  # fmt: skip
def test_parse_section_and_label(spec: bytes, section: Section, label: bytes) -> None:
    """Section specs parse case-insensitively; the label upper-cases names as Dovecot does."""
    assert parse_section(spec) == section
    assert section.label() == label


@pytest.mark.parametrize(
    "spec", [b"0", b"1.", b".TEXT", b"MIME", b"HEADER.FIELDS", b"TEXT (A)", b"1.FOO", b"01"]
)
def test_parse_section_rejects(spec: bytes) -> None:
    """Malformed section specs raise SectionError (the caller answers BAD)."""
    with pytest.raises(SectionError):
        parse_section(spec)


def test_internaldate_format_and_parse() -> None:
    """INTERNALDATE renders with a two-digit day and the zone, and parses back."""
    assert format_internaldate(760686745, 0) == b"08-Feb-1994 05:52:25 +0000"
    assert format_internaldate(760686745, -480) == b"07-Feb-1994 21:52:25 -0800"
    assert format_internaldate(760686745, 330) == b"08-Feb-1994 11:22:25 +0530"
    assert parse_internaldate(b"07-Feb-1994 21:52:25 -0800") == 760686745
    assert parse_internaldate(b" 7-Feb-1994 21:52:25 -0800") == 760686745
    with pytest.raises(ValueError):
        parse_internaldate(b"07-Foo-1994 21:52:25 -0800")


@given(st.integers(0, 2**33), st.integers(-720, 840))
def test_internaldate_round_trip(ts: int, offset: int) -> None:
    """Any time in any whole-minute zone formats and parses back to the same instant."""
    assert parse_internaldate(format_internaldate(ts, offset)) == ts


def test_decoded_text_for_search() -> None:
    """Search text: RFC 2047 words decoded, QP/base64 and charsets undone, part headers in full text."""
    m = Message(CORPUS["alternative"])
    assert "Fußball" in m.body_text()
    assert "Straße" in m.body_text()
    assert "content-type: text/html" in m.full_text().lower()
    assert "text/html" not in m.body_text()
    assert Message(ENCODED_GROUPS).header_values("Subject")[0] == "Grüße and more"
    assert "Résumé" in Message(CORPUS["attachment"]).body_text()
    assert "—" in Message(NESTED).body_text()


def test_sent_date_in_its_own_zone() -> None:
    """The Date: header's calendar date is read in the header's zone; none if absent."""
    assert str(Message(PLAIN).sent_date()) == "1994-02-07"
    assert Message(CORPUS["route"]).sent_date() is None


_names = st.text(st.characters(min_codepoint=0x41, max_codepoint=0x7A), min_size=1, max_size=8)
_locals = st.from_regex(r"[a-z0-9][a-z0-9.+_-]{0,10}", fullmatch=True)
_domains = st.from_regex(r"[a-z0-9]{1,8}\.(org|com|de)", fullmatch=True)


@given(st.lists(st.tuples(_names, _locals, _domains), min_size=1, max_size=5))
def test_addresses_from_email_utils(people: list[tuple[str, str, str]]) -> None:
    """Address lists written by email.utils parse back to the same names, mailboxes and hosts."""
    value = ", ".join(email.utils.formataddr((n, f"{lp}@{d}")) for n, lp, d in people)
    parsed = parse_addresses(value.encode())
    expected = tuple((n.encode(), None, lp.encode(), d.encode()) for n, lp, d in people)
    assert parsed == expected


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    """Any octets give an envelope, a structure and sections without raising."""
    m = Message(raw)
    m.envelope()
    m.body_structure()
    m.body_structure(False)
    m.section(parse_section(b"1.MIME"))
    m.section(parse_section(b"HEADER.FIELDS (From)"))
    m.full_text()


def test_deep_nesting_is_cut_not_recursed() -> None:
    """A message nested 500 multiparts deep answers BODYSTRUCTURE, cut at MAX_DEPTH levels."""
    raw = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(500)
    )
    structure = Message(raw).body_structure()
    depth = 0
    while isinstance(structure[0], tuple):
        structure, depth = structure[0], depth + 1
    assert depth == MAX_DEPTH
    assert structure[:2] == (b"multipart", b"mixed")


_INNER = (
    b"Subject: i\r\nContent-Description: desc\r\nContent-Disposition: inline\r\n"
    b"Content-Description: second\r\n\r\nbody\r\n"
)
_INNER_TEXT = (b"text", b"plain", (b"charset", b"us-ascii"), None)
_ENV_I = (None, b"i", None, None, None, None, None, None, None, None)

# Content-* fields count only in a MIME entity (multipart child, MIME-Version or
# Content-Type present) and the first occurrence wins: Dovecot 2.3.19's answers.
MIME_RULES = [
    (b"Content-Type: message/rfc822\r\n\r\n" + _INNER,
     (b"message", b"rfc822", None, None, None, b"7bit", 105, _ENV_I,
      (*_INNER_TEXT, None, b"7bit", 6, 1, None, None, None, None), 6, None, None, None, None)),
    (b"Content-Type: message/rfc822\r\n\r\nMIME-Version: 1.0\r\n" + _INNER,
     (b"message", b"rfc822", None, None, None, b"7bit", 124, _ENV_I,
      (*_INNER_TEXT, b"desc", b"7bit", 6, 1, None, (b"inline", None), None, None), 7,
      None, None, None, None)),
    (_INNER, (*_INNER_TEXT, None, b"7bit", 6, 1, None, None, None, None)),
    (b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Description: p1\r\n"
     b"\r\nx\r\n--x--\r\n",
     ((*_INNER_TEXT, b"p1", b"7bit", 1, 0, None, None, None, None), b"mixed",
      (b"boundary", b"x"), None, None, None)),
    (b"Content-Type: text/plain\r\nContent-Type: text/html\r\n"
     b"Content-Transfer-Encoding: base64\r\nContent-Transfer-Encoding: 8bit\r\n\r\nx\r\n",
     (*_INNER_TEXT, None, b"base64", 3, 1, None, None, None, None)),
    # A digest part (default message/rfc822) whose "message" has no blank line: its
    # header runs on through the line break before the next boundary.
    (b"Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\nhello\r\n\r\n--d--\r\n",
     ((b"message", b"rfc822", None, None, None, b"7bit", 9,
       (None,) * 10, (*_INNER_TEXT, None, b"7bit", 0, 0, None, None, None, None), 2,
       None, None, None, None), b"digest", (b"boundary", b"d"), None, None, None)),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "expected"), MIME_RULES)
def test_content_fields_follow_dovecot_mime_rules(raw: bytes, expected: tuple[object, ...]) -> None:
    """Content-* fields are read only in MIME entities, first occurrence wins, as in Dovecot."""
    assert Message(raw).body_structure() == expected


def test_repeated_address_fields_are_joined() -> None:
    """Two To: fields give one address list, in order (Dovecot); Subject takes the last."""
    raw = b"To: g: a@b, c@d;\r\nTo: m@n.o (Mr M)\r\nSubject: one\r\nSubject: two\r\n\r\nx\r\n"
    env = Message(raw).envelope()
    assert env[1] == b"two"
    assert env[5] == (
        (None, None, b"g", None),
        (None, None, b"a", b"b"),
        (None, None, b"c", b"d"),
        (None, None, None, None),
        (b"Mr M", None, b"m", b"n.o"),
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"j@x.org (cmt) (Mr  X)", ((b"Mr X", None, b"j", b"x.org"),)),
        (b"j@x.org ()", ((None, None, b"j", b"x.org"),)),
        (b"j@x.org ( )", ((b"", None, b"j", b"x.org"),)),
        (b",j@x.org", ((None, None, b"MISSING_MAILBOX", b"MISSING_DOMAIN"),
                       (None, None, b"j", b"x.org"))),
        (b"g: ;, j@", ((None, None, b"g", None), (None, None, None, None),
                       (None, None, b"j", b"MISSING_DOMAIN"))),
        (b"Y <@x.org>", ((b"Y", b"INVALID_ROUTE", b"MISSING_MAILBOX", b"MISSING_DOMAIN"),)),
        (b'"a" <j@>, k@x.org', ((b"a", None, b"j", b"SYNTAX_ERROR"),)),
        (b"j @ x . org", ((None, None, b"j", b"x.org"),)),
        (b"John Q. Public <@r1,@r2:j@[1.2.3.4]>",
         ((b"John Q. Public", b"@r1,@r2", b"j", b"[1.2.3.4]"),)),
        (b"", None),
    ],
)  # fmt: skip
def test_address_details_as_dovecot(value: bytes, expected: object) -> None:
    """Comment names, empty members, bad routes and ``<local@>`` as Dovecot 2.3.19 parses them."""
    assert parse_addresses(value) == expected


_texts = st.text(
    st.characters(min_codepoint=32, max_codepoint=0x2FF, blacklist_categories=("Cc",)), max_size=60
)


@st.composite
def _email_messages(draw: st.DrawFn) -> bytes:
    """Messages the email package writes: text, optional HTML, optional attachments."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = email.utils.formataddr((draw(_names), "a@example.org"))
    msg["Subject"] = draw(_texts)
    msg.set_content(
        draw(_texts) + "\n", cte=draw(st.sampled_from(["8bit", "base64", "quoted-printable"]))
    )
    if draw(st.booleans()):
        msg.add_alternative("<p>" + draw(_texts) + "</p>\n", subtype="html")
    for data in draw(st.lists(st.binary(max_size=50), max_size=2)):
        msg.add_attachment(
            data, maintype="application", subtype="octet-stream", filename=draw(_names)
        )
    if msg.is_multipart():
        msg.set_boundary("==part-boundary==")
        for sub in msg.iter_parts():
            if sub.is_multipart():
                sub.set_boundary("==inner-boundary==")
    raw = msg.as_bytes()
    return raw.replace(b"\r\n", b"\n") if draw(st.booleans()) else raw


def _leaves(
    structure: tuple[object, ...], prefix: tuple[int, ...]
) -> list[tuple[tuple[int, ...], tuple[object, ...]]]:
    """(part number, BODYSTRUCTURE) of every non-multipart part."""
    if not isinstance(structure[0], tuple):
        return [(prefix or (1,), structure)]
    out = []
    for i, child in enumerate(structure):
        if not isinstance(child, tuple):
            break  # the subtype: children come before it
        out += _leaves(child, (*prefix, i + 1))
    return out


@given(_email_messages())
def test_sections_partition_the_message(raw: bytes) -> None:
    """HEADER + TEXT is the message; each leaf's MIME + body is in it; sizes match BODY[n]."""
    m = Message(raw)
    assert m.section(Section(text="HEADER")) + m.section(Section(text="TEXT")) == raw
    for path, leaf in _leaves(m.body_structure(), ()):
        body = m.section(Section(path))
        assert leaf[6] == len(body)
        if len(path) > 1 or isinstance(m.body_structure()[0], tuple):
            assert m.section(Section(path, "MIME")) + body in raw
        if leaf[0] == b"text":
            assert leaf[7] == body.count(b"\n")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\rb\r\n\nc", b"a\r\nb\r\n\r\nc"),
        (b"", b""),
    ],
)
def test_canonical_crlf(raw: bytes, expected: bytes) -> None:
    """Bare LF and CR become CRLF; CRLF text is returned unchanged."""
    assert canonical_crlf(raw) == expected


def test_lf_message_after_crlf_matches_crlf_original() -> None:
    """A corpus message stored with LFs and made canonical gives Dovecot's sizes again."""
    lf = CORPUS["nested"].replace(b"\r\n", b"\n")
    assert Message(canonical_crlf(lf)).body_structure() == FETCH["nested"]["BODYSTRUCTURE"]


_field_names = st.from_regex(r"[A-Z][A-Z0-9-]{0,10}", fullmatch=True).map(str.encode)


@given(
    st.lists(st.integers(1, 9999), max_size=4),
    st.sampled_from([None, "HEADER", "TEXT", "MIME", "HEADER.FIELDS", "HEADER.FIELDS.NOT"]),
    st.lists(_field_names, min_size=1, max_size=3),
)
def test_section_label_parses_back(part: list[int], text: str | None, names: list[bytes]) -> None:
    """Any valid section's label parses back to the same section."""
    if text == "MIME" and not part:
        return
    fields = tuple(names) if text and text.startswith("HEADER.FIELDS") else ()
    section = Section(tuple(part), text, fields)
    assert parse_section(section.label()) == section


_pieces = st.sampled_from(
    [b"--b\r\n", b"--b--\r\n", b"\r\n", b"Content-Type: message/rfc822\r\n",
     b"Content-Type: multipart/mixed; boundary=b\r\n", b"Content-Type: multipart/digest; boundary=b\r\n",
     b"Content-Type: text/plain\r\n", b"Subject: x\r\n", b"hello\r\n", b"--b", b"\n", b"From: a@b\r\n"]
)  # fmt: skip


@given(st.lists(_pieces, max_size=30))
def test_multipart_shaped_noise_never_raises(pieces: list[bytes]) -> None:
    """Messages stitched from boundary, header and body lines: no error, sizes and slices agree."""
    raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"".join(pieces)
    m = Message(raw)
    m.envelope()
    for path, leaf in _leaves(m.body_structure(), ()):
        assert leaf[6] == len(m.section(Section(path)))  # sizes agree with BODY[n]
    for spec in (b"1", b"1.1", b"2.MIME", b"1.HEADER", b"2.1.TEXT", b"HEADER.FIELDS (Subject)"):
        assert m.section(parse_section(spec)) in raw or spec.startswith(b"HEADER.FIELDS")
    m.full_text()


def test_item_name() -> None:
    """The response names a section as BODY[label], with <origin> for a partial fetch."""
    assert Section().item_name() == b"BODY[]"
    assert Section((1,), "MIME").item_name() == b"BODY[1.MIME]"
    assert (
        parse_section(b"header.fields (x-tuid)").item_name(0) == b"BODY[HEADER.FIELDS (X-TUID)]<0>"
    )
