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


class StartProcessRequest(CommandRequest):
    stdin_mode: Literal["closed", "pipe"] = "closed"
    stdout_mode: Literal["capture", "discard"] = "capture"
    stderr_mode: Literal["capture", "discard"] = "capture"


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
        "managed": None,
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
