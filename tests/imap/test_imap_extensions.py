"""Extensions whose advertisement depends on the backend, through the shell over the
in-memory backend: MULTIAPPEND (RFC 3502), SEARCHRES (RFC 5182), BINARY (RFC 3516),
UTF8=ACCEPT (RFC 6855)."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from yimaporc.imap._protocol import ImapServerFactory
from yimaporc.imap._view import mutf7_decode, mutf7_encode, valid_mailbox_name
from yimaporc.testing.imap_memory import MemoryBackend, MemoryStore, SimpleRenderer


class Client:
    def __init__(self, factory: ImapServerFactory) -> None:
        self.proto = factory.buildProtocol(None)
        self.t = StringTransport()
        self.proto.makeConnection(self.t)
        self.greeting = self.take()

    def take(self) -> bytes:
        out: bytes = self.t.value()
        self.t.clear()
        return out

    def run(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        return self.take()


def setup(**backend: Any) -> tuple[MemoryStore, ImapServerFactory]:
    store = MemoryStore({"alice": "pw"})
    store.deliver("alice", b"Subject: one\r\n\r\nfirst\r\n")
    store.deliver("alice", b"Subject: two\r\n\r\nsecond\r\n")
    return store, ImapServerFactory(MemoryBackend(store, **backend), SimpleRenderer(), Clock())


def multiappend(tag: bytes, mailbox: bytes, parts: list[bytes], sync: bool = False) -> bytes:
    """A MULTIAPPEND command with one literal per part (each part may start with flags)."""
    plus = b"" if sync else b"+"
    out = tag + b" APPEND " + mailbox
    for p in parts:
        head, _, body = p.rpartition(b"|")
        out += (b" " + head if head else b"") + b" {%d%s}\r\n" % (len(body), plus) + body
    return out + b"\r\n"


MSGS = [b"(\\Seen)|Subject: a\r\n\r\nA\r\n", b'" 7-Feb-1994 21:52:25 -0800"|Subject: b\r\n\r\nB\r\n',
        b"Subject: c\r\n\r\nC\r\n"]  # fmt: skip


def test_multiappend_stores_every_message_and_answers_one_appenduid() -> None:
    """MULTIAPPEND with synchronising literals gets one + per literal, stores the three
    messages with their flags and date under consecutive UIDs (APPENDUID 3:5), and a
    selected session sees them arrive together (one EXISTS 5)."""
    store, factory = setup()
    c, watcher = Client(factory), Client(factory)
    assert b"MULTIAPPEND" in c.greeting
    c.run(b"a LOGIN alice pw\r\n")
    watcher.run(b"w LOGIN alice pw\r\nx SELECT INBOX\r\n")
    cmd = multiappend(b"b", b"INBOX", MSGS, sync=True)
    pieces = re.split(rb"(?<=\}\r\n)", cmd)
    out = b"".join(c.run(p) for p in pieces)
    assert out.count(b"+ ") == 3
    m = re.search(rb"b OK \[APPENDUID (\d+) 3:5\]", out)
    assert m and int(m.group(1)) == store.boxes["alice"]["INBOX"].uidvalidity, out
    out = watcher.run(b"y NOOP\r\n")
    assert out.startswith(b"* 5 EXISTS\r\n") and out.count(b"EXISTS") == 1
    out = c.run(b"c SELECT INBOX\r\nd FETCH 3:5 (FLAGS INTERNALDATE BODY.PEEK[TEXT])\r\n")
    assert re.search(rb"\* 3 FETCH \(FLAGS \([^)]*\\Seen", out)
    assert b'INTERNALDATE " 8-Feb-1994 05:52:25 +0000"' in out
    assert [x for x in re.findall(rb"\{3\}\r\n(\w)\r\n", out)] == [b"A", b"B", b"C"]


def test_multiappend_stores_nothing_when_one_message_is_refused() -> None:
    """A MULTIAPPEND whose third message carries \\Recent, whose second has a bad date, or
    whose mailbox is missing stores none of its messages."""
    store, factory = setup()
    c = Client(factory)
    c.run(b"a LOGIN alice pw\r\n")
    out = c.run(multiappend(b"b", b"INBOX", [*MSGS[:2], b"(\\Recent)|x"]))
    assert b"b BAD" in out
    bad_date = b'"31-Feb-1994 21:52:25 -0800"|x'
    assert b"c BAD" in c.run(multiappend(b"c", b"INBOX", [MSGS[0], bad_date, MSGS[2]]))
    assert b"d NO [TRYCREATE]" in c.run(multiappend(b"d", b"Nope", MSGS))
    assert len(store.boxes["alice"]["INBOX"].messages) == 2
    assert "Nope" not in store.boxes["alice"]


def test_multiappend_needs_a_backend_that_offers_it() -> None:
    """A backend without MULTIAPPEND in its extensions: not advertised, a MULTIAPPEND is
    BAD and stores nothing, a single APPEND still works."""
    store, factory = setup(extensions=())
    c = Client(factory)
    assert b"MULTIAPPEND" not in c.greeting
    out = c.run(b"a LOGIN alice pw\r\nb CAPABILITY\r\n")
    assert b"* CAPABILITY " in out and b"MULTIAPPEND" not in out
    assert b"c BAD" in c.run(multiappend(b"c", b"INBOX", MSGS))
    assert b"d OK [APPENDUID" in c.run(multiappend(b"d", b"INBOX", MSGS[2:]))
    assert len(store.boxes["alice"]["INBOX"].messages) == 3


def searchres_client() -> tuple[MemoryStore, Client]:
    store = MemoryStore({"alice": "pw"})
    for i in range(1, 7):
        flags = ("\\Flagged",) if i % 2 == 0 else ()
        store.deliver("alice", b"Subject: s%d\r\n\r\n%s\r\n" % (i, b"x" * i * 10), flags=flags)
    factory = ImapServerFactory(MemoryBackend(store), SimpleRenderer(), Clock())
    c = Client(factory)
    assert b"SEARCHRES" in c.greeting
    c.run(b"a LOGIN alice pw\r\nb SELECT INBOX\r\n")
    return store, c


def test_searchres_saves_and_reuses_the_result() -> None:
    """SEARCH RETURN (SAVE) answers nothing untagged and saves the result; FETCH $,
    UID FETCH $, STORE $, SEARCH $ (even one that saves anew) and SEARCH UID $ use it."""
    _, c = searchres_client()
    out = c.run(b"c SEARCH RETURN (SAVE) FLAGGED\r\n")
    assert out == b"c OK SEARCH completed\r\n"
    out = c.run(b"d FETCH $ (UID)\r\n")
    assert re.findall(rb"\* (\d) FETCH \(UID \d\)", out) == [b"2", b"4", b"6"]
    out = c.run(b"e UID FETCH $ (FLAGS)\r\n")
    assert out.count(b"FLAGS (\\Flagged)") == 3 and b"e OK" in out
    out = c.run(b"f SEARCH RETURN (SAVE ALL) $ LARGER 40\r\n")  # the old $ in the keys
    assert b'* ESEARCH (TAG "f") ALL 4,6\r\n' in out
    assert b"* SEARCH 4 6\r\n" in c.run(b"g SEARCH UID $\r\n")
    assert b"* SEARCH 1 2 3 5\r\n" in c.run(b"h SEARCH OR NOT $ SUBJECT $\r\n")
    out = c.run(b"i STORE $ +FLAGS (\\Seen)\r\nj SEARCH SEEN\r\n")
    assert b"* SEARCH 4 6\r\n" in out


def test_searchres_min_max_expunge_failure_and_reset() -> None:
    """SAVE with MIN/MAX keeps only those; expunged messages leave $; a failing SEARCH
    (SAVE) empties it; SELECT empties it; an empty $ matches nothing."""
    _, c = searchres_client()
    out = c.run(b"c UID SEARCH RETURN (SAVE MIN MAX) FLAGGED\r\n")
    assert b'* ESEARCH (TAG "c") UID MIN 2 MAX 6\r\n' in out
    assert b"* SEARCH 2 6\r\n" in c.run(b"d UID SEARCH $\r\n")
    out = c.run(b"e UID STORE 2 +FLAGS (\\Deleted)\r\nf EXPUNGE\r\ng UID SEARCH UID $\r\n")
    assert b"* SEARCH 6\r\n" in out
    out = c.run(b"h SEARCH RETURN (SAVE) CHARSET KOI8-R ALL\r\ni SEARCH $\r\n")
    assert b"h NO [BADCHARSET" in out and b"* SEARCH\r\n" in out
    c.run(b"j SEARCH RETURN (SAVE) ALL\r\n")
    out = c.run(b"k SELECT INBOX\r\nl FETCH $ (UID)\r\nm SEARCH $\r\n")
    assert not re.search(rb"\* \d+ FETCH", out) and b"* SEARCH\r\n" in out and b"l OK" in out


BLOB = bytes(range(256))
MIME = (
    b"MIME-Version: 1.0\r\nSubject: bin\r\n"
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe =3D ok\r\n"
    b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    + __import__("base64").encodebytes(BLOB).replace(b"\n", b"\r\n")
    + b"--b\r\nContent-Type: application/x-thing\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n"
    b"begin 644 x\r\n--b--\r\n"
)


def binary_client(**backend: Any) -> tuple[MemoryStore, Client]:
    store = MemoryStore({"alice": "pw"})
    store.deliver("alice", MIME)
    c = Client(ImapServerFactory(MemoryBackend(store, **backend), SimpleRenderer(), Clock()))
    c.run(b"a LOGIN alice pw\r\nb SELECT INBOX\r\n")
    return store, c


def test_binary_fetch_decodes_parts() -> None:
    """BINARY.PEEK[1] undoes quoted-printable, BINARY[2] base64, BINARY.SIZE counts decoded octets, a partial cuts the decoded
    data, every BINARY value is a literal8 (as Dovecot), BINARY[] is the whole message, an unknown encoding is NO [UNKNOWN-CTE], and
    BINARY without PEEK sets \\Seen."""
    _, c = binary_client()
    assert b"BINARY" in c.greeting
    out = c.run(b"c FETCH 1 (BINARY.PEEK[1] BINARY.SIZE[2] BINARY.PEEK[2]<1.3>)\r\n")
    assert "BINARY[1] ~{12}\r\nGrüße = ok ".encode() in out
    assert b"BINARY.SIZE[2] 256" in out
    assert b"BINARY[2]<1> ~{3}\r\n\x01\x02\x03" in out and b"FLAGS" not in out
    out = c.run(b"d FETCH 1 (BINARY.PEEK[2])\r\ne FETCH 1 (BINARY.PEEK[] RFC822.SIZE)\r\n")
    assert b"BINARY[2] ~{256}\r\n" + BLOB + b")" in out
    assert b"BINARY[] ~{%d}\r\n" % len(MIME) + MIME in out
    assert b"f NO [UNKNOWN-CTE]" in c.run(b"f FETCH 1 (BINARY.PEEK[3])\r\n")
    out = c.run(b"g FETCH 1 (BINARY[1])\r\n")
    assert b"\\Seen" in out and b"g OK" in out


def test_binary_append_of_a_literal8_keeps_every_octet() -> None:
    """APPEND with a ~{n} literal8 (NUL and bare CR/LF inside) stores the octets as sent:
    RFC822.SIZE and BINARY[] give them back."""
    store, c = binary_client()
    raw = b"Subject: raw\r\nContent-Transfer-Encoding: binary\r\n\r\n\x00\x01\n\r\xff\r\n"
    out = c.run(b"c APPEND INBOX ~{%d}\r\n" % len(raw))
    assert out.startswith(b"+ ")
    assert b"c OK [APPENDUID" in c.run(raw + b"\r\n")
    out = c.run(b"d FETCH 2 (RFC822.SIZE BINARY.PEEK[])\r\n")
    assert b"RFC822.SIZE %d" % len(raw) in out and b"~{%d}\r\n" % len(raw) + raw in out
    assert store.boxes["alice"]["INBOX"].messages[1].raw == raw


def test_binary_needs_a_backend_that_offers_it() -> None:
    """A backend without BINARY: not advertised, FETCH BINARY and an APPEND literal8 are
    BAD (nothing stored), a literal8 anywhere but APPEND is BAD too."""
    store, c = binary_client(extensions=("MULTIAPPEND",))
    assert b"BINARY" not in c.greeting
    assert b"c BAD" in c.run(b"c FETCH 1 (BINARY.PEEK[1])\r\n")
    assert b"d BAD" in c.run(b"d APPEND INBOX ~{1+}\r\nx\r\n")
    assert len(store.boxes["alice"]["INBOX"].messages) == 1
    assert b"e BAD" in c.run(b"e SEARCH SUBJECT ~{1+}\r\nx\r\n")


def test_utf8_accept_mailbox_names_and_utf8_append() -> None:
    """After ENABLE UTF8=ACCEPT mailbox names are Unicode both ways (stored as modified
    UTF-7, which a session without it still sees) and APPEND takes UTF8 (~{n}) with raw
    UTF-8 headers; before ENABLE a raw UTF-8 name is refused and UTF8 (...) is BAD."""
    store, factory = setup()
    c, plain = Client(factory), Client(factory)
    assert b"UTF8=ACCEPT" in c.greeting
    c.run(b"a LOGIN alice pw\r\n")
    plain.run(b"p LOGIN alice pw\r\n")
    name = "Grüße & Co".encode()
    assert b"b NO" in c.run(b'b CREATE "%s"\r\n' % name)  # not enabled yet
    assert b"* ENABLED UTF8=ACCEPT\r\nc OK" in c.run(b"c ENABLE UTF8=ACCEPT\r\n")
    assert b"d OK" in c.run(b'd CREATE "%s"\r\n' % name)
    assert "Gr&APwA3w-e &- Co" in store.boxes["alice"]
    out = c.run(b'e LIST "" "Gr*"\r\nf STATUS "%s" (MESSAGES)\r\n' % name)
    assert b'"/" {%d}\r\n%s\r\n' % (len(name), name) in out
    assert b"* STATUS {%d}\r\n%s (MESSAGES 0)" % (len(name), name) in out
    assert b'"Gr&APwA3w-e &- Co"' in plain.run(b'q LIST "" "Gr*"\r\n')
    raw = "Subject: Grüße\r\nFrom: Jörg <j@example.org>\r\n\r\nhallo\r\n".encode()
    out = c.run(b'g APPEND "%s" UTF8 (~{%d+}\r\n%s)\r\n' % (name, len(raw), raw))
    assert b"g OK [APPENDUID" in out
    out = c.run(b'h SELECT "%s"\r\ni FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n' % name)
    assert b"* 1 EXISTS" in out and "Subject: Grüße".encode() in out
    assert b"j OK" in c.run(b'j RENAME "%s" "%s"\r\n' % (name, "Ä".encode()))
    assert "&AMQ-" in store.boxes["alice"]
    out = plain.run(b"r APPEND INBOX UTF8 (~{%d+}\r\n%s)\r\n" % (len(raw), raw))
    assert b"r BAD" in out


@given(st.text(st.characters(min_codepoint=32, blacklist_categories=("Cs", "Cc")), max_size=20))
def test_modified_utf7_round_trip(name: str) -> None:
    """Any Unicode name encodes to valid modified UTF-7 and decodes back to itself."""
    encoded = mutf7_encode(name)
    assert encoded.isascii() and valid_mailbox_name(encoded)
    assert mutf7_decode(encoded) == name


def test_saved_result_substitution_is_flat_and_keeps_arguments() -> None:
    """`$` is replaced as a key (also under NOT/OR and as `UID $`), never as an
    argument (`SUBJECT $`); a 50,000-deep NOT chain is handled without recursion."""
    from yimaporc.imap._fetch import with_saved_result

    got = with_saved_result(("OR", "$", "SUBJECT", "$", "NOT", "UID", "$"), [3, 4, 5])
    assert got == ("OR", ["UID", "3:5"], "SUBJECT", "$", "NOT", ["UID", "3:5"])
    assert with_saved_result(("$",), []) == (["NOT", "ALL"],)
    deep = ("NOT",) * 50_000 + ("$",)
    assert with_saved_result(deep, [7])[-1] == ["UID", "7"]
