"""A store whose request reached the node but whose answer was lost (a timeout across
a partition; TCP may deliver the request late) is not stored a second time on another
node: the delivery fails (SMTP 451) instead of listing one acknowledged message twice
(issue 14, found by the chaos run, docs/chaos.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_cluster_sim import Net, add_user, check_mailbox, users_managed_by
from twisted.internet.defer import Deferred
from twisted.protocols import amp
from twisted.python.failure import Failure

from yimaporc.cluster.rpc import PeerMaybeDone, PeerUnavailable
from yimaporc.porcupine.cluster import MbStore


class LostAnswers(Net):
    """Stores to ``lose_to`` run there, but the caller sees a timeout after sending."""

    lose_to: str = ""

    def dispatch(
        self, src: str, address: str, command: type[amp.Command], kw: dict[str, Any]
    ) -> Deferred[Any]:
        d = super().dispatch(src, address, command, kw)
        if address == self.lose_to and command is MbStore:

            def lost(_: Any) -> Failure:
                return Failure(PeerMaybeDone(f"{address}: timed out"))

            d.addBoth(lost)
        return d


@pytest.mark.parametrize("maybe_done", [True, False])
def test_store_timed_out_after_sending_is_not_stored_again_elsewhere(
    tmp_path: Path, maybe_done: bool
) -> None:
    """maybe_done: the delivery fails and the message is listed once (from the node
    that did store it); a failure before sending is still retried on another node."""
    net = LostAnswers(tmp_path)
    for i in (1, 2, 3):
        net.add(f"n{i}")
    net.commit(["n1", "n2", "n3"])
    user = users_managed_by(net, "n3", 1)[0]
    add_user(net, "n1", user)
    first = net.nodes["n2"].deliver(user, b"first\r\n")[0].node
    if maybe_done:
        net.lose_to = first
        with pytest.raises(PeerUnavailable):
            net.nodes["n2"].deliver(user, b"second\r\n")
        assert net.nodes["n2"].mail.delivery.unsure == 1
        assert net.nodes["n2"].mail.delivery.retries == 0
    else:
        net.down.add(first)
        with_retry = net.nodes["n2"].deliver(user, b"second\r\n")
        net.down.discard(first)
        assert with_retry[0].node != first
        assert net.nodes["n2"].mail.delivery.retries >= 1
    net.lose_to = ""
    check_mailbox(net, "n1", user, {b"first\r\n", b"second\r\n"})
    net.result_of(net.nodes["n1"].mail.retrieval.open(user).digests("INBOX"))
