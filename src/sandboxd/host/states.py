"""A sandbox's status, and every change of it: the one state machine of the host.

Rules (as h11's ``_state.py`` has them):

* Everything that affects the state machine lives here: the statuses, the
  events that move a sandbox between them, the table of allowed moves, and
  what a refused move answers. Nothing else in the host writes
  ``Record.status``; it calls :func:`advance` (or :func:`apply`).
* A move that is not in the table is refused loudly, with
  :class:`IllegalTransition` (409 and a code), never written anyway.
* No I/O and no time here but the clock a caller passes in: the table is
  tested directly, without processes or timers.

The races between concurrent operations are rows of the table. Whoever wins
writes first (a change happens before the first ``await`` of the operation that
makes it); the loser's later move is then not in the table, and is refused
instead of writing over the winner:

* DELETE during a suspend: ``suspending --terminate--> terminated``; the
  suspend's own ``frozen`` then finds ``terminated`` and is refused.
* DELETE during a snapshot: ``snapshotting --terminate--> terminated``; the
  snapshot's ``snapshot_done`` is refused.
* DELETE during a start: ``pending --terminate--> terminated``; the start's
  ``started`` is refused (it tears down what it made).
* DELETE during a resize: a resize is admitted only from ``running``
  (``resize`` leaves it there); a DELETE first makes it ``terminated``.
* A stop of the host mid-snapshot: ``snapshotting --snapshot_done-->`` the
  status the snapshot began from (``Record.status_before``), so a suspended
  sandbox is back ``suspended``, not ``running``.
* DELETE during a suspend to disk (gVisor, ``checkpoint.py``):
  ``suspending --terminate--> terminated``; the save's ``checkpointed`` is refused.
* Processes that cannot be brought back from their checkpoint (a resume from
  disk, or the restore in place after a memory snapshot): ``restore_failed``
  ends the sandbox ``failed``, once; a DELETE that came first wins.
* The daemon dying (its launcher exited without a teardown of the host's):
  ``daemon_died`` ends any live status in ``failed``; a start still in flight
  then finds its ``started`` refused and tears down what it made.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Callable
from typing import Any, Protocol


class Status(enum.StrEnum):
    """Exactly the SDK's SandboxStatus values that this host uses."""

    PENDING = "pending"
    RUNNING = "running"
    SUSPENDING = "suspending"  # while the freezer takes it, or runsc saves it to disk
    SUSPENDED = "suspended"
    SNAPSHOTTING = "snapshotting"  # while its filesystem is archived, frozen
    TERMINATED = "terminated"
    FAILED = "failed"


class Event(enum.StrEnum):
    STARTED = "started"  # its daemon answered health
    START_FAILED = "start_failed"
    SUSPEND = "suspend"  # a suspend begins (before the freeze)
    FROZEN = "frozen"  # the freezer took every process
    FREEZE_FAILED = "freeze_failed"
    # Suspend to disk (gVisor, checkpoint.py): runsc saved it, and its processes are gone.
    CHECKPOINTED = "checkpointed"
    CHECKPOINT_FAILED = "checkpoint_failed"  # runsc refused; the sandbox still runs
    # Its processes could not be brought back from their checkpoint (a resume
    # from disk, or the restore in place after a memory snapshot): it is lost.
    RESTORE_FAILED = "restore_failed"
    RESUME = "resume"  # thawed: a new lifetime from now
    SNAPSHOT = "snapshot"  # an archive begins (remembers the status it began from)
    SNAPSHOT_DONE = "snapshot_done"  # the archive ended, or the host restarted mid-archive
    RESIZE = "resize"  # admission of a live resize; the status does not change
    UPDATE = "update"  # PATCH of name, ports, network...; the status does not change
    TERMINATE = "terminate"  # DELETE, timeout_secs, or lost across a restart
    DAEMON_DIED = "daemon_died"  # the launcher ended while the sandbox was up


