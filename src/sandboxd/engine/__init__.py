"""The process engine: spawning, supervision, output, cgroups, terminals. No HTTP in here.

This is the engine's front door: other packages (the API, the CLI,
observability) import what they need from ``sandboxd.engine``, never from its
modules. Inside, by concern:

* ``spawn``: turning a request into a child (checks, cgroup, trampoline,
  ``Popen``, pidfd), for processes and terminals alike;
* ``exitwatch``: the pidfd exit watch that reaps exactly one child;
* ``stopping``: stopping a tree, as a task the engine owns;
* ``states``: every status enum and its table of allowed transitions;
* ``_state``: exit classification and restart decisions (pure);
* ``process``, ``managed``, ``health``, ``table``: processes, supervisors, the
  process table;
* ``output``, ``fairness``: output capture and the loop's fair share;
* ``cgroups``: the daemon's cgroups;
* ``pty``: terminal sessions (ring, terminal, session, manager).
"""

from ._state import ExitInfo, ExitReason, RestartPolicy, describe_exit
from .cgroups import CgroupLayout, ProcessCgroup
from .health import HealthCheckConfig
from .managed import RestartConfig, SupervisionStopped, Supervisor
from .output import STDERR, STDOUT, STREAM_NAMES, LineRun, follow, snapshot_lines
from .process import Process, StdinNotWritable
from .pty import (
    DEFAULT_COLS,
    DEFAULT_ROWS,
    IDLE_ENV,
    RETENTION_ENV,
    Attachment,
    Closed,
    Exited,
    InputRateExceeded,
    PtyManager,
    PtySession,
    PtySettings,
    TooManySessions,
)
from .spawn import Identity, SpawnError, SpawnSpec, is_self, resolve_user
from .states import (
    HealthStatus,
    IllegalTransition,
    ManagedStatus,
    ProcessStatus,
    SessionState,
)
from .stopping import Stop, Stops
from .table import EngineSettings, NameInUse, ProcessNotFound, ProcessTable, name_problem

__all__ = [
    "DEFAULT_COLS",
    "DEFAULT_ROWS",
    "IDLE_ENV",
    "RETENTION_ENV",
    "STDERR",
    "STDOUT",
    "STREAM_NAMES",
    "Attachment",
    "CgroupLayout",
    "Closed",
    "EngineSettings",
    "ExitInfo",
    "ExitReason",
    "Exited",
    "HealthCheckConfig",
    "HealthStatus",
    "Identity",
    "IllegalTransition",
    "InputRateExceeded",
    "LineRun",
    "ManagedStatus",
    "NameInUse",
    "Process",
    "ProcessCgroup",
    "ProcessNotFound",
    "ProcessStatus",
    "ProcessTable",
    "PtyManager",
    "PtySession",
    "PtySettings",
    "RestartConfig",
    "RestartPolicy",
    "SessionState",
    "SpawnError",
    "SpawnSpec",
    "StdinNotWritable",
    "Stop",
    "Stops",
    "SupervisionStopped",
    "Supervisor",
    "TooManySessions",
    "describe_exit",
    "follow",
    "is_self",
    "name_problem",
    "resolve_user",
    "snapshot_lines",
]
