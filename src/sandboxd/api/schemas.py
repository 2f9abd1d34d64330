"""Response bodies as pydantic models: the contract's half that requests do not cover.

The handlers build plain dicts (fast, and field for field what the SDK
expects, see ``models.py``); these models describe those dicts for the OpenAPI
document (``openapi.py``). They forbid extra fields, so a key a handler adds
without adding it here makes the fuzzer's schema check fail: the document and
the handlers cannot drift apart silently. Tests also validate real replies
against them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine import ExitReason, ManagedStatus, ProcessStatus, RestartPolicy

# Epoch milliseconds, always an int: the SDK reads smaller numbers as seconds.
EpochMs = int


class _Reply(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(_Reply):
    """Every error, before any streaming starts: ``{"error", "code"}``, always JSON."""

    error: str = Field(description="A message for people.")
    code: str = Field(description="A machine code; the value of `code` is listed per response.")


class Health(_Reply):
    healthy: Literal[True]


class Info(_Reply):
    version: str
    uptime_secs: int = Field(ge=0)
    running_processes: int = Field(ge=0)
    total_processes: int = Field(ge=0, description="Records held, exited ones included.")
    spawned_total: int = Field(ge=0, description="Processes started since the daemon started.")
    cgroups: str = Field(description="Which cgroup controllers the daemon uses, for people.")


class RestartInfo(_Reply):
    policy: RestartPolicy
    max_restarts: int | None
    initial_backoff_ms: int
    max_backoff_ms: int


class HealthCheckInfo(_Reply):
    type: Literal["http", "tcp"]
    port: int
    path: str | None
    initial_delay_ms: int
    interval_ms: int
    timeout_ms: int
    failure_threshold: int


class LastExit(_Reply):
    exit_code: int | None
    signal: int | None
    oom_killed: bool
    ended_at: EpochMs


class ManagedInfo(_Reply):
    id: str = Field(description="The name when the process has one, else an opaque id.")
    name: str | None
    status: ManagedStatus
    restart_count: int
    restart: RestartInfo
    health_check: HealthCheckInfo | None
    health_status: Literal["disabled", "starting", "healthy", "unhealthy"]
    consecutive_health_failures: int
    last_exit: LastExit | None
    last_error: str | None
    next_restart_at: EpochMs | None


class ProcessInfo(_Reply):
    handle: int = Field(description="Stable per spawn; a restart gets a new one.")
    pid: int
    status: ProcessStatus
    exit_code: int | None
    signal: int | None
    oom_killed: bool
    reason: ExitReason | None
    stdin_writable: bool
    command: str
    args: list[str]
    started_at: EpochMs
    ended_at: EpochMs | None
    managed: ManagedInfo | None = Field(description="Present (non-null) for managed processes.")


class ProcessList(_Reply):
    processes: list[ProcessInfo]


class OutputBody(_Reply):
    pid: int
    lines: list[str]
    line_count: int
    dropped_bytes: int = Field(ge=0, description="Bytes dropped by the output cap (oldest first).")
    truncated: bool = Field(description="`dropped_bytes > 0`.")


class SignalResult(_Reply):
    success: Literal[True]


class DirectoryEntry(_Reply):
    name: str
    is_dir: bool
    size: int | None = Field(description="null for directories and unfollowable links.")
    modified_at: EpochMs | None


class DirectoryListing(_Reply):
    path: str = Field(description="The `path` query parameter, echoed as given.")
    entries: list[DirectoryEntry] = Field(description="Directories first, then by name (bytes).")


class PtySessionInfo(_Reply):
    session_id: str
    pid: int
    command: str
    args: list[str]
    rows: int
    cols: int
    created_at: EpochMs
    ended_at: EpochMs | None
    exit_code: int | None
    is_alive: bool
    clients: int = Field(ge=0, description="Websockets attached now.")
    # Only present when they apply, hence the defaults (not required).
    signal: int | None = Field(default=None, description="Only when the session ended by a signal.")
    oom_killed: Literal[True] | None = Field(default=None, description="Only when OOM-killed.")


class PtyCreated(PtySessionInfo):
    token: str = Field(description="This session's websocket token (64 hex digits).")


class PtySessionList(_Reply):
    sessions: list[PtySessionInfo]


# --- server-sent events: the `data:` payload of each event name ---


class RunStarted(_Reply):
    """`event: started`, first on `POST /api/v1/processes/run`."""

    handle: int
    pid: int
    started_at: EpochMs


class OutputEvent(_Reply):
    """`event: output`; `stream` only where two streams are combined."""

    line: str
    timestamp: EpochMs
    stream: Literal["stdout", "stderr"] | None = None


class DroppedEvent(_Reply):
    """`event: dropped`: the output cap dropped lines a follower had not seen."""

    dropped_bytes: int


class RunExit(_Reply):
    """`event: exit`, last on `POST /api/v1/processes/run`."""

    exit_code: int | None
    signal: int | None
    reason: ExitReason
    oom_killed: Literal[True] | None = None


class EofEvent(_Reply):
    """`event: eof` (`data: {}`), last on a follow stream."""


SSE_EVENTS: dict[str, type[BaseModel]] = {
    "started": RunStarted,
    "output": OutputEvent,
    "dropped": DroppedEvent,
    "exit": RunExit,
    "eof": EofEvent,
}


class SshStatus(_Reply):
    enabled: bool
    pid: int | None = Field(description="The process serving SSH (the daemon) while enabled.")
    host_key_fingerprint: str | None = Field(description="`SHA256:...` of the server's host key.")
    port: int | None = Field(
        default=None, description="Beyond the contract: its port on the sandbox's 127.0.0.1."
    )


class SocketHolder(_Reply):
    pid: int
    epoll: bool = Field(description="The process has an epoll instance (any).")


class SocketInfo(_Reply):
    protocol: Literal["tcp", "tcp6"]
    state: str = Field(description="`listen`, `established`, ... as in /proc/net/tcp.")
    local: str
    remote: str
    inode: int
    holders: list[SocketHolder]


class SocketList(_Reply):
    sockets: list[SocketInfo]
