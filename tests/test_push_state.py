"""The command state machine: the transition table, and the store refusing what the table refuses.

The table (iotd.push.state) says which transition may start from which
status; the store transactions (iotd.push.transactions) change a row only
from those statuses, so a late or repeated request -- a result for a command
already done, a cancel of a sent one, a sweep of an attempt that was
answered -- changes nothing a user can see.
"""

from __future__ import annotations

import itertools
import json

import pytest

from iotd.push import transactions as tx
from iotd.push.results import parse_result
from iotd.push.state import FINISHED, TABLE, UNFINISHED, Refused, Status, Transition, allowed, apply, sources
from iotd.store import open_sync

T = Transition
ALLOWED = {
    (T.SEND, Status.QUEUED): Status.SENT,
    (T.RESEND, Status.SENT): Status.SENT,
    (T.COMPLETE, Status.SENT): Status.DONE,
    (T.FAIL, Status.SENT): Status.FAILED,
    (T.GIVE_UP, Status.SENT): Status.FAILED,
    (T.CANCEL, Status.QUEUED): Status.CANCELLED,
    (T.EXPIRE, Status.QUEUED): Status.EXPIRED,
}


@pytest.mark.parametrize("transition, status", list(itertools.product(Transition, Status)))
def test_every_transition_is_allowed_only_from_its_sources(transition, status):
    expected = ALLOWED.get((transition, status))
    assert allowed(transition, status) is (expected is not None)
    if expected is None:
        with pytest.raises(Refused):
            apply(transition, status)
    else:
        assert apply(transition, status) == expected
        assert status.value in sources(transition)


def test_finished_statuses_are_final_and_unfinished_ones_lead_somewhere():
    for status in FINISHED:
        assert status.finished
        assert not any(allowed(t, status) for t in Transition)  # nothing leaves done/failed/cancelled
    for status in UNFINISHED:
        assert not status.finished
        assert any(allowed(t, status) and apply(t, status).finished for t in Transition)
    assert set(TABLE) == set(Transition)
    assert not allowed(T.CANCEL, Status.SENT)  # spec: 409 once sent; the sweep ends it


# -- the same rules, enforced by the store transactions -----------------------------------


@pytest.fixture
def conn(tmp_path):
    c = open_sync(str(tmp_path / "state.sqlite3"))
    yield c
    c.close()


NOW = 1_700_000_000.0
TIMEOUT, ATTEMPTS = 60.0, 2


def run(conn, fn, *args):
    """Run one transaction; returns (result, event items) as the event log would get them."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        out = fn(conn, *args)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return out


def row(conn, command_id):
    return conn.execute("SELECT status, attempts, sent_us, finished_us, response_raw, error FROM commands "
                        "WHERE id = ?", (command_id,)).fetchone()


def queue(conn, endpoint="load_objects"):
    cmd, items = run(conn, tx.create, "t", "D1", {"endpoint": endpoint}, int(NOW * 1e6))
    assert items == []
    return cmd


def hand_out(conn, now=NOW):
    return run(conn, tx.hand_out, "t", "D1", now, TIMEOUT, ATTEMPTS)


def result(conn, body, now=NOW + 1):
    return run(conn, tx.complete, "t", "D1", parse_result(json.dumps(body).encode()), int(now * 1e6))


def test_a_result_for_a_command_already_done_changes_nothing(conn):
    cmd = queue(conn)
    hand_out(conn)
    finished, items = result(conn, {"response": '{"ok": 1}'})
    assert finished.command.id == cmd.id and finished.command.status == "done"
    assert [i[3]["reqType"] for i in items] == ["resp"]
    before = row(conn, cmd.id)
    again, items = result(conn, {"error": "late duplicate"}, now=NOW + 5)
    assert again.command is None and items == []  # an orphan: no event, nothing stored
    assert row(conn, cmd.id) == before == ("done", 1, int(NOW * 1e6), int((NOW + 1) * 1e6), '{"ok": 1}', None)


def test_a_result_for_a_queued_command_is_an_orphan(conn):
    cmd = queue(conn)
    finished, items = result(conn, {"response": "{}"})
    assert finished.command is None and finished.remaining and items == []
    assert row(conn, cmd.id)[0] == "queued"


def test_hand_out_sends_once_then_resends_after_the_timeout_then_gives_up(conn):
    cmd = queue(conn)
    first, items = hand_out(conn)
    assert (first.command.id, first.command.attempts) == (cmd.id, 1)
    assert [i[3]["reqType"] for i in items] == ["req"]
    busy, items = hand_out(conn, NOW + TIMEOUT - 1)  # in flight: no second send
    assert busy.command is None and busy.busy and items == []
    assert row(conn, cmd.id)[:2] == ("sent", 1)
    again, _ = hand_out(conn, NOW + TIMEOUT)
    assert (again.command.id, again.command.attempts) == (cmd.id, 2)
    done, items = hand_out(conn, NOW + 2 * TIMEOUT)  # the last attempt timed out
    assert done.command is None and not done.busy and [c.id for c in done.gave_up] == [cmd.id]
    assert [(i[3]["reqType"], i[3]["code"], i[3]["msg"]) for i in items] == [
        ("resp", 500, f"no result after {ATTEMPTS} attempts")]
    assert row(conn, cmd.id)[0] == "failed"


def test_a_sweep_of_an_attempt_that_was_answered_or_resent_changes_nothing(conn):
    cmd = queue(conn)
    sent, _ = hand_out(conn)
    stale_attempts, stale_sent = sent.command.attempts, sent.command.sent_us
    hand_out(conn, NOW + TIMEOUT)  # resent: attempt 2
    ended, items = run(conn, tx.give_up, cmd.id, stale_attempts, stale_sent, int((NOW + 61) * 1e6))
    assert ended.command is None and ended.status == "sent" and items == []
    assert row(conn, cmd.id)[:2] == ("sent", 2)
    result(conn, {"response": "{}"}, now=NOW + TIMEOUT + 2)
    current = row(conn, cmd.id)
    ended, items = run(conn, tx.give_up, cmd.id, 2, current[2], int((NOW + 500) * 1e6))
    assert ended.command is None and ended.status == "done" and items == []
    assert row(conn, cmd.id) == current


def test_cancel_only_from_queued(conn):
    a, b = queue(conn, "a"), queue(conn, "b")
    hand_out(conn)  # a is sent
    refused, _ = run(conn, tx.cancel, a.id, int(NOW * 1e6), "cancelled by operator")
    assert refused.command is None and refused.status == "sent"
    assert row(conn, a.id)[0] == "sent"
    cancelled, items = run(conn, tx.cancel, b.id, int(NOW * 1e6), "cancelled by operator")
    assert cancelled.command.status == "cancelled" and items == []
    twice, _ = run(conn, tx.cancel, b.id, int(NOW * 1e6) + 5, "cancelled by operator")
    assert twice.command is None and twice.status == "cancelled"
    assert row(conn, b.id)[3] == int(NOW * 1e6)  # the first cancel's time stays
    missing, _ = run(conn, tx.cancel, 999, int(NOW * 1e6), "x")
    assert missing.command is None and missing.status is None


def test_a_transaction_that_looked_before_work_was_added_does_not_remove_it():
    from iotd.push.work import Work

    work = Work()
    key = ("t", "D")
    work.add(key)
    began = work.stamp  # a poll's transaction begins
    work.add(key)  # another node queued meanwhile (the bus told us)
    work.settled(key, False, began)  # the transaction found nothing: it looked too early
    assert key in work
    work.settled(key, False, work.stamp)  # a transaction that began after the add
    assert key not in work
