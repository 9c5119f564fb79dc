"""The IMAP session state table (RFC 3501 section 3, RFC 9051 section 3).

All transitions are here: which commands are valid in which state, and the
state a command's completion leads to.
"""

from __future__ import annotations

import enum

from . import _commands as c


class State(enum.Enum):
    """Session states."""

    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


_N, _A, _S = State.NOT_AUTHENTICATED, State.AUTHENTICATED, State.SELECTED
_ANY = frozenset({_N, _A, _S})
_AUTH = frozenset({_A, _S})
_SEL = frozenset({_S})

#: Command type -> states in which it is valid (BAD elsewhere).
VALID_IN: dict[type, frozenset[State]] = {
    c.Capability: _ANY,
    c.Noop: _ANY,
    c.Logout: _ANY,
    c.Id: _ANY,
    c.StartTls: frozenset({_N}),
    c.Authenticate: frozenset({_N}),
    c.Login: frozenset({_N}),
    c.Enable: _AUTH,
    c.Namespace: _AUTH,
    c.Select: _AUTH,
    c.Create: _AUTH,
    c.Delete: _AUTH,
    c.Rename: _AUTH,
    c.Subscribe: _AUTH,
    c.Unsubscribe: _AUTH,
    c.List: _AUTH,
    c.Lsub: _AUTH,
    c.Status: _AUTH,
    c.Append: _AUTH,
    c.Idle: _AUTH,
    c.Check: _SEL,
    c.Close: _SEL,
    c.Unselect: _SEL,
    c.Expunge: _SEL,
    c.Search: _SEL,
    c.Fetch: _SEL,
    c.Store: _SEL,
    c.Copy: _SEL,
    c.Move: _SEL,
}


def allowed(state: State, command: c.Command) -> bool:
    """Whether ``command`` is valid in ``state``."""
    return state in VALID_IN.get(type(command), frozenset())


def after(state: State, command: c.Command, status: str) -> State:
    """The state once ``command`` completed with ``status`` (OK, NO or BAD)."""
    if isinstance(command, c.Logout):
        return State.LOGOUT
    ok = status == "OK"
    if isinstance(command, c.Login | c.Authenticate) and ok:
        return State.AUTHENTICATED
    if isinstance(command, c.Select):
        # A failed SELECT leaves no mailbox selected (RFC 3501 6.3.1).
        if ok:
            return State.SELECTED
        if status == "NO" and state is State.SELECTED:
            return State.AUTHENTICATED
    if isinstance(command, c.Close | c.Unselect) and ok:
        return State.AUTHENTICATED
    return state
