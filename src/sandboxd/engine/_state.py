"""Process state: everything that decides what a process *is* lives here.

Rules this module keeps
-----------------------
* It is pure: no sockets, no file descriptors, no clocks. Callers pass in what
  the kernel told them (``si_code``/``si_status`` from ``waitid``, the cgroup's
  OOM-kill counter) and what the daemon did (a timeout fired, a kill was asked
  for); this module answers with the state. That keeps every exit
  classification testable without spawning anything.
* A process record has exactly one :class:`ExitInfo` once its main process has
  been reaped, and it never changes afterwards.
* Every state a client can observe is one of :class:`ProcessStatus` (the
  wire's ``status``) plus an :class:`ExitReason` (our finer ``reason``).

Theory of operation
-------------------
A spawned process moves through three phases::

    RUNNING ──(main reaped)──► EXITED (status + reason fixed)
                                  │
                                  └─(pipes at EOF, or the drain grace expired)──► SETTLED

``RUNNING`` ends when the pidfd of the main process becomes readable and
``waitid`` reaps it. The exit is classified once, from the facts:

* ``CLD_EXITED`` → ``exited`` with the exit code;
* killed by a signal while the daemon's timeout had fired → ``signaled`` on the
  wire, reason ``timed_out`` (the wire's status enum has no timeout value);
* killed by SIGKILL and the process's own cgroup counted an OOM kill →
  ``oom_killed`` (signal 9);
* any other signal → ``signaled``.

``SETTLED`` is about output, not the process: followers send ``eof`` only once
the main process is reaped *and* its pipes reached EOF, or a bounded grace has
passed after the exit (a background grandchild may hold the pipe open forever;
a complaint users have of other daemons).

A start that never produced a process is not a state here: it is answered with
a 4xx error and no record exists (``failed to start``).

Managed processes (a supervisor around successive incarnations) have their own
state set, :class:`ManagedStatus`: the supervisor asks :func:`restart_decision`
what to do after each exit and records the answer. Which status may follow
which is not decided here: every status write goes through the transition
tables of ``states.py``.
"""

from __future__ import annotations

import enum
import os
import signal as _signal
from dataclasses import dataclass

# The statuses and their transition tables live in states.py; re-exported here
# because exit classification and restart decisions speak in them.
from .states import ManagedStatus, ProcessStatus

__all__ = [
    "ExitInfo",
    "ExitReason",
    "ManagedStatus",
    "ProcessStatus",
    "RestartDecision",
    "RestartPolicy",
    "classify_exit",
    "describe_exit",
    "is_failure",
    "restart_decision",
]


class ExitReason(enum.StrEnum):
    """Why a process ended: the ``reason`` of run's exit event."""

    EXITED = "exited"
    SIGNALED = "signaled"
    OOM_KILLED = "oom_killed"
    TIMED_OUT = "timed_out"


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """How the main process ended. Immutable once made."""

    status: ProcessStatus
    reason: ExitReason
    exit_code: int | None
    signal: int | None
    ended_at_ms: int

    @property
    def oom_killed(self) -> bool:
        return self.reason is ExitReason.OOM_KILLED

    def shell_code(self) -> int:
        """The exit code a shell would report: the code, or 128 + signal."""
        if self.exit_code is not None:
            return self.exit_code
        return 128 + (self.signal or 0)


def classify_exit(
    si_code: int,
    si_status: int,
    *,
    ended_at_ms: int,
    oom_kills: int = 0,
    timed_out: bool = False,
) -> ExitInfo:
    """Turn what ``waitid`` reported into an :class:`ExitInfo`.

    ``oom_kills`` is how many OOM kills the process's own cgroup counted; it
    only matters when the main process died of SIGKILL, because a plain
    ``kill -9`` leaves the counter untouched while the OOM killer raises it.
    ``timed_out`` is true when the daemon killed the process because its
    deadline passed; it wins over an OOM that the kill itself may have raced.
    """
    if si_code == os.CLD_EXITED:
        return ExitInfo(ProcessStatus.EXITED, ExitReason.EXITED, si_status, None, ended_at_ms)
    sig = si_status
    if timed_out:
        return ExitInfo(ProcessStatus.SIGNALED, ExitReason.TIMED_OUT, None, sig, ended_at_ms)
    if sig == _signal.SIGKILL and oom_kills > 0:
        return ExitInfo(ProcessStatus.OOM_KILLED, ExitReason.OOM_KILLED, None, sig, ended_at_ms)
    return ExitInfo(ProcessStatus.SIGNALED, ExitReason.SIGNALED, None, sig, ended_at_ms)


# --- Managed processes -------------------------------------------------------


class RestartPolicy(enum.StrEnum):
    NEVER = "never"
    ON_FAILURE = "on_failure"
    ALWAYS = "always"


def is_failure(exit_info: ExitInfo) -> bool:
    """A non-zero exit, any signal, an OOM kill or a timeout is a failure."""
    return exit_info.exit_code != 0


@dataclass(frozen=True, slots=True)
class RestartDecision:
    restart: bool
    delay_ms: int
    reason: str | None  # why the supervisor stops, when it does


def restart_decision(
    policy: RestartPolicy,
    exit_info: ExitInfo,
    *,
    restart_count: int,
    max_restarts: int | None,
    backoff_step: int,
    initial_backoff_ms: int,
    max_backoff_ms: int,
) -> RestartDecision:
    """Decide whether a managed process is started again, and after how long.

    Backoff is ``initial_backoff_ms * 2**backoff_step`` capped at
    ``max_backoff_ms``; the supervisor resets ``backoff_step`` to 0 after a run
    that stayed up for the stable period.
    """
    if policy is RestartPolicy.NEVER:
        return RestartDecision(
            False, 0, f"process ended ({describe_exit(exit_info)}); policy never"
        )
    if policy is RestartPolicy.ON_FAILURE and not is_failure(exit_info):
        return RestartDecision(False, 0, None)
    if max_restarts is not None and restart_count >= max_restarts:
        return RestartDecision(
            False,
            0,
            f"max_restarts ({max_restarts}) reached; last exit: {describe_exit(exit_info)}",
        )
    delay = min(max_backoff_ms, initial_backoff_ms * (2 ** min(backoff_step, 30)))
    return RestartDecision(True, max(0, delay), None)


def describe_exit(exit_info: ExitInfo) -> str:
    if exit_info.reason is ExitReason.EXITED:
        return f"exit code {exit_info.exit_code}"
    if exit_info.reason is ExitReason.OOM_KILLED:
        return "killed by the OOM killer"
    if exit_info.reason is ExitReason.TIMED_OUT:
        return "timed out"
    try:
        name = _signal.Signals(exit_info.signal or 0).name
    except ValueError:
        name = f"signal {exit_info.signal}"
    return f"killed by {name}"
