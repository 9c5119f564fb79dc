"""The RPC layer's AMP vocabulary: the handshake commands, ``Echo``, the errors, and
:class:`BigBytes` for values over AMP's 64 KiB."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from twisted.protocols import amp
from twisted.python.failure import Failure

from .wire import Scope

CHUNK = 0xFFFF


class BigBytes(amp.Argument):
    """Bytes of any length, split over keys ``name``, ``name.1``, ``name.2``..."""

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        value = objects.pop(name.decode("ascii"))
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"{name!r} must be bytes")
        value = bytes(value)
        chunks = [value[i : i + CHUNK] for i in range(0, len(value), CHUNK)] or [b""]
        strings[name] = chunks[0]
        if len(chunks) > 1:
            strings[name + b".n"] = str(len(chunks)).encode("ascii")
            for i, chunk in enumerate(chunks[1:], 1):
                strings[name + b".%d" % i] = chunk

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        """Join the chunks; a missing chunk or a bad count is :class:`amp.MalformedAmpBox`."""
        try:
            parts = [strings.pop(name)]
            count = int(strings.pop(name + b".n", b"1"))
        except (KeyError, ValueError) as e:
            raise amp.MalformedAmpBox(f"bad or missing {name!r}") from e
        if not 1 <= count <= 100_000:
            raise amp.MalformedAmpBox(f"bad chunk count for {name!r}")
        for i in range(1, count):
            chunk = strings.pop(name + b".%d" % i, None)
            if chunk is None:
                raise amp.MalformedAmpBox(f"chunk {i} of {count} of {name!r} missing")
            parts.append(chunk)
        objects[name.decode("ascii")] = b"".join(parts)


class AuthFailed(Exception):
    """The peer does not know the cluster secret."""


class Unauthenticated(Exception):
    """A command arrived before the connection was authenticated."""


class PeerUnavailable(Exception):
    """The peer could not be reached or did not answer in time.

    ``maybe_done``: the request had been sent when the call failed (a timeout or a
    connection lost while waiting), so the peer may have run it, or may still run
    it when TCP delivers the request late (after a partition heals): a caller must
    not redo a non-idempotent request elsewhere (issue 14: a store retried on a
    second node listed a message twice).  The RPC client raises those as
    :class:`PeerMaybeDone`; callers read the declared ``maybe_done`` of any
    ``PeerUnavailable`` (subclasses answered by a peer set it too).
    """

    #: The request may have run at the peer (declared here, True in subclasses).
    maybe_done: bool = False


def may_have_run(failure: Failure) -> bool:
    """Did the request that failed with ``failure`` perhaps run at the peer (a
    :class:`PeerUnavailable` with ``maybe_done`` set)?"""
    value = failure.value
    return isinstance(value, PeerUnavailable) and value.maybe_done


class PeerMaybeDone(PeerUnavailable):
    """The peer did not answer, but the request had been sent: it may have run it, or
    still will (see :class:`PeerUnavailable`); never redo it elsewhere."""

    maybe_done = True


class UnknownValue(ValueError):
    """A well-formed argument whose value this node does not know (an enum member a
    newer node sent, say).  Raised by an argument's ``fromString``: the call gets an
    error answer :attr:`code` (the connection stays, the guard counts
    ``refused_unknown_value``), never a traceback; a command lists it in ``errors``
    so the caller gets this exception back."""

    code = b"UNKNOWN_VALUE"


class Hello(amp.Command):
    """Step 1 of the handshake: the client's id and nonce; the server proves itself."""

    commandName = b"yimaporc.hello"

    arguments = [
        (b"node_id", amp.Unicode()),
        (b"nonce", amp.String()),
        (b"cluster", amp.Unicode()),
        (b"kind", amp.Unicode()),
    ]
    response = [
        (b"node_id", amp.Unicode()),
        (b"nonce", amp.String()),
        (b"proof", amp.String()),
        (b"cluster", amp.Unicode()),
        (b"kind", amp.Unicode()),
    ]
    errors = {AuthFailed: b"AUTH_FAILED"}
    fatalErrors = {AuthFailed: b"AUTH_FAILED"}


class Prove(amp.Command):
    """Step 2 of the handshake: the client proves it knows the key."""

    commandName = b"yimaporc.prove"

    arguments = [(b"proof", amp.String())]
    response = []  # type: ignore[var-annotated]
    errors = {AuthFailed: b"AUTH_FAILED"}
    fatalErrors = {AuthFailed: b"AUTH_FAILED"}


class Echo(amp.Command):
    """Round-trip check; returns its payload (any size)."""

    commandName = b"yimaporc.echo"

    arguments = [(b"payload", BigBytes())]
    response = [(b"payload", BigBytes())]


def _proof(key: bytes, scope: Scope, role: bytes, a: bytes, b: bytes, node_id: str) -> bytes:
    where = f"{scope.kind}\0{scope.cluster}".encode("ascii")
    msg = role + b"|" + where + b"|" + a + b"|" + b + b"|" + node_id.encode("utf-8")
    return hmac.new(key, msg, hashlib.sha256).digest()
