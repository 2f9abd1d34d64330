"""Every status the engine reports, and the only ways each may change.

In the spirit of h11's ``_state.py``: each kind of thing has an enum of its
statuses and a table of the transitions allowed between them, and every status
write in the engine goes through :func:`advance`, which refuses anything the
table does not list by raising :class:`IllegalTransition`. A refused transition
is a bug in the engine (two paths disagreeing about who owns a change), so it
fails loudly where it happens instead of leaving a record in a state no client
can make sense of.

The tables are data: each row says *why* the transition happens, and the
tests walk them directly, without processes or timers.

Tables
------
* :data:`PROCESS`: one spawned process (the wire's ``status``). It is
  ``running`` until its main process is reaped, then ends in exactly one of
  ``exited``, ``signaled`` or ``oom_killed``, for good.
* :data:`MANAGED`: a supervisor around successive incarnations (the wire's
  ``managed.status``); see ``managed.py`` for the loop that drives it.
* :data:`HEALTH`: a managed process's ``health_status``.
* :data:`SESSION`: a terminal session (``running`` → ``draining`` → ``ended``);
  see ``pty/session.py``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar


class ProcessStatus(enum.StrEnum):
    """The wire's ``ProcessInfo.status``."""

    RUNNING = "running"
    EXITED = "exited"
    SIGNALED = "signaled"
    OOM_KILLED = "oom_killed"


class ManagedStatus(enum.StrEnum):
    """The wire's ``managed.status``."""

    STARTING = "starting"
    RUNNING = "running"
    BACKING_OFF = "backing_off"
    STOPPED = "stopped"


class HealthStatus(enum.StrEnum):
    """The wire's ``managed.health_status``."""

    DISABLED = "disabled"
    STARTING = "starting"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class SessionState(enum.StrEnum):
    """A terminal session's phase (the wire shows ``is_alive`` and ``exit_code``)."""

    RUNNING = "running"
    DRAINING = "draining"
    ENDED = "ended"


S = TypeVar("S", bound=enum.Enum)


class IllegalTransition(RuntimeError):
    """A status change that its table does not allow: an engine bug, never the client's."""


@dataclass(frozen=True)
class Transitions(Generic[S]):
    """The allowed ``(from, to)`` pairs of one status enum, each with why it happens."""

    name: str
    initial: S
    rows: Mapping[tuple[S, S], str]

    def allows(self, current: S, new: S) -> bool:
        return (current, new) in self.rows


def advance(table: Transitions[S], current: S, new: S) -> S:
    """Apply ``current -> new`` if ``table`` allows it and return ``new``; raise otherwise."""
    if (current, new) not in table.rows:
        raise IllegalTransition(
            f"{table.name}: {current.value} -> {new.value} is not an allowed transition"
        )
    return new


P = ProcessStatus
PROCESS: Transitions[ProcessStatus] = Transitions(
    "process",
    P.RUNNING,
    {
        (P.RUNNING, P.EXITED): "the main process exited on its own (exit code)",
        (P.RUNNING, P.SIGNALED): "a signal ended it (a kill, a stop, a timeout)",
        (P.RUNNING, P.OOM_KILLED): "SIGKILL while its cgroup counted an OOM kill",
    },
)

M = ManagedStatus
MANAGED: Transitions[ManagedStatus] = Transitions(
    "managed process",
    M.STARTING,
    {
        (M.STARTING, M.STARTING): "an incarnation with a health check starts (the first one, "
        "or a restart before the previous one was ever healthy)",
        (M.STARTING, M.RUNNING): "started without a health check, or its first probe passed",
        (M.STARTING, M.BACKING_OFF): "it ended before it was healthy; the policy restarts it",
        (M.STARTING, M.STOPPED): "it ended and the policy or max_restarts says stop, or DELETE",
        (M.RUNNING, M.STARTING): "restarted at once (restart request) with a health check",
        (M.RUNNING, M.RUNNING): "restarted at once (restart request) without a health check",
        (M.RUNNING, M.BACKING_OFF): "it ended; the policy restarts it after the backoff",
        (M.RUNNING, M.STOPPED): "it ended and the policy or max_restarts says stop, or DELETE",
        (M.BACKING_OFF, M.STARTING): "the backoff elapsed (or a restart request cut it short); "
        "the next incarnation has a health check",
        (M.BACKING_OFF, M.RUNNING): "the backoff elapsed; the next incarnation has no check",
        (M.BACKING_OFF, M.BACKING_OFF): "the next incarnation failed to start: back off again",
        (M.BACKING_OFF, M.STOPPED): "DELETE during the backoff, or failed starts reached "
        "max_restarts",
        (M.STOPPED, M.STARTING): "a restart request revives a supervisor that stopped on its "
        "own (with a health check)",
        (M.STOPPED, M.RUNNING): "a restart request revives a supervisor that stopped on its "
        "own (without a health check)",
    },
)

H = HealthStatus
HEALTH: Transitions[HealthStatus] = Transitions(
    "health",
    H.STARTING,
    {
        (H.STARTING, H.HEALTHY): "the first probe of this incarnation passed",
        (H.STARTING, H.UNHEALTHY): "failure_threshold probes failed before any passed",
        (H.HEALTHY, H.UNHEALTHY): "failure_threshold consecutive probes failed",
        (H.UNHEALTHY, H.HEALTHY): "a probe passed again (policy never keeps it running)",
        (H.STARTING, H.STARTING): "a new incarnation before the previous one was probed",
        (H.HEALTHY, H.STARTING): "a new incarnation: it is probed from the start",
        (H.UNHEALTHY, H.STARTING): "a new incarnation: it is probed from the start",
    },
)

T = SessionState
SESSION: Transitions[SessionState] = Transitions(
    "terminal session",
    T.RUNNING,
    {
        (T.RUNNING, T.DRAINING): "the main process was reaped; output may still be in flight",
        (T.DRAINING, T.ENDED): "the master read EIO (no holder of the slave left) or the "
        "drain grace expired",
    },
)

ALL_TABLES: tuple[
    Transitions[ProcessStatus]
    | Transitions[ManagedStatus]
    | Transitions[HealthStatus]
    | Transitions[SessionState],
    ...,
] = (
    PROCESS,
    MANAGED,
    HEALTH,
    SESSION,
)
