"""Mutations of transcripts: byte flips, chunk edits, splices, huge lengths, boundary numbers.

Everything draws from one injected ``random.Random``, so a seed reproduces a run.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

BOUNDARY_NUMBERS = (
    b"0", b"-1", b"1", b"-0", b"00000000000000000001", b"127", b"128", b"255", b"256",
    b"32767", b"32768", b"65535", b"65536", b"2147483647", b"2147483648", b"-2147483649",
    b"4294967295", b"4294967296", b"9223372036854775807", b"9223372036854775808",
    b"18446744073709551615", b"18446744073709551616", b"1" * 40, b"1e9", b"0x10", b"+5",
    b"NaN", b"inf", b"\xd9\xa3", b"\xc2\xb2", b"1_000",
)  # fmt: skip

INTERESTING = (
    b"\r\n", b"\n", b"\r", b"\x00", b"\xff", b"{", b"}", b"(", b")", b"[", b"]", b"<", b">",
    b'"', b"\\", b"*", b"%", b":", b";", b",", b"=", b".", b"\r\n.\r\n", b"{4294967295}\r\n",
    b"{99999999999999999999}\r\n", b"{0}\r\n", b"{10+}\r\n", b"$\x00\xff\xff",
    b"Content-Length: 18446744073709551616\r\n", b"Content-Length: -1\r\n",
    b"Transfer-Encoding: chunked\r\n", b"\r\n\r\n", b"\xef\xbb\xbf", b"\xc0\x80", b"%s%n%x",
    b"../../../../etc/passwd", b"*" * 20, b"OR " * 30, b"NOT " * 30, b"(" * 200,
)  # fmt: skip

_DIGITS = re.compile(rb"\d+")
_VALUE = re.compile(rb"(?:: |=|\{)([^\r\n;,}]*)")

Mutation = Callable[[random.Random, bytes, Sequence[bytes]], bytes]


def _pos(rng: random.Random, data: bytes) -> int:
    return rng.randrange(len(data) + 1)


def flip_bits(rng: random.Random, data: bytes, _: Sequence[bytes]) -> bytes:
    """Flip 1-8 random bits."""
    if not data:
        return data
    out = bytearray(data)
    for _i in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def set_bytes(rng: random.Random, data: bytes, _: Sequence[bytes]) -> bytes:
    """Overwrite 1-4 bytes with random or special values."""
    if not data:
        return data
    out = bytearray(data)
    for _i in range(rng.randint(1, 4)):
        out[rng.randrange(len(out))] = rng.choice(
            (0, 0xFF, 0x0A, 0x0D, 0x20, 0x7F, rng.randrange(256))
        )
    return bytes(out)


def insert_chunk(rng: random.Random, data: bytes, _: Sequence[bytes]) -> bytes:
    """Insert random bytes or an interesting token."""
    i = _pos(rng, data)
    piece = rng.choice(INTERESTING) if rng.random() < 0.6 else rng.randbytes(rng.randint(1, 32))
    return data[:i] + piece + data[i:]


def delete_chunk(rng: random.Random, data: bytes, _: Sequence[bytes]) -> bytes:
    """Delete a random chunk."""
    if not data:
        return data
    i = rng.randrange(len(data))
    return data[:i] + data[i + rng.randint(1, min(64, len(data) - i)) :]


def duplicate_chunk(rng: random.Random, data: bytes, _: Sequence[bytes]) -> bytes:
    """Repeat a chunk 2-100 times (sometimes many more) in place."""
    if not data:
        return data
    i = rng.randrange(len(data))
    chunk = data[i : i + rng.randint(1, 64)]
    times = rng.choice((2, 3, 10, 100, rng.randint(2, 2000)))
    return data[:i] + chunk * times + data[i:]


def splice(rng: random.Random, data: bytes, others: Sequence[bytes]) -> bytes:
    """A prefix of this transcript followed by a suffix of another one."""
    other = rng.choice(others) if others else data
    return data[: _pos(rng, data)] + other[_pos(rng, other) :]


def boundary_number(rng: random.Random, data: bytes, _: Sequence[bytes]) -> bytes:
    """Replace one run of digits with a boundary value."""
    runs = list(_DIGITS.finditer(data))
    if not runs:
        return insert_chunk(rng, data, _)
    m = rng.choice(runs)
    return data[: m.start()] + rng.choice(BOUNDARY_NUMBERS) + data[m.end() :]


def replace_value(rng: random.Random, data: bytes, _: Sequence[bytes]) -> bytes:
    """Replace a header value (after ``: ``), parameter (after ``=``) or literal length with a boundary number or token."""
    values = list(_VALUE.finditer(data))
    if not values:
        return boundary_number(rng, data, _)
    m = rng.choice(values)
    new = rng.choice(BOUNDARY_NUMBERS) if rng.random() < 0.7 else rng.choice(INTERESTING)
    return data[: m.start(1)] + new + data[m.end(1) :]


def huge(rng: random.Random, data: bytes, _: Sequence[bytes]) -> bytes:
    """A huge announced length (literal, Content-Length, BDAT, SIZE) or a long run of bytes."""
    i = _pos(rng, data)
    choice = rng.randrange(4)
    if choice == 0:
        piece = b"{%d}\r\n" % rng.choice((2**31, 2**32 + 1, 2**63, 10**30, 65536, 1 << 20))
    elif choice == 1:
        piece = b"Content-Length: %d\r\n" % rng.choice((2**31, 2**64, 1 << 30, 65537))
    elif choice == 2:
        piece = rng.choice((b"A", b" ", b"(", b"\x00", b"*")) * rng.choice(
            (4097, 20_000, 70_000, 300_000)
        )
    else:
        piece = b"BDAT %d\r\n" % rng.choice((2**40, 1 << 30))
    return data[:i] + piece + data[i:]


def swap_lines(rng: random.Random, data: bytes, _: Sequence[bytes]) -> bytes:
    """Shuffle two lines (commands out of order)."""
    lines = data.split(b"\n")
    if len(lines) < 3:
        return data
    a, b = rng.randrange(len(lines)), rng.randrange(len(lines))
    lines[a], lines[b] = lines[b], lines[a]
    return b"\n".join(lines)


def strip_crlf(rng: random.Random, data: bytes, _: Sequence[bytes]) -> bytes:
    """Bare LF or bare CR line ends."""
    return data.replace(b"\r\n", rng.choice((b"\n", b"\r", b"\r\r\n", b"\n\r")))


MUTATIONS: tuple[tuple[Mutation, int], ...] = (
    (flip_bits, 10),
    (set_bytes, 8),
    (insert_chunk, 12),
    (delete_chunk, 8),
    (duplicate_chunk, 6),
    (splice, 8),
    (boundary_number, 12),
    (replace_value, 8),
    (huge, 2),
    (swap_lines, 4),
    (strip_crlf, 2),
)

_FUNCS = [m for m, _w in MUTATIONS]
_WEIGHTS = [w for _m, w in MUTATIONS]


def mutate(
    rng: random.Random, data: bytes, others: Sequence[bytes], max_size: int = 1 << 20
) -> bytes:
    """``data`` after 1-4 stacked mutations (rarely none), capped at ``max_size`` bytes."""
    if rng.random() < 0.02:
        return data
    for fn in rng.choices(_FUNCS, _WEIGHTS, k=rng.choice((1, 1, 1, 2, 2, 3, 4))):
        data = fn(rng, data, others)
        if len(data) > max_size:
            data = data[:max_size]
    return data


def segments(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` cut for sending: all at once (pipelined), a few random TCP segments, or bytewise bursts."""
    r = rng.random()
    if r < 0.6 or len(data) < 2:
        return [data]
    if r < 0.95:
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 8))))
    else:
        cuts = list(range(1, min(len(data), 200)))  # the first 200 bytes one by one
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
