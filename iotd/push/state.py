"""The command state machine: every status, every transition, from which status it may start.

Life of a command::

    queued --/push (SEND)--> sent --/result {"response"} (COMPLETE)--> done
                               |--/result {"error"} / not JSON (FAIL)--> failed
                               |--command_timeout passed, attempts left (RESEND)--> sent
                               |--last attempt's command_timeout passed (GIVE_UP)--> failed
    queued --operator DELETE / device deleted (CANCEL)--> cancelled
    queued --its ttl / expiresAt passed before a send (EXPIRE)--> expired

This table is the one place that says so.  The store functions of
:mod:`iotd.push.transactions` change a row only with ``WHERE status IN
(<the transition's sources>)`` and look at the row count, so a transition
that the table refuses -- a result for a command already ``done``, a cancel
of a ``sent`` one, a second hand-out of a ``sent`` one by another process --
changes nothing in the store.

A ``sent`` command is never cancelled (spec: ``DELETE`` answers 409 once it
was sent; the sweep ends a sent command that never gets its result).
"""

from __future__ import annotations

import enum


class Status(str, enum.Enum):
    QUEUED = "queued"
    SENT = "sent"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def finished(self) -> bool:
        return self in FINISHED


UNFINISHED = frozenset({Status.QUEUED, Status.SENT})
FINISHED = frozenset({Status.DONE, Status.FAILED, Status.CANCELLED, Status.EXPIRED})
STATES = tuple(s.value for s in Status)  # in lifecycle order, for metrics and the REST filter


class Transition(enum.Enum):
    SEND = "send"          # /push hands out a queued command
    RESEND = "resend"      # /push again after command_timeout, attempts left
    COMPLETE = "complete"  # /result with a response
    FAIL = "fail"          # /result with an error, or a body that is not a result
    GIVE_UP = "give_up"    # no result after the last attempt's command_timeout
    CANCEL = "cancel"      # operator DELETE, or the device was deleted
    EXPIRE = "expire"      # a queued command's deadline passed (a sent one is never expired)


# transition -> (the statuses it may start from, the status it ends in)
TABLE: dict[Transition, tuple[frozenset[Status], Status]] = {
    Transition.SEND: (frozenset({Status.QUEUED}), Status.SENT),
    Transition.RESEND: (frozenset({Status.SENT}), Status.SENT),
    Transition.COMPLETE: (frozenset({Status.SENT}), Status.DONE),
    Transition.FAIL: (frozenset({Status.SENT}), Status.FAILED),
    Transition.GIVE_UP: (frozenset({Status.SENT}), Status.FAILED),
    Transition.CANCEL: (frozenset({Status.QUEUED}), Status.CANCELLED),
    Transition.EXPIRE: (frozenset({Status.QUEUED}), Status.EXPIRED),
}


class Refused(Exception):
    """A transition the table does not allow from the command's status."""


def allowed(transition: Transition, status: Status | str) -> bool:
    return Status(status) in TABLE[transition][0]


def target(transition: Transition) -> Status:
    return TABLE[transition][1]


def sources(transition: Transition) -> tuple[str, ...]:
    """The statuses ``transition`` may start from, as stored (sorted: stable SQL)."""
    return tuple(sorted(s.value for s in TABLE[transition][0]))


def apply(transition: Transition, status: Status | str) -> Status:
    """The status after ``transition`` from ``status``; raises :class:`Refused` if not allowed."""
    if not allowed(transition, status):
        raise Refused(f"{transition.value} is not allowed from {Status(status).value}")
    return target(transition)
