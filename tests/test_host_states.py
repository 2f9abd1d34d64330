"""The sandbox state machine (``host/states.py``), directly: no process, no timer, no I/O.

Every allowed transition is applied and checked; every move not in the table
is refused with :class:`IllegalTransition` and leaves the record as it was.
The races fixed one by one (DELETE vs suspend, DELETE vs snapshot, DELETE vs
start, a stop mid-snapshot, resize vs DELETE, a daemon that dies) are played
as the sequences of events they are, in both orders where both can happen.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sandboxd.host import states
from sandboxd.host.model import ApiError, CreateSpec, Record
from sandboxd.host.states import Event, IllegalTransition, Status
from sandboxd.host.store.records import Store

S, E = Status, Event


def _rec(status: str = S.RUNNING, before: str | None = None) -> Record:
    rec = Record.new("default", CreateSpec(), now=1.0)
    rec.status, rec.status_before = status, before
    return rec


ROWS = sorted(states.TRANSITIONS.items())


@pytest.mark.parametrize(("move", "to"), ROWS, ids=[f"{a}-{b}" for (a, b), _ in ROWS])
def test_every_allowed_transition_lands_where_the_table_says(
    move: tuple[Status, Event], to: str
) -> None:
    start, event = move
    rec = _rec(start, before=S.SUSPENDED if start == S.SNAPSHOTTING else None)
    states.apply(rec, event, now=42.0, reason="why", error="what")
    want = S.SUSPENDED if to == states.PRIOR else to
    assert rec.status == want
    if want in states.ENDED:
        assert (rec.terminated_at, rec.termination_reason, rec.error) == (42.0, "why", "what")
    else:
        assert rec.terminated_at is None and rec.termination_reason is None
    if event == E.SNAPSHOT:
        assert rec.status_before == start
    if start == S.SNAPSHOTTING and event != E.UPDATE:
        assert rec.status_before is None
    if event == E.RESUME:
        assert rec.lifetime_from == 42.0


def test_every_move_not_in_the_table_is_refused_and_changes_nothing() -> None:
    refused = 0
    for status in Status:
        for event in Event:
            if (status, event) in states.TRANSITIONS:
                continue
            rec = _rec(status)
            before = dataclasses.replace(rec)
            with pytest.raises(IllegalTransition) as e:
                states.apply(rec, event, now=1.0)
            assert rec == before
            assert e.value.status == 409 and e.value.code
            assert rec.id in e.value.message
            refused += 1
    # Not a table that allows everything: most moves are refused.
    assert refused > len(states.TRANSITIONS)


def test_ended_is_final_and_live_is_what_holds_a_name() -> None:
    for ended in states.ENDED:
        assert not [e for e in Event if states.allowed(ended, e)]
        assert states.is_noop(ended, E.TERMINATE)
    assert set(Status) == states.LIVE | states.ENDED
    for live in states.LIVE:
        assert states.allowed(live, E.TERMINATE) and states.allowed(live, E.UPDATE)


@pytest.mark.parametrize(
    ("status", "event", "code"),
    [
        (S.SUSPENDING, E.SUSPEND, "NOT_RUNNING"),
        (S.PENDING, E.SUSPEND, "NOT_RUNNING"),
        (S.RUNNING, E.FROZEN, "ILLEGAL_TRANSITION"),
        (S.PENDING, E.RESUME, "NOT_SUSPENDED"),
        (S.SNAPSHOTTING, E.RESUME, "NOT_SUSPENDED"),
        (S.SNAPSHOTTING, E.SNAPSHOT, "SNAPSHOT_IN_PROGRESS"),
        (S.SUSPENDING, E.SNAPSHOT, "NOT_RUNNING"),
        (S.PENDING, E.SNAPSHOT, "NOT_RUNNING"),
        (S.SUSPENDED, E.RESIZE, "NOT_RUNNING"),
        (S.SNAPSHOTTING, E.RESIZE, "NOT_RUNNING"),
        (S.TERMINATED, E.UPDATE, "SANDBOX_TERMINATED"),
        (S.FAILED, E.UPDATE, "SANDBOX_TERMINATED"),
        (S.TERMINATED, E.STARTED, "ILLEGAL_TRANSITION"),
        (S.FAILED, E.DAEMON_DIED, "ILLEGAL_TRANSITION"),
    ],
)
def test_refusals_answer_the_code_the_api_has_always_given(
    status: Status, event: Event, code: str
) -> None:
    assert states.code_for(status, event) == code
    with pytest.raises(IllegalTransition) as e:
        states.apply(_rec(status), event)
    assert e.value.code == code


def test_noops_are_the_idempotent_requests() -> None:
    assert states.is_noop(S.SUSPENDED, E.SUSPEND) and states.is_noop(S.RUNNING, E.RESUME)
    assert not states.is_noop(S.RUNNING, E.SUSPEND) and not states.is_noop("timeout", E.SUSPEND)
    for status, event in states.NOOPS:
        assert (status, event) not in states.TRANSITIONS


def test_an_unknown_stored_status_moves_nowhere() -> None:
    rec = _rec("timeout")
    for event in Event:
        with pytest.raises(IllegalTransition):
            states.apply(rec, event)


# -- the races, as sequences of events ---------------------------------------------


def _play(rec: Record, *events: Event) -> list[bool]:
    """Apply each event in turn; whether each was allowed (refused ones change nothing)."""
    out = []
    for event in events:
        try:
            states.apply(rec, event, now=5.0)
            out.append(True)
        except IllegalTransition:
            out.append(False)
    return out


def test_delete_during_a_suspend_wins_and_the_freeze_does_not_write_over_it() -> None:
    rec = _rec(S.RUNNING)
    assert _play(rec, E.SUSPEND, E.TERMINATE, E.FROZEN) == [True, True, False]
    assert rec.status == S.TERMINATED
    rec = _rec(S.RUNNING)
    assert _play(rec, E.SUSPEND, E.TERMINATE, E.FREEZE_FAILED) == [True, True, False]
    assert rec.status == S.TERMINATED
    # The suspend came first and finished: the DELETE still ends it.
    rec = _rec(S.RUNNING)
    assert _play(rec, E.SUSPEND, E.FROZEN, E.TERMINATE) == [True, True, True]
    assert rec.status == S.TERMINATED
    # A DELETE first: the suspend is refused before it freezes anything.
    rec = _rec(S.RUNNING)
    assert _play(rec, E.TERMINATE, E.SUSPEND) == [True, False]


def test_a_second_suspend_or_a_snapshot_during_a_suspend_is_refused() -> None:
    rec = _rec(S.RUNNING)
    assert _play(rec, E.SUSPEND, E.SUSPEND, E.SNAPSHOT, E.RESUME) == [True, False, False, False]
    assert rec.status == S.SUSPENDING


def test_delete_during_a_snapshot_wins_over_its_end() -> None:
    for start in (S.RUNNING, S.SUSPENDED):
        rec = _rec(start)
        assert _play(rec, E.SNAPSHOT, E.TERMINATE, E.SNAPSHOT_DONE) == [True, True, False]
        assert rec.status == S.TERMINATED


def test_a_snapshot_ends_in_the_status_it_began_from() -> None:
    for start in (S.RUNNING, S.SUSPENDED):
        rec = _rec(start)
        assert _play(rec, E.SNAPSHOT, E.SNAPSHOT_DONE) == [True, True]
        assert rec.status == start and rec.status_before is None


def test_a_host_stopped_mid_snapshot_puts_the_stored_prior_status_back() -> None:
    # What a restart reads: snapshotting, with what it was before (or nothing: an old record).
    assert _play(rec := _rec(S.SNAPSHOTTING, before=S.SUSPENDED), E.SNAPSHOT_DONE) == [True]
    assert rec.status == S.SUSPENDED
    assert _play(rec := _rec(S.SNAPSHOTTING, before=None), E.SNAPSHOT_DONE) == [True]
    assert rec.status == S.RUNNING


def test_delete_during_a_start_refuses_the_started_and_the_start_failure() -> None:
    rec = _rec(S.PENDING)
    assert _play(rec, E.TERMINATE, E.STARTED, E.START_FAILED) == [True, False, False]
    assert (rec.status, rec.termination_reason) == (S.TERMINATED, "user_terminated")


def test_resize_is_admitted_only_while_running_and_not_after_a_delete() -> None:
    rec = _rec(S.RUNNING)
    assert _play(rec, E.RESIZE, E.TERMINATE, E.RESIZE) == [True, True, False]
    assert states.code_for(rec.status, E.RESIZE) == "NOT_RUNNING"


def test_a_daemon_that_dies_ends_the_sandbox_failed_once() -> None:
    for start in (S.RUNNING, S.SUSPENDING, S.SUSPENDED, S.SNAPSHOTTING):
        rec = _rec(start)
        assert _play(rec, E.DAEMON_DIED, E.DAEMON_DIED, E.TERMINATE) == [True, False, False]
        assert (rec.status, rec.termination_reason) == (S.FAILED, "daemon_died")
    # While its start is in flight (a claimed spare): the start's end is refused.
    rec = _rec(S.PENDING)
    assert _play(rec, E.DAEMON_DIED, E.STARTED, E.START_FAILED) == [True, False, False]
    assert rec.status == S.FAILED
    # A DELETE first: its teardown ending the launcher is not a death.
    rec = _rec(S.RUNNING)
    assert _play(rec, E.TERMINATE, E.DAEMON_DIED) == [True, False]
    assert rec.status == S.TERMINATED


def test_suspend_to_disk_ends_suspended_or_running_and_a_delete_still_wins() -> None:
    # runsc saved it: suspended, as a freeze would leave it; a resume then runs it.
    rec = _rec(S.RUNNING)
    assert _play(rec, E.SUSPEND, E.CHECKPOINTED, E.RESUME) == [True, True, True]
    assert rec.status == S.RUNNING
    # runsc refused to save it (an open connection): it runs on.
    rec = _rec(S.RUNNING)
    assert _play(rec, E.SUSPEND, E.CHECKPOINT_FAILED) == [True, True]
    assert rec.status == S.RUNNING
    # A DELETE during the save: the save's end is refused, not written over it.
    rec = _rec(S.RUNNING)
    assert _play(rec, E.SUSPEND, E.TERMINATE, E.CHECKPOINTED) == [True, True, False]
    assert rec.status == S.TERMINATED
    # Only a suspend in flight can end as saved.
    assert _play(_rec(S.RUNNING), E.CHECKPOINTED) == [False]
    assert _play(_rec(S.SUSPENDED), E.CHECKPOINT_FAILED) == [False]


def test_a_sandbox_whose_processes_cannot_be_restored_ends_failed_once() -> None:
    # A resume from disk, a save that stopped it, the restore after a memory snapshot.
    for start in (S.SUSPENDED, S.SUSPENDING, S.SNAPSHOTTING):
        rec = _rec(start)
        assert _play(rec, E.RESTORE_FAILED, E.RESTORE_FAILED, E.RESUME) == [True, False, False]
        assert (rec.status, rec.termination_reason) == (S.FAILED, "restore_failed")
    # A running sandbox has nothing to restore; a DELETE first wins.
    assert _play(_rec(S.RUNNING), E.RESTORE_FAILED) == [False]
    rec = _rec(S.SUSPENDED)
    assert _play(rec, E.TERMINATE, E.RESTORE_FAILED) == [True, False]
    assert rec.status == S.TERMINATED


# -- through the store -------------------------------------------------------------


def test_advance_writes_the_store_and_a_refusal_writes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    try:
        rec = _rec(S.PENDING)
        store.put(rec)
        states.advance(store, rec.id, E.STARTED)
        assert store.by_id(rec.id).status == S.RUNNING  # type: ignore[union-attr]
        with pytest.raises(IllegalTransition):
            states.advance(store, rec.id, E.FROZEN)
        assert store.by_id(rec.id).status == S.RUNNING  # type: ignore[union-attr]
        assert states.try_advance(store, rec.id, E.RESUME) is None
        assert states.try_advance(store, "sbx-none", E.TERMINATE) is None
        states.advance(store, rec.id, E.TERMINATE, now=9.0, reason="timeout")
    finally:
        store.close()
    again = Store(tmp_path / "s.db")
    try:
        got = again.by_id(rec.id)
        assert got is not None and (got.status, got.termination_reason) == ("terminated", "timeout")
    finally:
        again.close()


def test_a_refusal_becomes_the_409_a_request_gets() -> None:
    from sandboxd.host.manager import refusal

    err = refusal(IllegalTransition("sbx-1", S.SNAPSHOTTING, E.SNAPSHOT))
    assert isinstance(err, ApiError)
    assert (err.status, err.code) == (409, "SNAPSHOT_IN_PROGRESS")
