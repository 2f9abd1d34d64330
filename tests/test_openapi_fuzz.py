"""Schemathesis against a live daemon, with the document the daemon serves.

Every non-websocket operation gets a few generated requests, valid ones and
(on purpose) invalid ones; every answer must be no 5xx, arrive in time, and
conform to the document: a documented status, the documented content type,
a body that validates against the schema (error ``code`` values included).

Bounded: a handful of examples per operation, no shrinking, a request timeout,
the whole run well under a minute. ``SANDBOXD_FUZZ_EXAMPLES=200`` explores
further by hand; failures are then reported unshrunk, with a curl line.

The fuzzed daemon must not be able to hurt the machine it runs on:

* its ``PATH`` is a directory holding only ``true``, ``false``, ``echo`` and
  ``printf`` and ``cat``, and generated commands with a ``/`` or an ``env`` overriding
  ``PATH``/``LD_*`` are rewritten (see :func:`_make_safe`);
* file paths are made relative, so they land under the daemon's working
  directory (a fresh temp dir; ``..`` is refused by the daemon), and that
  directory holds no symlink a write could follow out of it;
* whatever a generated request started (processes, terminals) is deleted
  right after.
"""

from __future__ import annotations

import collections
import os
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import requests
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import Daemon

HARMLESS = ("true", "false", "echo", "printf", "cat")
EXAMPLES = int(os.environ.get("SANDBOXD_FUZZ_EXAMPLES", "10"))
NEGATIVE_EXAMPLES = max(1, EXAMPLES * 2 // 3)
REQUEST_TIMEOUT_S = 5.0
TOTAL_BUDGET_S = 60.0
POSITIVE_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
NEGATIVE_CHECKS = [*POSITIVE_CHECKS, negative_data_rejection]


def _harmless_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Outside the daemon's working directory: a fuzzed PUT must never reach
    # these symlinks (it would follow them and overwrite /usr/bin/true).
    bindir = tmp_path_factory.mktemp("fuzz-bin")
    for name in HARMLESS:
        target = shutil.which(name)
        assert target, f"{name} is not on PATH"
        (bindir / name).symlink_to(target)
    return bindir


CREATORS = ("POST /api/v1/processes", "PUT /api/v1/files", "POST /api/v1/pty")
_STARTS = ("/api/v1/processes", "/api/v1/processes/run", "/api/v1/pty")


def _unsafe(case: Any) -> bool:
    """Whether a generated request could reach outside the sandbox; such cases are dropped."""
    path = case.operation.path
    if path.startswith("/api/v1/files") and isinstance(case.query, dict):
        raw = case.query.get("path")
        # Relative paths only: under the daemon's temp cwd ("..": refused by the daemon).
        return isinstance(raw, str) and raw.startswith("/")
    body = case.body
    if path in _STARTS and isinstance(body, dict):
        command = body.get("command")
        env = body.get("env")
        return (isinstance(command, str) and "/" in command) or (
            isinstance(env, dict)
            and any(isinstance(k, str) and (k == "PATH" or k.startswith("LD_")) for k in env)
        )
    return False


class Steering:
    """Point two thirds of the valid cases at things that exist.

    Random commands are never on PATH and random pids never exist, so left
    alone the fuzzer would only ever see 400 and 404. Steering is a pure
    function of the generated value, so a run stays reproducible; it is
    applied to valid (positive) cases only, never to invalid ones it could
    make valid.
    """

    def __init__(self) -> None:
        self.processes: list[str] = []  # pids and names of started processes
        self.sessions: list[str] = []  # ids of live PTY sessions
        self.files: list[str] = []  # paths written

    @staticmethod
    def _pick(value: object, known: list[str]) -> str | None:
        n = len(str(value))
        return known[n % len(known)] if known and n % 3 else None

    def steer(self, case: Any) -> None:
        path = case.operation.path
        params = case.path_parameters or {}
        if "p" in params and (pick := self._pick(params["p"], self.processes)):
            params["p"] = pick
        if "sid" in params and (pick := self._pick(params["sid"], self.sessions)):
            params["sid"] = pick
        query = case.query if isinstance(case.query, dict) else {}
        raw = query.get("path")
        if isinstance(raw, str) and path.startswith("/api/v1/files"):
            known = ["."] if path.endswith("/list") else self.files
            if pick := self._pick(raw, known):
                query["path"] = pick
        body = case.body
        if path in _STARTS and isinstance(body, dict):
            command = body.get("command")
            if isinstance(command, str) and len(command) % 3:
                body["command"] = HARMLESS[len(command) % len(HARMLESS)]
            for key in ("working_dir", "user"):
                if key in body and len(str(body[key])) % 3:
                    del body[key]

    def record(self, case: Any, response: requests.Response) -> None:
        written = (case.method.upper(), case.operation.path, response.status_code)
        if written == ("PUT", "/api/v1/files", 204) and case.query["path"] not in self.files:
            self.files.append(case.query["path"])
        if response.status_code != 201:
            return
        body = response.json()
        if case.operation.path == "/api/v1/processes":
            self.processes.append(str(body["pid"]))
            if body["managed"] and body["managed"]["name"]:
                self.processes.append(body["managed"]["name"])
        elif case.operation.path == "/api/v1/pty":
            self.sessions.append(body["session_id"])


def _clean_up(
    http: httpx.Client, steering: Steering, case: Any, response: requests.Response
) -> None:
    """Stop what a generated request started: processes at once, terminals beyond a few.

    Process records outlive the processes, so later cases still find them
    (exited); a few terminals stay alive for the session routes to find.
    """
    if case.method.upper() != "POST" or response.status_code != 201:
        return
    body = response.json()
    if case.operation.path == "/api/v1/processes":
        http.delete(f"/api/v1/processes/{body['pid']}")
    elif case.operation.path == "/api/v1/pty":
        while len(steering.sessions) > 4:
            http.delete(f"/api/v1/pty/{steering.sessions.pop(0)}")


def _fuzz_operation(
    operation: Any,
    mode: Any,
    examples: int,
    run_case: Callable[[Any], None],
) -> str | None:
    """Run ``examples`` generated cases; the first failure, as text, or None."""

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=examples,
        deadline=(REQUEST_TIMEOUT_S + 5) * 1000,
        derandomize=os.environ.get("SANDBOXD_FUZZ_RANDOM") is None,
        database=None,
        # Shrinking could run for minutes; the unshrunk case is reported instead.
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
        print_blob=False,
    )
    def run(case: Any) -> None:
        run_case(case)

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        return None  # negative mode, nothing to negate (no parameters, or only a path id)
    # A check failure (schemathesis raises a BaseExceptionGroup), a timeout, a
    # connection error: all reported together at the end, not one at a time.
    except (Exception, BaseExceptionGroup) as exc:
        return (
            str(exc)
            if isinstance(exc, BaseExceptionGroup)
            else "".join(traceback.format_exception_only(exc)).strip()
        )
    return None