S, E = Status, Event
LIVE = frozenset({S.PENDING, S.RUNNING, S.SUSPENDING, S.SUSPENDED, S.SNAPSHOTTING})
ENDED = frozenset({S.TERMINATED, S.FAILED})

# Back to the status the snapshot began from (Record.status_before).
PRIOR = "prior"

# (from, event) -> to. Every allowed move; nothing else is.
TRANSITIONS: dict[tuple[Status, Event], Status | str] = {
    (S.PENDING, E.STARTED): S.RUNNING,
    (S.PENDING, E.START_FAILED): S.FAILED,
    (S.RUNNING, E.SUSPEND): S.SUSPENDING,
    (S.SUSPENDING, E.FROZEN): S.SUSPENDED,
    (S.SUSPENDING, E.FREEZE_FAILED): S.RUNNING,
    (S.SUSPENDING, E.CHECKPOINTED): S.SUSPENDED,
    (S.SUSPENDING, E.CHECKPOINT_FAILED): S.RUNNING,
    (S.SUSPENDING, E.RESTORE_FAILED): S.FAILED,
    (S.SUSPENDED, E.RESTORE_FAILED): S.FAILED,
    (S.SNAPSHOTTING, E.RESTORE_FAILED): S.FAILED,
    (S.SUSPENDED, E.RESUME): S.RUNNING,
    (S.RUNNING, E.SNAPSHOT): S.SNAPSHOTTING,
    (S.SUSPENDED, E.SNAPSHOT): S.SNAPSHOTTING,
    (S.SNAPSHOTTING, E.SNAPSHOT_DONE): PRIOR,
    (S.RUNNING, E.RESIZE): S.RUNNING,
    **{(s, E.UPDATE): s for s in LIVE},
    **{(s, E.TERMINATE): S.TERMINATED for s in LIVE},
    **{(s, E.DAEMON_DIED): S.FAILED for s in LIVE},
}

# Asked for again once there: nothing to do, and not an error (the SDK retries).
NOOPS = frozenset(
    {
        (S.SUSPENDED, E.SUSPEND),
        (S.RUNNING, E.RESUME),
        (S.TERMINATED, E.TERMINATE),
        (S.FAILED, E.TERMINATE),
    }
)

# What a refused request answers (409): by event, then by (status, event).
REFUSAL_CODES: dict[Event, str] = {
    E.SUSPEND: "NOT_RUNNING",
    E.RESUME: "NOT_SUSPENDED",
    E.SNAPSHOT: "NOT_RUNNING",
    E.RESIZE: "NOT_RUNNING",
    E.UPDATE: "SANDBOX_TERMINATED",
}
REFUSAL_OVERRIDES: dict[tuple[Status, Event], str] = {
    (S.SNAPSHOTTING, E.SNAPSHOT): "SNAPSHOT_IN_PROGRESS",
}
INTERNAL = "ILLEGAL_TRANSITION"


class IllegalTransition(Exception):
    """A move that is not in :data:`TRANSITIONS`; a request gets 409 with :attr:`code`."""

    status = 409

    def __init__(self, sandbox_id: str, current: str, event: Event) -> None:
        self.sandbox_id, self.current, self.event = sandbox_id, current, event
        self.code = code_for(current, event)
        if (current, event) == (S.SNAPSHOTTING, E.SNAPSHOT):
            self.message = f"sandbox {sandbox_id} is already being snapshotted"
        else:
            self.message = f"sandbox {sandbox_id} is {current}: cannot {event.replace('_', ' ')}"
        super().__init__(self.message)


def code_for(current: str, event: Event) -> str:
    try:
        key = (Status(current), event)
    except ValueError:
        return INTERNAL
    return REFUSAL_OVERRIDES.get(key) or REFUSAL_CODES.get(event, INTERNAL)


