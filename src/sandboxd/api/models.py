"""Request models and response bodies of ``/api/v1/processes``.

Requests are validated by pydantic models (strict types: ``"9"`` is not a
signal); a body that does not validate gets 400 ``INVALID_REQUEST`` naming the
field. Responses are plain dicts built here, field for field as the SDK's
``ProcessInfo`` expects (``../shared/spec/tensorlake-api.md`` §4). Extra fields
(``reason``, ``dropped_bytes``) are ours; the SDK drops unknown fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..engine._state import ExitInfo, RestartPolicy
from ..engine.health import HealthCheckConfig
from ..engine.managed import RestartConfig, Supervisor
from ..engine.output import STDERR, STDOUT
from ..engine.process import Process
from ..engine.spawn import SpawnSpec, resolve_user
from .errors import ApiError

MAX_ARGV_BYTES = 1 << 20  # the kernel's ARG_MAX is 2 MiB for argv + env together


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class UserSpec(_Strict):
    name: str | None = None
    uid: Annotated[int, Field(ge=0, le=2**32 - 2)] | None = None
    gid: Annotated[int, Field(ge=0, le=2**32 - 2)] | None = None


def _no_nul(value: str, what: str) -> str:
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL bytes")
    return value


class CommandRequest(_Strict):
    command: Annotated[str, Field(min_length=1)]
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    working_dir: str | None = None
    user: str | UserSpec | None = None

    @field_validator("command", "working_dir")
    @classmethod
    def _check_str(cls, v: str | None) -> str | None:
        return None if v is None else _no_nul(v, "value")

    @field_validator("args")
    @classmethod
    def _check_args(cls, v: list[str]) -> list[str]:
        for a in v:
            _no_nul(a, "args")
        if sum(len(a) for a in v) > MAX_ARGV_BYTES:
            raise ValueError(f"args exceed {MAX_ARGV_BYTES} bytes")
        return v

    @field_validator("env")
    @classmethod
    def _check_env(cls, v: dict[str, str]) -> dict[str, str]:
        for k, val in v.items():
            _no_nul(k, "env names")
            _no_nul(val, "env values")
            if not k or "=" in k:
                raise ValueError(f"invalid env name {k!r}")
        return v


class RestartModel(_Strict):
    policy: Literal["never", "on_failure", "always"] = "on_failure"
    max_restarts: Annotated[int, Field(ge=0)] | None = None
    initial_backoff_ms: Annotated[int, Field(ge=0, le=86_400_000)] = 500
    max_backoff_ms: Annotated[int, Field(ge=0, le=86_400_000)] = 30_000

    def config(self) -> RestartConfig:
        return RestartConfig(
            RestartPolicy(self.policy),
            self.max_restarts,
            self.initial_backoff_ms,
            max(self.max_backoff_ms, self.initial_backoff_ms),
        )


class HealthCheckModel(_Strict):
    type: Literal["http", "tcp"]
    port: Annotated[int, Field(ge=1, le=65535)]
    path: str | None = None
    initial_delay_ms: Annotated[int, Field(ge=0, le=86_400_000)] = 5000
    interval_ms: Annotated[int, Field(ge=10, le=86_400_000)] = 1000
    timeout_ms: Annotated[int, Field(ge=1, le=600_000)] = 500
    failure_threshold: Annotated[int, Field(ge=1, le=1_000_000)] = 3

    @field_validator("path")
    @classmethod
    def _check_path(cls, v: str | None) -> str | None:
        if v is not None and any(c in v for c in "\r\n\x00 "):
            raise ValueError("path must not contain spaces, CR, LF or NUL")
        return v

    def config(self) -> HealthCheckConfig:
        return HealthCheckConfig(
            self.type,
            self.port,
            self.path,
            self.initial_delay_ms,
            self.interval_ms,
            self.timeout_ms,
            self.failure_threshold,
        )


class StartProcessRequest(CommandRequest):
    stdin_mode: Literal["closed", "pipe"] = "closed"
    stdout_mode: Literal["capture", "discard"] = "capture"
    stderr_mode: Literal["capture", "discard"] = "capture"
    name: str | None = None
    restart: RestartModel | None = None
    health_check: HealthCheckModel | None = None
    # Ours, beyond the contract: how long DELETE waits between SIGTERM and SIGKILL.
    stop_grace_ms: Annotated[int, Field(ge=0, le=3_600_000)] | None = None

    @property
    def managed(self) -> bool:
        return self.name is not None or self.restart is not None or self.health_check is not None

    def restart_config(self) -> RestartConfig:
        # A name or a health check alone asks for supervision without restarts.
        return (
            self.restart.config()
            if self.restart is not None
            else RestartConfig(RestartPolicy.NEVER)
        )


class RunRequest(CommandRequest):
    timeout: Annotated[float, Field(ge=0)] | None = None
    timeout_secs: Annotated[float, Field(ge=0)] | None = None

    @property
    def deadline(self) -> float | None:
        return self.timeout if self.timeout is not None else self.timeout_secs


class SignalRequest(_Strict):
    signal: int


def parse(model: type[_Strict], raw: Any) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ApiError(400, "INVALID_REQUEST", describe_validation(exc)) from None


def describe_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


def to_spawn_spec(req: CommandRequest) -> SpawnSpec:
    user = None
    if req.user is not None:
        raw = req.user if isinstance(req.user, str) else req.user.model_dump(exclude_none=True)
        user = resolve_user(raw)
    spec = SpawnSpec(
        command=req.command,
        args=list(req.args),
        env=dict(req.env),
        working_dir=req.working_dir,
        user=user,
    )
    if isinstance(req, StartProcessRequest):
        spec.stdin_pipe = req.stdin_mode == "pipe"
        spec.capture_stdout = req.stdout_mode == "capture"
        spec.capture_stderr = req.stderr_mode == "capture"
    return spec


# --- responses ---


def process_info(proc: Process) -> dict[str, Any]:
    ex = proc.exit
    return {
        "handle": proc.handle,
        "pid": proc.pid,
        "status": proc.status.value,
        "exit_code": ex.exit_code if ex else None,
        "signal": ex.signal if ex else None,
        "oom_killed": bool(ex and ex.oom_killed),
        "reason": ex.reason.value if ex else None,
        "stdin_writable": proc.stdin_writable,
        "command": proc.command,
        "args": proc.args,
        "started_at": proc.started_at_ms,
        "ended_at": ex.ended_at_ms if ex else None,
        "managed": managed_info(proc.supervisor) if proc.supervisor is not None else None,
    }


def _last_exit(ex: ExitInfo | None) -> dict[str, Any] | None:
    if ex is None:
        return None
    return {
        "exit_code": ex.exit_code,
        "signal": ex.signal,
        "oom_killed": ex.oom_killed,
        "ended_at": ex.ended_at_ms,
    }


def managed_info(sup: Supervisor) -> dict[str, Any]:
    r = sup.restart
    hc = sup.health_check
    return {
        "id": sup.id,
        "name": sup.name,
        "status": sup.status.value,
        "restart_count": sup.restart_count,
        "restart": {
            "policy": r.policy.value,
            "max_restarts": r.max_restarts,
            "initial_backoff_ms": r.initial_backoff_ms,
            "max_backoff_ms": r.max_backoff_ms,
        },
        "health_check": None
        if hc is None
        else {
            "type": hc.type,
            "port": hc.port,
            "path": hc.path,
            "initial_delay_ms": hc.initial_delay_ms,
            "interval_ms": hc.interval_ms,
            "timeout_ms": hc.timeout_ms,
            "failure_threshold": hc.failure_threshold,
        },
        "health_status": sup.health_status,
        "consecutive_health_failures": sup.consecutive_health_failures,
        "last_exit": _last_exit(sup.last_exit),
        "last_error": sup.last_error,
        "next_restart_at": sup.next_restart_at,
    }


STREAMS = {"stdout": (STDOUT,), "stderr": (STDERR,), "output": (STDOUT, STDERR)}


def output_body(proc: Process, lines: list[str], streams: tuple[int, ...]) -> dict[str, Any]:
    dropped = sum(proc.output.dropped[s] for s in streams)
    return {
        "pid": proc.pid,
        "lines": lines,
        "line_count": len(lines),
        "dropped_bytes": dropped,
        "truncated": dropped > 0,
    }