def test_fuzzed_requests_get_documented_answers(
    make_daemon: Callable[..., Daemon], tmp_path_factory: pytest.TempPathFactory
) -> None:
    bindir = _harmless_bin(tmp_path_factory)
    daemon = make_daemon(
        "--process-pids-limit", "32", "--output-cap", "64K", env={"PATH": str(bindir)}
    )
    schema = schemathesis.openapi.from_url(f"{daemon.url}/api/v1/openapi.json")
    failures: list[str] = []
    steering = Steering()
    seen: dict[str, collections.Counter[int]] = {}
    fuzzed: list[str] = []
    started = time.monotonic()
    with requests.Session() as session, daemon.http() as http:

        def run_case(case: Any) -> None:
            hypothesis.assume(not _unsafe(case))
            negative = (
                case.meta is not None and case.meta.generation.mode == GenerationMode.NEGATIVE
            )
            if not negative:
                steering.steer(case)
            response = case.call(base_url=daemon.url, session=session, timeout=REQUEST_TIMEOUT_S)
            seen.setdefault(case.operation.label, collections.Counter())[response.status_code] += 1
            try:
                case.validate_response(
                    response, checks=NEGATIVE_CHECKS if negative else POSITIVE_CHECKS
                )
            finally:
                steering.record(case, response)
                _clean_up(http, steering, case, response)

        operations = [r.ok() for r in schema.get_all_operations()]
        # What creates things first, so that steering has things to point at;
        # what deletes them last.
        operations.sort(key=lambda op: (op.label not in CREATORS, op.method.upper() == "DELETE"))
        for operation in operations:
            if operation.definition.raw.get("x-websocket"):
                continue  # see test_auth_matrix.py, test_pty.py and test_tunnels.py
            fuzzed.append(operation.label)
            for mode, examples in (
                (GenerationMode.POSITIVE, EXAMPLES),
                (GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES),
            ):
                problem = _fuzz_operation(operation, mode, examples, run_case)
                if problem:
                    failures.append(f"{operation.label} [{mode.value}]: {problem}")
        elapsed = time.monotonic() - started
        for sid in steering.sessions:
            http.delete(f"/api/v1/pty/{sid}")
        # The daemon is still there, still quick, and logged no unhandled error.
        t0 = time.monotonic()
        assert http.get("/api/v1/health").status_code == 200
        assert time.monotonic() - t0 < 1
    # What the run reached, for whoever reads the output (pytest -s or a failure).
    print("\n".join(f"{op}: {dict(sorted(c.items()))}" for op, c in seen.items()))
    assert daemon.proc.poll() is None
    assert len(fuzzed) >= 20, fuzzed
    assert not failures, "\n\n".join(failures)
    assert "Traceback" not in daemon.log(), daemon.log()[-5000:]
    if EXAMPLES <= 10:
        assert elapsed < TOTAL_BUDGET_S, f"the fuzz run took {elapsed:.1f} s"