def target(current: str, event: Event, before: str | None = None) -> Status | None:
    """Where ``event`` takes a sandbox that is ``current``; None when it may not."""
    try:
        to = TRANSITIONS.get((Status(current), event))
    except ValueError:
        return None  # an unknown stored status: nothing moves it
    if to == PRIOR:
        return Status(before) if before in (S.RUNNING, S.SUSPENDED) else S.RUNNING
    return to  # type: ignore[return-value]


def allowed(current: str, event: Event) -> bool:
    return target(current, event) is not None


def is_noop(current: str, event: Event) -> bool:
    try:
        return (Status(current), event) in NOOPS
    except ValueError:
        return False


class Stateful(Protocol):
    """What of a sandbox's record the state machine reads and writes."""

    id: str
    status: str
    status_before: str | None
    terminated_at: float | None
    termination_reason: str | None
    error: str | None
    lifetime_from: float | None


def apply(
    rec: Stateful,
    event: Event,
    *,
    now: float | None = None,
    reason: str | None = None,
    error: str | None = None,
) -> Stateful:
    """Move ``rec`` (in place) by ``event``, or raise :class:`IllegalTransition`.

    The fields that go with a status go with it: ``status_before`` while
    snapshotting; ``terminated_at`` (``now``), ``termination_reason`` and
    ``error`` once ended; ``lifetime_from`` (``now``) on resume.
    """
    to = target(rec.status, event, rec.status_before)
    if to is None:
        raise IllegalTransition(rec.id, rec.status, event)
    if event == E.SNAPSHOT:
        rec.status_before = rec.status
    elif rec.status == S.SNAPSHOTTING:
        rec.status_before = None
    if to in ENDED:
        rec.terminated_at = now
        rec.termination_reason = reason or _default_reason(event)
        rec.error = error
    if event == E.RESUME:
        rec.lifetime_from = now
    rec.status = to
    return rec


def _default_reason(event: Event) -> str:
    return {
        E.START_FAILED: "startup_failed",
        E.DAEMON_DIED: "daemon_died",
        E.RESTORE_FAILED: "restore_failed",
    }.get(event, "user_terminated")


class RecordStore(Protocol):
    def snapshot(self, sandbox_id: str) -> Any: ...

    def put(self, rec: Any) -> None: ...


def advance(
    store: RecordStore,
    sandbox_id: str,
    event: Event,
    *,
    now: float | None = None,
    reason: str | None = None,
    error: str | None = None,
) -> Any:
    """Read the stored record, move it by ``event``, store it; returns it.

    Synchronous: nothing can come between the read and the write on the event
    loop. Raises :class:`IllegalTransition` (and stores nothing) when the move
    is not allowed, and ``KeyError`` when there is no such record.
    """
    cur = store.snapshot(sandbox_id)
    if cur is None:
        raise KeyError(sandbox_id)
    before = cur.status
    apply(cur, event, now=now, reason=reason, error=error)
    store.put(cur)
    for observer in _watched(store):
        observer(cur, before, event)  # observe.py: an event line and a counter
    return cur


# Called after every stored move of a store's records: (record, status before, event).
Watcher = Callable[[Any, str, Event], None]
_watchers: weakref.WeakKeyDictionary[Any, list[Watcher]] = weakref.WeakKeyDictionary()


def _watched(store: RecordStore) -> list[Watcher]:
    try:
        return _watchers.get(store, [])
    except TypeError:  # a store that cannot be weakly referenced has no watchers
        return []


def watch(store: RecordStore, watcher: Watcher) -> None:
    """Call ``watcher`` after every move :func:`advance` stores in ``store``."""
    _watchers.setdefault(store, []).append(watcher)


def try_advance(store: RecordStore, sandbox_id: str, event: Event, **kw: Any) -> Any | None:
    """:func:`advance` where losing a race is expected: None instead of the refusal."""
    try:
        return advance(store, sandbox_id, event, **kw)
    except (IllegalTransition, KeyError):
        return None
