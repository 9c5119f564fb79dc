"""The mail part of a node's admin API (moved out of ``service.py``): users
(list, add, delete, change password) and the outbound queue (list, flush, delete).
Every client mistake is an :class:`~..admin.routes.ApiError` (a 4xx answer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.python.failure import Failure

from ..admin.routes import ApiError, Route
from .usermap import BadAddress, normalise
from .values import NoSuchUser, UserExists

if TYPE_CHECKING:
    from .service import MailService

__all__ = ["MailAdmin"]


class MailAdmin:
    """The ``/api/mail/...`` routes over one node's :class:`~.service.MailService`."""

    def __init__(self, mail: MailService) -> None:
        self.mail = mail

    def routes(self) -> list[Route]:
        """``GET/POST /api/mail/users``, ``POST /api/mail/users/delete`` and ``.../passwd``,
        ``GET /api/mail/queue``, ``POST /api/mail/queue/flush`` and ``.../delete``."""
        return [
            Route("GET", "/api/mail/users", self._list_users),
            Route("POST", "/api/mail/users", self._add_user),
            Route("POST", "/api/mail/users/delete", self._delete_user),
            Route("POST", "/api/mail/users/passwd", self._passwd),
            Route("GET", "/api/mail/queue", self._queue_list),
            Route("POST", "/api/mail/queue/flush", self._queue_flush),
            Route("POST", "/api/mail/queue/delete", self._queue_delete),
        ]

    def _queue_list(self, body: dict[str, Any], query: dict[str, str]) -> dict[str, Any]:
        return {"queue": self.mail.outbound.listing(), **self.mail.outbound.status()}

    def _queue_flush(self, body: dict[str, Any], query: dict[str, str]) -> dict[str, Any]:
        ident = body.get("id")
        if ident is not None and not isinstance(ident, str):
            raise ApiError("id must be a string")
        return {"flushed": self.mail.outbound.flush(ident)}

    def _queue_delete(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        ident = body.get("id")
        if not isinstance(ident, str):
            raise ApiError("id is required")

        def done(found: bool) -> dict[str, Any]:
            if not found:
                raise ApiError(f"no queued message {ident}", 404)
            return {"deleted": ident}

        return self.mail.outbound.delete(ident).addCallback(done)

    def _address(self, body: dict[str, Any]) -> str:
        address = body.get("address")
        if not isinstance(address, str):
            raise ApiError("address is required")
        try:
            address = normalise(address)
        except BadAddress as e:
            raise ApiError(str(e)) from None
        if not self.mail.policy.is_local(address.split("@", 1)[1]):
            domains = ", ".join((self.mail.domain, *self.mail.policy.other_domains))
            raise ApiError(f"address must be in one of this node's domains: {domains}")
        return address

    @staticmethod
    def _password(body: dict[str, Any]) -> str:
        password = body.get("password")
        if not isinstance(password, str) or not password:
            raise ApiError("password must be a non-empty string")
        if len(password) > 1024:
            raise ApiError("password too long")
        return password

    def _list_users(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        return self.mail.profiles.users().addCallback(
            lambda users: {"users": [p.public() for p in users]}
        )

    def _add_user(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        address, password = self._address(body), self._password(body)
        replicas = body.get("replicas", 1)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= 16:
            raise ApiError("replicas must be an integer from 1 to 16")

        def exists(f: Failure) -> None:
            f.trap(UserExists)
            raise ApiError(str(f.value), 409)

        d = self.mail.replicator.add(address, password, replicas)
        return d.addCallbacks(lambda p: {"created": address, "replicas": p.replicas}, exists)

    def _delete_user(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        address = self._address(body)
        self.mail.user_manager.forget(address)
        d = self.mail.replicator.remove(address)

        def drop_mail(_: object) -> Deferred[Any]:
            self.mail.user_manager.forget(address)
            frags = self.mail.topology.holders_of(address)  # a cluster: every live node
            manager = self.mail.users_for(address)
            ds = [self.mail.mailboxes_for(n).remove_user(address) for n in frags]
            ds += [manager.remove_fragment(address, n) for n in frags]
            return gatherResults(ds, consumeErrors=True)

        return d.addCallback(drop_mail).addCallbacks(lambda _: {"deleted": address}, _no_user)

    def _passwd(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        address, password = self._address(body), self._password(body)
        self.mail.user_manager.forget(address)
        d = self.mail.replicator.set_password(address, password)
        return d.addCallbacks(lambda _: {"updated": address}, _no_user)


def _no_user(f: Failure) -> None:
    f.trap(NoSuchUser)
    raise ApiError(str(f.value), 404)
