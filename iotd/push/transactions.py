"""The store is the authority for commands: each change is one short transaction that checks it.

Each function here is ``fn(conn, ...) -> (result, event items)``, run by
:meth:`iotd.events.EventLog.transact` inside one store write (the store's
group commit, its own savepoint); the items are the ``action`` events of the
change, inserted in the same transaction and published after the commit.
They run in the store's writer thread: no metrics, no logging, no reactor
state -- the service does those once the transaction committed.

Every one follows the same recipe, so two processes on one database can
never hand out two commands for one device, and a result posted to either
completes the command the other handed out:

1. lock the device's row (:func:`iotd.store.commands.lock_device`: ``FOR
   UPDATE`` on PostgreSQL; SQLite's single writer already serialises);
2. read the device's oldest unfinished command;
3. decide with the transition table (:mod:`iotd.push.state`), then
   ``UPDATE ... WHERE id = ? AND status IN (<sources>) AND attempts = ?``;
   a row count of 0 means another process changed it first: read again.

A device runs one command at a time: ``/push`` hands out the oldest
unfinished command of the device; if that one is already ``sent`` it goes out
again only once ``command_timeout`` has passed since the last send, and once
the last attempt's ``command_timeout`` has passed it fails (``no result after
N attempts``) and the next one goes out in the same transaction.  Likewise a
queued command whose deadline (``expires_us``) has passed is expired on the
way, so no poll gets it even before the sweep (:func:`expire`) came by.

A bulk request (:func:`create_batch`) queues every command of the batch in
one transaction: all or none.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from iotd.push.command import Command, dumps
from iotd.push.state import Status, Transition, sources, target
from iotd.store import commands as cmdsql

EPSILON = 1e-6  # seconds: a deadline this close to now is due (float rounding on the clock)
PASSES = 8  # reads of the oldest command per hand-out (each pass ends one command or lost a race)

Items = list[tuple[str, str, str, dict[str, Any]]]


class HandOut(NamedTuple):
    command: Command | None  # what /push answers with (sent, attempts counted); None: empty
    busy: bool  # the oldest command is in flight (sent, within its command_timeout)
    gave_up: list[Command]  # commands ended on the way (last attempt timed out: failed; deadline passed: expired)

    @property
    def remaining(self) -> bool:
        return self.command is not None or self.busy


class Finished(NamedTuple):
    command: Command | None  # the finished command; None: nothing changed
    remaining: bool  # the device still has unfinished commands
    status: str | None = None  # when nothing changed: the command's status now (None: no such command)


def _finish(conn: Any, cmd: Command, transition: Transition, now_us: int, response_raw: str | None = None,
            response: Any = None, parsed: bool = False, error: str | None = None,
            check_attempt: bool = False, result_raw: str | None = None, result_encoding: str | None = None,
            error_detail: Any = None, result_uuid: str | None = None) -> bool:
    """``cmd`` ends by ``transition``; on success ``cmd`` is updated to what is stored."""
    status = target(transition).value
    changed = cmdsql.finish(conn, cmd.id, sources(transition), status, now_us, response_raw,
                            response_raw if parsed else None, error,
                            attempts=cmd.attempts if check_attempt else None,
                            sent_us=cmd.sent_us if check_attempt else None, result_raw=result_raw,
                            result_encoding=result_encoding,
                            error_detail=dumps(error_detail) if error_detail is not None else None,
                            result_uuid=result_uuid)
    if changed:
        cmd.status, cmd.finished_us, cmd.error = status, now_us, error
        cmd.response_raw, cmd.response, cmd.parsed = response_raw, response, parsed
        cmd.result_raw, cmd.result_encoding, cmd.error_detail = result_raw, result_encoding, error_detail
        cmd.result_uuid = result_uuid
    return changed


def _expired(cmd: Command, now_us: int) -> bool:
    return cmd.status == Status.QUEUED and cmd.expires_us is not None and cmd.expires_us <= now_us


def _expire(conn: Any, cmd: Command, now_us: int) -> bool:
    return _finish(conn, cmd, Transition.EXPIRE, now_us, error="expired")


def _give_up(conn: Any, cmd: Command, now_us: int) -> bool:
    return _finish(conn, cmd, Transition.GIVE_UP, now_us, error=f"no result after {cmd.attempts} attempts",
                   check_attempt=True)


def hand_out(conn: Any, tenant: str, device: str, now: float, timeout: float,
             max_attempts: int, uuid: str | None = None) -> tuple[HandOut, Items]:
    """``GET /push`` of a device that has unfinished work: the command it gets, if any.

    A queued command whose deadline has passed is expired on the way (never
    handed out, even if the sweep has not come by yet).
    """
    items: Items = []
    gave_up: list[Command] = []
    now_us = int(round(now * 1_000_000))
    cmdsql.lock_device(conn, tenant, device)
    for _ in range(PASSES):
        row = cmdsql.oldest_unfinished(conn, tenant, device)
        if row is None:
            return HandOut(None, False, gave_up), items
        cmd = Command.from_row(row)
        if _expired(cmd, now_us):
            if _expire(conn, cmd, now_us):
                gave_up.append(cmd)
                items.append(cmd.finish_event())
            continue
        if cmd.status == Status.QUEUED:
            transition = Transition.SEND
        elif now + EPSILON < cmd.sent_at + timeout:
            return HandOut(None, True, gave_up), items  # in flight: the device answers (or times out) first
        elif cmd.attempts < max_attempts:
            transition = Transition.RESEND
        else:
            if _give_up(conn, cmd, now_us):
                gave_up.append(cmd)
                items.append(cmd.finish_event())
            continue
        if cmdsql.mark_sent(conn, cmd.id, sources(transition), cmd.attempts, now_us, uuid):
            cmd.status, cmd.attempts, cmd.sent_us = Status.SENT.value, cmd.attempts + 1, now_us
            cmd.sent_uuid = uuid
            items.append(cmd.send_event())
            return HandOut(cmd, False, gave_up), items
    return HandOut(None, True, gave_up), items  # still changing under us: the next poll tries again


def complete(conn: Any, tenant: str, device: str, outcome: dict[str, Any], now_us: int,
             uuid: str | None = None, command_id: int | None = None) -> tuple[Finished, Items]:
    """``POST /result``: finish the device's sent command with ``outcome`` (see ``parse_result``).

    ``command_id`` (an MQTT result names its command): only that command, if it is the one in flight."""
    cmdsql.lock_device(conn, tenant, device)
    transition = Transition.COMPLETE if outcome["status"] == Status.DONE else Transition.FAIL
    fields = {k: v for k, v in outcome.items() if k != "status"}
    fields["result_uuid"] = uuid
    for _ in range(PASSES):
        rows = cmdsql.two_oldest_unfinished(conn, tenant, device)
        if not rows or rows[0][3] != Status.SENT or (command_id is not None and rows[0][0] != command_id):
            return Finished(None, bool(rows)), []  # an orphan: no command (or not that one) waits for a result
        cmd = Command.from_row(rows[0])
        if _finish(conn, cmd, transition, now_us, **fields):
            # the device lock (or SQLite's single writer) keeps the second row where it was
            return Finished(cmd, len(rows) > 1), [cmd.finish_event()]
    return Finished(None, True), []


def give_up(conn: Any, command_id: int, attempts: int, sent_us: int, now_us: int) -> tuple[Finished, Items]:
    """The sweep: fail a command whose last attempt timed out -- if it is still that attempt."""
    row = cmdsql.get(conn, command_id)
    if row is None:
        return Finished(None, False), []
    cmd = Command.from_row(row)
    cmdsql.lock_device(conn, cmd.tenant, cmd.device)
    if cmd.status != Status.SENT or cmd.attempts != attempts or cmd.sent_us != sent_us:
        return Finished(None, True, cmd.status), []  # a result or a resend came first
    if not _give_up(conn, cmd, now_us):
        return Finished(None, True, cmd.status), []
    return Finished(cmd, cmdsql.has_unfinished(conn, cmd.tenant, cmd.device)), [cmd.finish_event()]


def expire(conn: Any, command_id: int, now_us: int) -> tuple[Finished, Items]:
    """The sweep: expire a queued command whose deadline passed -- if it is still queued."""
    row = cmdsql.get(conn, command_id)
    if row is None:
        return Finished(None, False), []
    cmd = Command.from_row(row)
    cmdsql.lock_device(conn, cmd.tenant, cmd.device)
    if not _expired(cmd, now_us) or not _expire(conn, cmd, now_us):
        return Finished(None, True, cmd.status), []  # sent (or finished) first
    return Finished(cmd, cmdsql.has_unfinished(conn, cmd.tenant, cmd.device)), [cmd.finish_event()]


def cancel(conn: Any, command_id: int, now_us: int, error: str) -> tuple[Finished, Items]:
    """Cancel one queued command (operator).  No event: the operator asked for it."""
    row = cmdsql.get(conn, command_id)
    if row is None:
        return Finished(None, False), []
    cmd = Command.from_row(row)
    cmdsql.lock_device(conn, cmd.tenant, cmd.device)
    if not _finish(conn, cmd, Transition.CANCEL, now_us, error=error):
        return Finished(None, True, Command.from_row(cmdsql.get(conn, command_id)).status), []
    return Finished(cmd, cmdsql.has_unfinished(conn, cmd.tenant, cmd.device)), []


def cancel_device(conn: Any, tenant: str, device: str, now_us: int, error: str) -> tuple[tuple[list[int], bool], Items]:
    """Cancel every queued command of a device (it was deleted); sent ones are left to the sweep."""
    cmdsql.lock_device(conn, tenant, device)
    ids = cmdsql.cancel_queued_of_device(conn, tenant, device, now_us, error)
    return (ids, cmdsql.has_unfinished(conn, tenant, device)), []


def _queue(conn: Any, tenant: str, device: str, spec: dict[str, Any], now_us: int,
           batch: int | None = None) -> Command:
    has_body = spec.get("body") is not None
    expires_us = spec.get("expires_us")
    cid = cmdsql.insert(conn, tenant, device, spec.get("verb"), spec["endpoint"], spec.get("body"), has_body,
                        spec.get("contentType"), spec.get("queryString"), now_us, expires_us, batch)
    return Command(id=cid, tenant=tenant, device=device, status=Status.QUEUED.value, endpoint=spec["endpoint"],
                   verb=spec.get("verb"), body=spec.get("body"), has_body=has_body,
                   content_type=spec.get("contentType"), query_string=spec.get("queryString"),
                   created_us=now_us, expires_us=expires_us, batch=batch)


def create(conn: Any, tenant: str, device: str, spec: dict[str, Any], now_us: int) -> tuple[Command, Items]:
    """Queue a command (``spec`` already checked; ``expires_us`` its deadline or None)."""
    return _queue(conn, tenant, device, spec, now_us), []


def create_batch(conn: Any, tenant: str, devices: list[str], spec: dict[str, Any],
                 now_us: int) -> tuple[list[Command], Items]:
    """Queue one command per device, all or none (bulk); the batch's id is its first command's id."""
    first = _queue(conn, tenant, devices[0], spec, now_us)
    batch = first.id
    cmdsql.set_batch(conn, batch, batch)
    first.batch = batch
    cmdsql.insert_batch(conn, batch, tenant, now_us, len(devices))
    return [first] + [_queue(conn, tenant, d, spec, now_us, batch) for d in devices[1:]], []

