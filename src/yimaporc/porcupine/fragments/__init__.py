"""Mailbox fragments on this node's disk: bodies as files, indexes in SQLite.

Layout (seed §3.3: hard state grouped by user-map bucket)::

    DATA_DIR/mail/tmp/<key>                    bodies being written
    DATA_DIR/mail/buckets/NNN/index.sqlite     mailboxes + messages of the bucket's users
    DATA_DIR/mail/buckets/NNN/<user>/<key>     one file per message body

Stores are group commits (:meth:`FragmentStore.commit_group`), one journal
fdatasync per group of any size, users and buckets:

1. the bodies of the group are written to ``tmp`` and renamed into their users'
   directories (no fsync each);
2. the buckets' locks are taken and each bucket's rows committed in one
   transaction (WAL, ``synchronous=NORMAL``: no fsync), which also sets the
   bucket's ``journal_mark`` to the group's sequence number;
3. one record of the group (:mod:`.._journal`: the rows as committed and the
   bodies) is appended to ``mail/journal/`` and **fdatasynced**;
4. the locks are released and the callers told (SMTP 250).

Why that is as durable as an fsync per file: after step 3 everything the
callers were promised can be rebuilt from the journal alone.  At start,
:meth:`FragmentStore.recover` redoes, for a bucket whose mark is below a
record's sequence number, that record's rows with their recorded UIDs (WAL
frames survive as a prefix, so a mark at or above it means the group's own
commit survived, and anything committed durably later, an expunge say, is
not undone), then rewrites every body a row names that is missing or not
byte-identical.  A crash during step 3 leaves a torn record that fails its CRC
and ends the journal: none of that group had its 250.  A crash between steps 2
and 3 can leave the rows of unacknowledged messages (a sender's retry may then
be a duplicate, as with any MTA dying between its fsync and its reply); no
reader saw them before (the locks).  A *checkpoint*
(:meth:`FragmentStore.checkpoint`, off the callers' path, every few seconds)
makes the covered files durable in place (:mod:`.._durable`: one syncfs, or an
fsync each) and only then drops the journal file.  Bodies no row names are
removed at start (only files named ``*.m``, the ones this module writes).

``journal=False`` keeps the journal-less way (:class:`~.._durable.Barrier`):
bodies and directories made durable before the rows are committed, the
commits made durable before the locks are released.

:class:`FragmentStore` blocks; :class:`MailboxManager` runs it on a thread pool
and forms the groups: a store arriving with no group in flight is committed at
once (no fixed wait), stores arriving meanwhile form the next group.
"""

from ._buckets import BODY_SUFFIX, mailbox_name, write_file
from ._manager import MailboxManager
from ._store import FragmentStore

__all__ = ["BODY_SUFFIX", "FragmentStore", "MailboxManager", "mailbox_name", "write_file"]
