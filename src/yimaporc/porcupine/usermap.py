"""The user map as the mail code sees it: users hash to a fixed number of buckets.

Hard state on disk is grouped by bucket (``DATA_DIR/mail/buckets/NNN/``, seed
§3.3) so soft-state reconstruction reads one directory per fresh bucket.  The
hash is :func:`yimaporc.porcupine.softstate.bucket_of`, the one the cluster's
reconstruction uses, over :data:`N_BUCKETS` buckets.

Which node manages a bucket is the cluster's
:class:`~yimaporc.cluster.bucketservice.BucketMapService` (``MailCluster.users_for``);
in a cluster of one, this node.
"""

from __future__ import annotations

import re

from ..cluster.buckets import DEFAULT_BUCKETS
from .softstate import bucket_of as _bucket_of

N_BUCKETS = DEFAULT_BUCKETS

_ADDRESS = re.compile(r"^[a-z0-9!#$%&'*+=?^_`{|}~.-]{1,64}@[a-z0-9-]+(\.[a-z0-9-]+)*$")


class BadAddress(ValueError):
    """A string that is not an address this service stores mail for."""


def normalise(address: str) -> str:
    """Lower-case ``address`` and check it is safe as a directory name."""
    a = address.strip().lower()
    local = a.partition("@")[0]
    if len(a) > 254 or not _ADDRESS.match(a) or local.startswith(".") or ".." in local:
        raise BadAddress(f"not a valid mail address: {address!r}")
    return a


def bucket_of(user: str) -> int:
    """The user-map bucket of ``user`` (stable across nodes, runs and case)."""
    return _bucket_of(user.lower(), N_BUCKETS)


def bucket_dir(bucket: int) -> str:
    """``7 -> "007"``: the directory name of a bucket."""
    if not 0 <= bucket < N_BUCKETS:
        raise ValueError(f"bucket {bucket} out of range")
    return f"{bucket:03d}"
