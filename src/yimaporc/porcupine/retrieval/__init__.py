"""The retrieval proxy (seed §2.3.2): one user's mail, over all their fragments.

:class:`RetrievalProxy` authenticates through the user's manager, learns the
fragment list, and hands out a :class:`UserMail`, which asks the mailbox
manager of each fragment node for digests, merges them, and routes fetches,
flag changes and deletions to the node holding each message.  When a node's
last message of the user goes, the node leaves the fragment list.

A ``UserMail`` is built with two strategies (:mod:`.interfaces`), chosen once by
the composition root: the layout (:class:`HomeOnly`: a node alone, the mailbox
tree and every message here; :class:`Fragmented`: a cluster, the tree on a home
node the cluster chooses, fragments merged, UIDs from the user manager) and the
copy policy (:class:`SingleCopies`, or :class:`ReplicatedCopies`: read from the
least-loaded holder, changed on one holder); see docs/mail.md.

Modules: ``_usermail`` (the per-user state and what every layout shares),
``_home`` and ``_fragmented`` (the layouts), ``_listing`` (the cluster's merged
listing), ``_copies`` (the copy policies), ``_merge`` (pure merge helpers),
``_proxy`` (the login front door).
"""

from ._copies import ReplicatedCopies, SingleCopies
from ._fragmented import Fragmented
from ._home import HomeOnly
from ._merge import merge_trees
from ._proxy import RetrievalProxy
from ._usermail import Retry, UserMail
from .interfaces import ICopyPolicy, IMailLayout

__all__ = [
    "Fragmented",
    "HomeOnly",
    "ICopyPolicy",
    "IMailLayout",
    "ReplicatedCopies",
    "RetrievalProxy",
    "Retry",
    "SingleCopies",
    "UserMail",
    "merge_trees",
]
