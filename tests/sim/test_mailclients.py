"""The kernel mail scenario's scripted clients read a refusal as a refusal: a listing
is only what a completed SELECT and FETCH (IMAP) or UIDL (POP3) showed."""

from __future__ import annotations

from yimaporc.sim._mailclients import parse_imap, parse_uidl

GREETING = b"* OK [CAPABILITY IMAP4rev1] ready\r\n"
LOGIN = b"a1 OK LOGIN completed\r\n"
SELECT = (
    b"* 3 EXISTS\r\n* OK [UIDVALIDITY 7] UIDs valid\r\n* OK [UIDNEXT 259] predicted next UID\r\n"
    b"a2 OK [READ-WRITE] SELECT completed\r\n"
)
FETCH = (
    b"* 1 FETCH (UID 1 BODY[HEADER.FIELDS (SUBJECT)] {14}\r\nSubject: m4\r\n\r\n)\r\n"
    b"* 2 FETCH (UID 258 BODY[HEADER.FIELDS (SUBJECT)] {15}\r\nSubject: m21\r\n\r\n)\r\n"
    b"a3 OK FETCH completed\r\n"
)


def test_a_completed_fetch_is_a_listing_and_a_refused_one_is_none() -> None:
    """``a3 OK``: the (subject, UID) pairs and UIDNEXT; ``a3 NO [UNAVAILABLE]`` after a
    good SELECT (a holder out of reach, sim.mail 5-node seeds 202/217): None, never an
    empty listing that the checker would take as messages gone."""
    assert parse_imap([GREETING, LOGIN, SELECT, FETCH]) == ([("m4", 1), ("m21", 258)], 259)
    refused = b"a3 NO [UNAVAILABLE] a node holding this mail is out of reach, try again later\r\n"
    assert parse_imap([GREETING, LOGIN, SELECT, refused]) is None
    assert parse_imap([GREETING, LOGIN, b"a2 NO [UNAVAILABLE] later\r\n", refused]) is None
    empty = b"a3 OK FETCH completed\r\n"
    assert parse_imap([GREETING, LOGIN, SELECT, empty]) == ([], 259)


def test_a_refused_uidl_is_none_and_a_completed_one_lists_the_ids() -> None:
    """POP3 ``-ERR [SYS/TEMP]`` on UIDL is a refusal (None), ``+OK`` lists the ids."""
    head = [b"+OK ready\r\n", b"+OK\r\n", b"+OK logged in\r\n"]
    assert parse_uidl([*head, b"+OK\r\n1 7.1\r\n2 7.258\r\n.\r\n"]) == ["7.1", "7.258"]
    assert parse_uidl([*head, b"-ERR [SYS/TEMP] out of reach\r\n"]) is None
