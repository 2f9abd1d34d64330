"""Request models and response bodies of ``/api/v1/processes``.

Requests are validated by pydantic models (strict types: ``"9"`` is not a
signal); a body that does not validate gets 400 ``INVALID_REQUEST`` naming the
field. Responses are plain dicts built here, field for field as the SDK's
``ProcessInfo`` expects (docs/processes.md). Extra fields
(``reason``, ``dropped_bytes``) are ours; the SDK drops unknown fields. The
request models here and the response models in ``schemas.py`` are what the
OpenAPI document (``openapi.py``) is generated from.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from ..engine import (
    STDERR,
    STDOUT,
    ExitInfo,
    HealthCheckConfig,
    Process,
    RestartConfig,
    RestartPolicy,
    SpawnError,
    SpawnSpec,
    Supervisor,
    resolve_user,
)
from .errors import ApiError

MAX_ARGV_BYTES = 1 << 20  # the kernel's ARG_MAX is 2 MiB for argv + env together
MAX_ID = 2**32 - 2  # uid/gid 2**32-1 is (uid_t)-1, "no change" to setuid(2)


class Strict(BaseModel):
    """Strict types (`"9"` is not an int, `true` is not 1); unknown fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


def _no_nul(value: str, what: str) -> str:
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL bytes")
    return value


def _nul_free(value: str) -> str:
    return _no_nul(value, "value")


# The pattern only documents the rule in the OpenAPI document; the validator
# enforces it (with a clearer message than a pattern mismatch).
NUL_FREE_PATTERN = "^[^\\u0000]*$"
Text = Annotated[
    str, AfterValidator(_nul_free), Field(json_schema_extra={"pattern": NUL_FREE_PATTERN})
]
ENV_SCHEMA: dict[str, Any] = {
    "propertyNames": {"pattern": "^[^=\\u0000]+$"},
    "description": "Merged over the daemon's environment. Names are non-empty, without `=` or NUL.",
}


def check_env(v: dict[str, str]) -> dict[str, str]:
    for k in v:
        _no_nul(k, "env names")
        if not k or "=" in k:
            raise ValueError(f"invalid env name {k!r}")
    return v


class UserSpec(Strict):
    name: Text | None = None
    uid: Annotated[int, Field(ge=0, le=MAX_ID)] | None = None
    gid: Annotated[int, Field(ge=0, le=MAX_ID)] | None = None


class CommandRequest(Strict):
    command: Annotated[Text, Field(min_length=1)]
    args: list[Text] = Field(
        default_factory=list,
        description=f"At most {MAX_ARGV_BYTES} bytes together; one argument at most 128 KiB (the kernel's limit).",
    )
    env: dict[str, Text] = Field(default_factory=dict, json_schema_extra=ENV_SCHEMA)
    working_dir: Text | None = None
    user: Text | UserSpec | None = Field(
        default=None,
        description='A name, "uid" or "uid:gid", or an object with name xor uid (and gid).',
    )

    @field_validator("args")
    @classmethod
    def _check_args(cls, v: list[str]) -> list[str]:
        if sum(len(a) for a in v) > MAX_ARGV_BYTES:
            raise ValueError(f"args exceed {MAX_ARGV_BYTES} bytes")
        return v

    @field_validator("env")
    @classmethod
    def _check_env(cls, v: dict[str, str]) -> dict[str, str]:
        return check_env(v)


class RestartModel(Strict):
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


class HealthCheckModel(Strict):
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
    timeout: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    timeout_secs: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None

    @property
    def deadline(self) -> float | None:
        return self.timeout if self.timeout is not None else self.timeout_secs


class SignalRequest(Strict):
    signal: int


def parse(model: type[BaseModel], raw: Any, codes: Mapping[str, str] | None = None) -> Any:
    """Validate ``raw`` (a decoded JSON body, or a query mapping) into ``model``.

    A failure is 400 with ``codes[field]`` for the first field that failed (in
    field order, so the earliest field wins as a hand-written check would),
    ``INVALID_REQUEST`` for other fields or a body that is not an object.
    """
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        loc = exc.errors()[0]["loc"]
        code = (codes or {}).get(str(loc[0]) if loc else "", "INVALID_REQUEST")
        raise ApiError(400, code, describe_validation(exc)) from None


def describe_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


def check_user_string(raw: str) -> None:
    """Refuse ids that ``resolve_user`` would choke on, as the 400 it gives for bad users.

    It reads an all-digit part (``"1000"``, ``"root:1000"``) with ``int()``,
    which raises on digits that are not decimal (``"²"``) and on more than
    4300 digits, and an out-of-range gid only fails later, in getgrouplist.
    """
    for part, what in zip(raw.strip().partition(":")[::2], ("uid", "gid"), strict=True):
        if not part.isdigit():
            continue  # a name (or no group): looked up as such
        shown = part if len(part) <= 24 else f"{part[:20]}..."
        if not part.isascii():
            raise SpawnError("INVALID_USER", f"user: {what} {shown!r} is not a decimal number")
        if len(part.lstrip("0")) > len(str(MAX_ID)) or int(part) > MAX_ID:
            raise SpawnError("INVALID_USER", f"user: {what} {shown} is out of range")


def to_spawn_spec(req: CommandRequest) -> SpawnSpec:
    user = None
    if isinstance(req.user, str):
        check_user_string(req.user)
        user = resolve_user(req.user)
    elif req.user is not None:
        user = resolve_user(req.user.model_dump(exclude_none=True))
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
        "health_status": sup.health_status.value,
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
