"""The engine's status tables, walked directly: no process, no timer, no loop.

Every allowed transition is applied; every pair a table does not list is
refused loudly (IllegalTransition), which is what keeps two code paths from
silently disagreeing about a status.
"""

from __future__ import annotations

import itertools

import pytest

from sandboxd.engine.states import (
    ALL_TABLES,
    HEALTH,
    MANAGED,
    PROCESS,
    SESSION,
    HealthStatus,
    IllegalTransition,
    ManagedStatus,
    ProcessStatus,
    SessionState,
    Transitions,
    advance,
)


def all_pairs(table: Transitions) -> list[tuple]:  # type: ignore[type-arg]
    members = list(type(table.initial))
    return list(itertools.product(members, members))


@pytest.mark.parametrize(
    ("table", "pair"),
    [(t, pair) for t in ALL_TABLES for pair in t.rows],
    ids=lambda v: getattr(v, "name", None) or "->".join(s.value for s in v),
)
def test_every_allowed_transition_applies(table: Transitions, pair: tuple) -> None:  # type: ignore[type-arg]
    current, new = pair
    assert advance(table, current, new) is new
    assert table.rows[pair], "every row says why it happens"


@pytest.mark.parametrize(
    ("table", "pair"),
    [(t, pair) for t in ALL_TABLES for pair in all_pairs(t) if pair not in t.rows],
    ids=lambda v: getattr(v, "name", None) or "->".join(s.value for s in v),
)
def test_every_other_pair_is_refused_loudly(table: Transitions, pair: tuple) -> None:  # type: ignore[type-arg]
    current, new = pair
    with pytest.raises(IllegalTransition) as info:
        advance(table, current, new)
    assert f"{current.value} -> {new.value}" in str(info.value)


def test_a_process_ends_once_and_for_good() -> None:
    for end in (ProcessStatus.EXITED, ProcessStatus.SIGNALED, ProcessStatus.OOM_KILLED):
        assert advance(PROCESS, PROCESS.initial, end) is end
        for anything in ProcessStatus:
            with pytest.raises(IllegalTransition):
                advance(PROCESS, end, anything)


def test_refusals_that_name_real_bugs() -> None:
    # A stopped supervisor is only ever revived by starting an incarnation; it
    # never backs off (nothing is scheduled) and is never stopped twice.
    with pytest.raises(IllegalTransition):
        advance(MANAGED, ManagedStatus.STOPPED, ManagedStatus.BACKING_OFF)
    with pytest.raises(IllegalTransition):
        advance(MANAGED, ManagedStatus.STOPPED, ManagedStatus.STOPPED)
    # A terminal session never runs again, and never ends without draining.
    with pytest.raises(IllegalTransition):
        advance(SESSION, SessionState.ENDED, SessionState.RUNNING)
    with pytest.raises(IllegalTransition):
        advance(SESSION, SessionState.RUNNING, SessionState.ENDED)
    # A health check that is disabled stays disabled.
    for status in HealthStatus:
        if status is not HealthStatus.DISABLED:
            with pytest.raises(IllegalTransition):
                advance(HEALTH, HealthStatus.DISABLED, status)


def test_a_supervisor_life_is_a_walk_through_its_table() -> None:
    """The life the supervision loop drives, step by step (see managed.py)."""
    walk = [
        ManagedStatus.STARTING,  # first incarnation, with a health check
        ManagedStatus.RUNNING,  # first probe passed
        ManagedStatus.BACKING_OFF,  # it crashed; on_failure restarts it
        ManagedStatus.BACKING_OFF,  # the next start failed (command gone)
        ManagedStatus.STARTING,  # started again
        ManagedStatus.STOPPED,  # max_restarts reached
        ManagedStatus.RUNNING,  # a restart request revived it (no health check)
        ManagedStatus.RUNNING,  # restarted at once by request
        ManagedStatus.STOPPED,  # DELETE
    ]
    status = MANAGED.initial
    for new in walk:
        status = advance(MANAGED, status, new)
    assert status is ManagedStatus.STOPPED


def test_initial_states_are_what_the_wire_shows_first() -> None:
    assert PROCESS.initial is ProcessStatus.RUNNING
    assert MANAGED.initial is ManagedStatus.STARTING
    assert HEALTH.initial is HealthStatus.STARTING
    assert SESSION.initial is SessionState.RUNNING
