"""StreamAction on the wire: the same words as before, members in handlers, unknown words refused."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient

from yimaporc.cluster.rpc import NodeAMP, RpcGuard, RpcRegistry, UnknownValue
from yimaporc.cluster.wire import Scope
from yimaporc.yima._workerchannel import WorkerControl
from yimaporc.yima.control import StreamAction, StreamActionArgument
from yimaporc.yima.schedule import PAYLOAD, MediaTiming, Packet
from yimaporc.yima.streaming import Destination, StreamControl, StreamingNode

KEY = b"k" * 32
MEDIA = Scope("media", "yima")
WORDS = {a.value for a in StreamAction}
BLOCK = 4 * PAYLOAD
CLIP = MediaTiming("clip", 6 * BLOCK, BLOCK, tuple(float(i) for i in range(6)), 6.0)


class OtherNodeControl(amp.Command):
    """StreamControl as a node of another version sends it: the action as free text."""

    commandName = StreamControl.commandName
    arguments = [
        (b"session", amp.Unicode()),
        (b"action", amp.Unicode()),
        (b"at", amp.Float()),
        (b"value", amp.Float()),
    ]
    response = []  # type: ignore[var-annotated]
    errors = {UnknownValue: UnknownValue.code}


def call(client: NodeAMP, pump: Any, command: type[amp.Command], **kw: Any) -> Any:
    """What ``command`` answers (a result or a Failure), collected before AMP sees it."""
    out: list[Any] = []
    d: Deferred[Any] = client.callRemote(command, **kw)
    d.addBoth(out.append)
    pump.flush()
    assert out, "no answer"
    return out[0]


@pytest.mark.parametrize("action", list(StreamAction))
def test_every_member_round_trips_as_its_old_word(action: StreamAction) -> None:
    """Each member travels as the ASCII word old nodes sent and comes back as the same member."""
    arg = StreamActionArgument()
    raw = arg.toString(action)
    assert raw == action.value.encode("ascii")
    back = arg.fromString(raw)
    assert back is action and isinstance(back, StreamAction)


@pytest.mark.parametrize("command", [StreamControl, WorkerControl])
@pytest.mark.parametrize("action", list(StreamAction))
def test_every_member_round_trips_through_the_command_box(
    command: type[amp.Command], action: StreamAction
) -> None:
    """StreamControl's and WorkerControl's boxes carry the member and parse back to it."""
    kw: dict[str, Any] = {"session": "s", "action": action, "at": 1.5, "value": 2.0}
    if command is WorkerControl:
        kw["offset"] = -0.25
    box = command.makeArguments(kw, None)
    assert box[b"action"] == action.value.encode("ascii")
    parsed = command.parseArguments(box, None)
    assert parsed == kw and parsed["action"] is action


@given(st.binary(max_size=40))
def test_bytes_that_are_not_a_word_are_unknown_values(raw: bytes) -> None:
    """Any bytes other than the four words are refused with UnknownValue, never another error."""
    arg = StreamActionArgument()
    if raw.decode("latin-1") in WORDS:
        assert arg.fromString(raw).value == raw.decode("ascii")
        return
    with pytest.raises(UnknownValue):
        arg.fromString(raw)


@given(st.text(max_size=40).filter(lambda t: t not in WORDS))
def test_text_that_is_not_a_word_is_refused_both_ways(text: str) -> None:
    """Unknown text does not encode (a local ValueError) and does not decode (UnknownValue)."""
    arg = StreamActionArgument()
    with pytest.raises(ValueError):
        arg.toString(text)  # type: ignore[arg-type]
    with pytest.raises(UnknownValue):
        arg.fromString(text.encode("utf-8"))


def packetize(p: Packet, d: Destination, payload: bytes) -> bytes:
    return struct.pack("!HI", (d.seq_base + p.gseq) & 0xFFFF, p.node_seq) + payload


def node_and_client() -> tuple[StreamingNode, list[Any], NodeAMP, NodeAMP, Any, RpcGuard]:
    """A real StreamingNode answering StreamControl over an authenticated NodeAMP pair."""
    clock = Clock()
    node = StreamingNode(
        clock,
        clock.seconds,
        timing=lambda name: CLIP,
        my_blocks=lambda name: list(range(6)),
        read_block=lambda name, b: succeed(bytes([b]) * BLOCK),
        packetize=packetize,
        send=lambda data, addr: None,
    )
    seen: list[Any] = []
    real = node.control

    def recording(**kw: Any) -> Any:
        seen.append(kw["action"])
        return real(**kw)

    node.control = recording  # type: ignore[method-assign]  # what the handler was handed
    registry = RpcRegistry()
    node.register(registry)
    guard = RpcGuard(clock)
    client, server, pump = connectedServerAndClient(
        lambda: NodeAMP(registry, KEY, "s", scope=MEDIA, guard=guard, server=True),
        lambda: NodeAMP(RpcRegistry(), KEY, "c", scope=MEDIA),
    )
    client.authenticate()
    pump.flush()
    assert server.authenticated
    node.start("s1", "clip", 1.0, 0.0, "127.0.185.9", 5000, 7, 0, 0, 0, False)
    return node, seen, client, server, pump, guard


def test_the_real_handler_gets_members_from_typed_and_free_text_callers() -> None:
    """Over RPC the handler receives StreamAction members, from this version and from free text."""
    node, seen, client, _, pump, guard = node_and_client()
    assert call(client, pump, StreamControl, session="s1", action=StreamAction.PAUSE, at=0.0,
                value=0.0) == {}  # fmt: skip
    assert node.scheduler.sessions["s1"].paused
    assert call(client, pump, OtherNodeControl, session="s1", action="resume", at=2.0,
                value=0.0) == {}  # fmt: skip
    assert not node.scheduler.sessions["s1"].paused
    assert seen == [StreamAction.PAUSE, StreamAction.RESUME]
    assert all(type(a) is StreamAction for a in seen)
    assert not guard.stats


@pytest.mark.parametrize("word", ["rewind", "PAUSE", "", "pause ", "x" * 300])
def test_an_unknown_word_is_an_error_answer_and_a_counter(word: str) -> None:
    """An unknown action: UNKNOWN_VALUE back to the caller, counted, no traceback, link kept."""
    node, seen, client, server, pump, guard = node_and_client()
    with capturedLogs() as events:
        failure = call(client, pump, OtherNodeControl, session="s1", action=word, at=0.0,
                       value=0.0)  # fmt: skip
    assert isinstance(failure, Failure) and failure.check(UnknownValue)
    assert seen == [] and not node.scheduler.sessions["s1"].paused
    assert guard.stats == {"refused_unknown_value": 1}
    assert not any(e.get("log_failure") is not None for e in events)
    # The connection is kept: the next call on it is served.
    assert call(client, pump, StreamControl, session="s1", action=StreamAction.STOP, at=0.0,
                value=0.0) == {}  # fmt: skip
    assert "s1" not in node.scheduler.sessions
    assert not server.transport.disconnected


def test_a_non_ascii_action_in_a_raw_box_is_answered_not_dropped() -> None:
    """Raw bytes that are no text at all as the action: the same error answer, the link stays."""
    _, seen, _, server, _, guard = node_and_client()
    transport = StringTransport()
    server.transport = transport
    pairs = [(b"_command", StreamControl.commandName), (b"_ask", b"77"), (b"session", b"s1"),
             (b"action", b"\xff\xfe"), (b"at", b"0.0"), (b"value", b"0.0")]  # fmt: skip
    raw = b"".join(struct.pack("!H", len(k)) + k + struct.pack("!H", len(v)) + v for k, v in pairs)
    with capturedLogs() as events:
        server.dataReceived(raw + b"\0\0")
    out = transport.value()
    assert b"UNKNOWN_VALUE" in out and b"_error\x00\x0277" in out
    assert not transport.disconnected and seen == []
    assert guard.stats == {"refused_unknown_value": 1}
    assert not any(e.get("log_failure") is not None for e in events)
