"""Daemon logs: text by default, JSON lines on request, trace ids, no secrets."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from sandboxd.observability.logs import REDACTED, Redactor, setup_logging
from sandboxd.observability.tracing import current_trace, parse_traceparent

from .conftest import Daemon, free_port, wait_for

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


def request_lines(d: Daemon, needle: str) -> list[str]:
    return [line for line in d.log().splitlines() if needle in line]


# --- traceparent parsing (W3C Trace Context, level 1) ---


@pytest.mark.parametrize(
    ("header", "trace_id"),
    [
        (TRACEPARENT, TRACE),
        (f"  {TRACEPARENT} ", TRACE),
        (f"01-{TRACE}-00f067aa0ba902b7-01-future", TRACE),  # a later version may add fields
        (None, None),
        ("", None),
        ("garbage", None),
        (f"00-{TRACE.upper()}-00f067aa0ba902b7-01", None),  # upper case is invalid
        (f"ff-{TRACE}-00f067aa0ba902b7-01", None),
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", None),
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"00-{TRACE}-00f067aa0ba902b7-01-extra", None),
    ],
)
def test_parse_traceparent(header: str | None, trace_id: str | None) -> None:
    ctx = parse_traceparent(header)
    assert (ctx.trace_id if ctx else None) == trace_id


def test_redactor() -> None:
    r = Redactor(['s3cr"et', "tk9"])
    assert r.redact("Authorization: Bearer abc.def") == f"Authorization: Bearer {REDACTED}"
    assert r.redact("GET /ws?token=abcd&x=1") == f"GET /ws?token={REDACTED}&x=1"
    assert r.redact('{"X-PTY-Token": "abc"}') == f'{{"X-PTY-Token": "{REDACTED}"}}'
    assert r.redact(json.dumps({"m": 'has s3cr"et'})) == json.dumps({"m": f"has {REDACTED}"})
    assert r.redact("a tk9 b") == f"a {REDACTED} b"
    assert r.redact("(bearer token required)") == "(bearer token required)"


def test_formatters_carry_the_trace_id_and_redact() -> None:
    for fmt in ("text", "json"):
        buf = io.StringIO()
        handler = setup_logging("info", fmt, secrets=["hunter2"], stream=buf)
        try:
            ctx_token = current_trace.set(parse_traceparent(TRACEPARENT))
            logging.getLogger("t").info("password is %s", "hunter2", extra={"route": "/x"})
            current_trace.reset(ctx_token)
            logging.getLogger("t").info("outside any request")
        finally:
            logging.getLogger().removeHandler(handler)
        first, second = buf.getvalue().splitlines()
        assert "hunter2" not in buf.getvalue()
        if fmt == "text":
            assert first.endswith(f"password is {REDACTED} trace_id={TRACE}")
            assert "trace_id" not in second
        else:
            body = json.loads(first)
            assert body["trace_id"] == TRACE and body["route"] == "/x"
            assert body["message"] == f"password is {REDACTED}"
            assert {"time", "level", "logger"} <= body.keys()
            assert "trace_id" not in json.loads(second)


# --- against a live daemon ---


def test_text_request_lines_carry_the_sdk_trace_id(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon()
    sbx = d.sandbox()
    res = sbx.run("echo", args=["hi"])
    trace_id = res.trace_id
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id)
    wait_for(lambda: request_lines(d, "POST /api/v1/processes/run"))
    (line,) = request_lines(d, "POST /api/v1/processes/run")
    assert re.search(r" INFO sandboxd\.http: POST /api/v1/processes/run 200 [\d.]+ms", line)
    assert line.endswith(f"trace_id={trace_id}")
    # Every request the SDK sent is logged with its own trace id.
    p = sbx.start_process("true")
    wait_for(lambda: request_lines(d, "POST /api/v1/processes 201"))
    assert request_lines(d, "POST /api/v1/processes 201")[0].endswith(f"trace_id={p.trace_id}")


def test_json_lines_flag(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon("--log-format", "json")
    with d.http() as http:
        http.get("/api/v1/processes/77777", headers={"traceparent": TRACEPARENT})
    wait_for(lambda: request_lines(d, "/api/v1/processes/77777"))
    records = [json.loads(line) for line in d.log().splitlines()]  # every line is JSON
    (rec,) = [r for r in records if r.get("path") == "/api/v1/processes/77777"]
    assert rec["trace_id"] == TRACE
    assert rec["route"] == "/api/v1/processes/{p}"
    assert (rec["method"], rec["status"], rec["level"]) == ("GET", 404, "info")
    assert rec["duration_ms"] >= 0
    assert rec["logger"] == "sandboxd.http"
    assert any("listening on" in r["message"] for r in records)


def test_json_lines_from_the_environment(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(env={"SANDBOXD_LOG_FORMAT": "json"})
    assert all(json.loads(line) for line in d.log().splitlines())


def test_bad_log_format_is_a_usage_error() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "sandboxd", "serve", "--log-format", "xml"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "--log-format" in r.stderr


def test_tokens_never_reach_the_log(make_daemon) -> None:  # type: ignore[no-untyped-def]
    secret = "tok-SECRET-8c1f"
    d = make_daemon("--log-level", "debug", token=secret)
    good = {"Authorization": f"Bearer {secret}"}
    wrong = {"Authorization": "Bearer guessed-WRONG-42"}
    httpx.get(f"{d.url}/api/v1/processes", headers=good)
    httpx.get(f"{d.url}/api/v1/processes", headers=wrong)
    httpx.get(f"{d.url}/api/v1/processes?token={secret}", headers=good)
    httpx.get(f"{d.url}/api/v1/pty/nope/ws?token=pty-TOKEN-77", headers=good)
    sbx = d.sandbox()
    sbx.run("sh", args=["-c", f"echo {secret}"])  # in a process's output: not logged either
    wait_for(lambda: len(request_lines(d, "/api/v1/")) >= 5)
    log = d.log()
    for leaked in (secret, "guessed-WRONG-42", "pty-TOKEN-77"):
        assert leaked not in log


def test_daemon_token_is_not_inherited_by_processes(tmp_path: Path) -> None:
    """SANDBOXD_TOKEN is read, then removed before any process is spawned."""
    port = free_port()
    env = {**os.environ, "SANDBOXD_TOKEN": "env-SECRET-31"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandboxd", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": "Bearer env-SECRET-31"}
    try:

        def up() -> bool:
            try:
                return httpx.get(f"{url}/api/v1/health", headers=headers).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=15)
        assert httpx.get(f"{url}/api/v1/health").status_code == 401  # the token is in force
        body = {"command": "sh", "args": ["-c", "env"]}
        with httpx.stream("POST", f"{url}/api/v1/processes/run", json=body, headers=headers) as r:
            text = r.read().decode()
        assert "SANDBOXD_TOKEN" not in text and "env-SECRET-31" not in text
        assert "PATH=" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
