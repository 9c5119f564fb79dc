"""The retrieval strategies (issue 18): the layout and the copy policy a login's UserMail is
built with (the composition root's choice is pinned in test_porcupine_node_compose.py), and
the interfaces that replaced the capability probes (the balancer's load, the bucket map's
away)."""

from __future__ import annotations

from zope.interface.verify import verifyClass, verifyObject

from yimaporc.cluster.bucketservice import BucketMapService
from yimaporc.cluster.interfaces import IBucketMap
from yimaporc.porcupine.balancer import LoadBalancer
from yimaporc.porcupine.interfaces import ILoadBalancer
from yimaporc.porcupine.retrieval import (
    Fragmented,
    HomeOnly,
    ICopyPolicy,
    IMailLayout,
    ReplicatedCopies,
    RetrievalProxy,
    SingleCopies,
)


def test_strategies_and_former_probes_provide_their_interfaces() -> None:
    """Both layouts, both copy policies, the load balancer and the bucket map keep the
    interfaces their users are typed with."""
    assert verifyObject(IMailLayout, HomeOnly("n1"))
    assert verifyObject(IMailLayout, Fragmented(lambda a: "n1"))
    assert verifyObject(ICopyPolicy, SingleCopies())
    assert verifyObject(ICopyPolicy, ReplicatedCopies(lambda n: 0.0))
    assert verifyObject(ILoadBalancer, LoadBalancer("n1"))
    assert verifyClass(IBucketMap, BucketMapService)


def test_a_node_alone_opens_home_only_single_copy_mail() -> None:
    """Without strategies given, a login's mail is all on this node: home here, no
    fragment-list clock, no UIDNEXT record, one copy per message."""
    proxy = RetrievalProxy("n1", lambda a: None, lambda n: None)  # type: ignore[arg-type,return-value]
    mail = proxy.open("ann@example.org")
    assert isinstance(mail.layout, HomeOnly) and isinstance(mail.copy_policy, SingleCopies)
    assert (mail.home, mail.now, mail.local, mail.shown) == ("n1", None, None, None)
