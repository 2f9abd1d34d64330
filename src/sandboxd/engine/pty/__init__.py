"""PTY sessions: a program on a pseudo-terminal, shared by any number of clients.

The package, by concern: ``ring`` (the history ring and the input token
bucket, pure), ``terminal`` (opening the pty and starting the program on it),
``session`` (one session and its attachments) and ``manager`` (every session:
create, find, delete, expire, shutdown). What they share with every other
process of the daemon comes from the engine: the spawn path (``spawn.py``),
the pidfd exit watch (``exitwatch.py``), the stop of a tree
(``stopping.py``) and the status table (``states.py``).

This package knows nothing about HTTP or websockets. The API layer
(``api/pty.py``) turns frames into calls on :class:`PtySession` and
:class:`Attachment`, and :class:`Attachment.next` results back into frames.

Rules this module keeps
-----------------------
* A session is spawned without forking the daemon: ``os.openpty()``, then
  ``subprocess.Popen`` (vfork path) of ``/usr/bin/setsid -c <command>`` with the
  slave on fds 0-2. ``setsid`` makes the child a session leader and the slave
  its controlling terminal (``-c``), then ``exec``s the command with the same
  pid, so job control, ``/dev/tty`` and ``^C`` work as on a real terminal. The
  daemon keeps only the master; it closes its copy of the slave at once, so a
  read of ``EIO`` on the master means every holder of the slave is gone.
* The session's process tree lives in its own cgroup (``pty-<id>``) when the
  machine has one; it joins it through a ``/bin/sh`` trampoline before
  ``setsid`` runs, like every other process of the daemon, and sets the
  children's ``oom_score_adj`` there (the daemon's own protection is inherited
  otherwise).
* Exit is detected with a pidfd and reaped with ``waitid(P_PIDFD)``
  (``exitwatch.py``, as for every process). Never ``waitpid(-1)``: the daemon
  is a child subreaper and the process table reaps orphans *by pid*; our pid is
  put in the table's live-pid set (``guard_pids``) until we have reaped it, so
  the orphan reaper never steals our exit status.
* Output goes into one history ring per session (1 MiB, byte-exact, absolute
  offsets). Every attachment is an offset into that ring; nothing is queued per
  client, so a slow client costs no memory and never delays the reader or the
  other clients. The master is drained with up to 16 reads of 64 KiB per
  wakeup; it is never left unread because of a client.
* Slow-client rule: a READY client whose offset falls behind the oldest
  retained byte *skips* to it; the skipped byte count is kept in
  :attr:`Attachment.skipped` and logged. (A reattach would replay the same
  ring, so closing the client would give it the same bytes plus an error.) A
  client that has *not* sent READY yet and falls behind is closed with 1008:
  more than 1 MiB arrived before it was ready.
* Input is written to the master without blocking: what the terminal does not
  take at once is queued and written when the master is writable; a writer
  waits while more than 256 KiB are queued (back-pressure to that client only).
  Input is rate-limited per session by a token bucket (1 MiB/s, 1 MiB burst);
  going over raises :class:`InputRateExceeded` (the API closes with 1008).
* Sizes are clamped to 1..500 rows and 1..1000 columns. A resize is a
  ``TIOCSWINSZ`` on the master; the kernel sends ``SIGWINCH`` to the
  foreground process group.
* Stopping a session's tree is ``SIGHUP`` + ``SIGCONT`` (stopped jobs must run
  to die) to every process in it, then ``SIGKILL`` to the whole tree after a
  grace (5 s), as a stop owned by the engine (``stopping.py``): a DELETE whose
  client goes away still ends with the SIGKILL. "The tree" is the session's cgroup; without cgroups it is every
  process whose session id is the leader's pid (jobs included, ``setsid``
  escapees not).

Theory of operation
-------------------
::

    RUNNING ──(main process reaped)──► DRAINING ──(master EIO, or drain grace)──► ENDED
       │                                  │                                         │
       │                                  │                   (dead_retention_s) ──►│ removed
       └────────────(delete / shutdown: clients closed 1001 "session terminated")──┴─► removed

``RUNNING``: the main process is alive. Clients may attach, send input and
resize. With no client attached for ``idle_secs`` the session's tree is
stopped (SIGHUP, grace, SIGKILL); the exit then takes the normal path, so the
session is still listed, as ended, for ``dead_retention_s``.

``DRAINING``: the main process was reaped and its exit fixed; output written
just before the exit may still be in flight in the tty layer, so the master is
read until ``EIO`` (no holder of the slave left) or a short grace (a background
job may hold the slave open forever). Then ``ENDED``: the master is closed (a
hangup for any survivor), ``exit_code`` and ``ended_at`` are visible, and every
attachment receives the rest of the history followed by the exit.

``exit_code`` is the program's exit status, or ``128 + signal`` when a signal
killed it (what a shell would report); :attr:`PtySession.signal` and
``oom_killed`` tell the cases apart.

Delete removes the session at once (404 afterwards), closes its clients with
"session terminated", stops the tree as above and then frees the cgroup.
Anything left in the tree of an *ended* session is killed when the session is
removed.
"""

from .manager import IDLE_ENV, RETENTION_ENV, PtyManager, PtySettings, TooManySessions
from .ring import ByteRing, TokenBucket
from .session import (
    INPUT_HIGH_WATER,
    MAX_OUTPUT_FRAME,
    PRE_READY_OVERFLOW,
    TERMINATED,
    Attachment,
    Closed,
    Event,
    Exited,
    InputRateExceeded,
    PtySession,
    new_session_id,
    new_token,
)
from .terminal import (
    DEFAULT_COLS,
    DEFAULT_ROWS,
    MAX_COLS,
    MAX_ROWS,
    clamp_size,
    get_winsize,
    session_members,
    set_winsize,
)

__all__ = [
    "DEFAULT_COLS",
    "DEFAULT_ROWS",
    "IDLE_ENV",
    "INPUT_HIGH_WATER",
    "MAX_COLS",
    "MAX_OUTPUT_FRAME",
    "MAX_ROWS",
    "PRE_READY_OVERFLOW",
    "RETENTION_ENV",
    "TERMINATED",
    "Attachment",
    "ByteRing",
    "Closed",
    "Event",
    "Exited",
    "InputRateExceeded",
    "PtyManager",
    "PtySession",
    "PtySettings",
    "TokenBucket",
    "TooManySessions",
    "clamp_size",
    "get_winsize",
    "new_session_id",
    "new_token",
    "session_members",
    "set_winsize",
]
