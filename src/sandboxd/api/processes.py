"""``/api/v1/processes``: a thin translation between the wire and the engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal as _signal
import time
from typing import Any

from aiohttp import web

from ..config import SETTINGS_KEY
from ..edge.body import read_json as edge_read_json
from ..engine import (
    Process,
    ProcessTable,
    StdinNotWritable,
    follow,
    name_problem,
    snapshot_lines,
)
from . import sse
from .error_map import engine_errors
from .errors import ApiError, bad_request
from .models import (
    STREAMS,
    RunRequest,
    SignalRequest,
    StartProcessRequest,
    output_body,
    parse,
    process_info,
    to_spawn_spec,
)

routes = web.RouteTableDef()

TABLE: web.AppKey[ProcessTable] = web.AppKey("process_table", ProcessTable)
MAX_JSON_BODY = 1 << 20
KILL_WAIT_S = 5.0


def _table(request: web.Request) -> ProcessTable:
    return request.app[TABLE]


# No pid has more digits than this (pid_max is at most 2**22).


def _process(request: web.Request) -> Process:
    with engine_errors():
        return _table(request).get(request.match_info["p"])


async def read_json(request: web.Request) -> Any:
    # The shared edge's reader: type, size, time, depth and NaN bounds (edge/body.py).
    return await edge_read_json(request)


def _idle_timeout(request: web.Request) -> float:
    """The daemon's idle timeout, which also bounds how long a body may trickle."""
    settings = request.app.get(SETTINGS_KEY)
    return settings.idle_timeout_s if settings is not None else 60.0


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(body).encode(), content_type="application/json"
    )


def _start(table: ProcessTable, req: Any, **kwargs: Any) -> Process:
    with engine_errors():
        return table.start(to_spawn_spec(req), **kwargs)


@routes.post("/api/v1/processes")
async def start_process(request: web.Request) -> web.Response:
    req = parse(StartProcessRequest, await read_json(request))
    table = _table(request)
    if not req.managed:
        return _json(process_info(_start(table, req)), status=201)
    if req.name is not None and (problem := name_problem(req.name)):
        raise bad_request("INVALID_NAME", problem)
    with engine_errors():
        proc = table.start_managed(
            to_spawn_spec(req),
            name=req.name,
            restart=req.restart_config(),
            health_check=req.health_check.config() if req.health_check else None,
            stop_grace_s=None if req.stop_grace_ms is None else req.stop_grace_ms / 1000,
        )
    return _json(process_info(proc), status=201)


@routes.get("/api/v1/processes")
async def list_processes(request: web.Request) -> web.Response:
    return _json({"processes": [process_info(p) for p in _table(request).all()]})


@routes.get("/api/v1/processes/{p}")
async def get_process(request: web.Request) -> web.Response:
    return _json(process_info(_process(request)))


@routes.delete("/api/v1/processes/{p}")
async def kill_process(request: web.Request) -> web.Response:
    """Kill the whole tree; idempotent on a process that already exited.

    A managed process is stopped for good: SIGTERM to its tree, SIGKILL after
    the stop grace, and no restart ever after.
    """
    proc = _process(request)
    if proc.supervisor is not None:
        # The engine owns the stop: if this client gives up, it completes anyway.
        sup = proc.supervisor
        await sup.wait_deleted(sup.delete())
        return web.Response(status=204)
    proc.kill_tree()
    if proc.running:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.exited), KILL_WAIT_S)
    return web.Response(status=204)


@routes.post("/api/v1/processes/{p}/restart")
async def restart_process(request: web.Request) -> web.Response:
    proc = _process(request)
    sup = proc.supervisor
    if sup is None:
        raise bad_request(
            "NOT_MANAGED",
            f"Process {proc.pid} is not managed; only processes started with a name, "
            "restart policy or health check can be restarted",
        )
    with engine_errors():
        new = await sup.restart_now()
    return _json(process_info(new))


@routes.post("/api/v1/processes/{p}/signal")
async def send_signal(request: web.Request) -> web.Response:
    proc = _process(request)
    req = parse(SignalRequest, await read_json(request))
    if not 1 <= req.signal <= _signal.SIGRTMAX:
        raise bad_request(
            "INVALID_SIGNAL", f"invalid signal {req.signal}: expected 1..{int(_signal.SIGRTMAX)}"
        )
    if not proc.running:
        raise bad_request("PROCESS_NOT_RUNNING", f"Process {proc.pid} is not running")
    proc.signal(req.signal)
    return _json({"success": True})


@routes.post("/api/v1/processes/{p}/stdin")
async def write_stdin(request: web.Request) -> web.Response:
    proc = _process(request)
    with engine_errors():
        if not proc.stdin_writable:
            raise StdinNotWritable(proc.stdin_problem())
        idle = _idle_timeout(request)
        while True:
            try:
                # Idle, not total: a big body may take long, a silent client may not.
                async with asyncio.timeout(idle):
                    chunk = await request.content.readany()
            except TimeoutError:
                raise ApiError(408, "REQUEST_TIMEOUT", f"no body bytes for {idle:g} s") from None
            if not chunk:
                break
            await proc.write_stdin(chunk)
    return web.Response(status=204)


@routes.post("/api/v1/processes/{p}/stdin/close")
async def close_stdin(request: web.Request) -> web.Response:
    proc = _process(request)
    if not proc.stdin_piped:
        raise bad_request(
            "STDIN_NOT_WRITABLE", f"Process {proc.pid} was not started with stdin_mode=pipe"
        )
    proc.close_stdin()
    return web.Response(status=204)


def _stream_names(request: web.Request) -> tuple[int, ...]:
    return STREAMS[request.match_info["stream"]]


@routes.get(r"/api/v1/processes/{p}/{stream:stdout|stderr|output}")
async def get_output(request: web.Request) -> web.Response:
    proc = _process(request)
    streams = _stream_names(request)
    max_line = _table(request).settings.max_line_bytes
    lines = [ln.text for ln in snapshot_lines(proc.output, streams, max_line)]
    return _json(output_body(proc, lines, streams))


@routes.get(r"/api/v1/processes/{p}/{stream:stdout|stderr}/raw")
async def get_raw_output(request: web.Request) -> web.Response:
    """Beyond the contract: the retained bytes exactly as the process wrote them."""
    proc = _process(request)
    (stream,) = _stream_names(request)
    return web.Response(
        body=proc.output.bytes_of(stream),
        content_type="application/octet-stream",
        headers={
            "X-Sandboxd-Dropped-Bytes": str(proc.output.dropped[stream]),
            "X-Sandboxd-Total-Bytes": str(proc.output.total[stream]),
        },
    )


@routes.get(r"/api/v1/processes/{p}/{stream:stdout|stderr|output}/follow")
async def follow_output(request: web.Request) -> web.StreamResponse:
    proc = _process(request)
    streams = _stream_names(request)
    resp = await sse.open_stream(request)
    with contextlib.suppress(ConnectionResetError):  # the follower went away: nothing to do
        await _pump(request, resp, proc, streams, tag_stream=len(streams) > 1)
        await resp.write(sse.EOF_EVENT)
        await resp.write_eof()
    return resp


async def _pump(
    request: web.Request,
    resp: web.StreamResponse,
    proc: Process,
    streams: tuple[int, ...],
    *,
    tag_stream: bool,
) -> None:
    """Send every line of ``streams`` until the process is over and drained."""
    table = _table(request)
    budget = table.egress_budget
    reported = 0
    async for batch in follow(
        proc.output, streams, max_line=table.settings.max_line_bytes, budget=budget
    ):
        started = time.perf_counter()
        out = []
        if batch.missed_chunks:
            dropped = sum(proc.output.dropped[s] for s in streams)
            if dropped > reported:
                out.append(sse.dropped_event(dropped))
                reported = dropped
        if batch.lines:
            out.append(sse.output_events(batch.lines, tag_stream))
        if batch.idle:
            out.append(sse.KEEPALIVE)
        if out:
            data = b"".join(out)
            budget.charge(time.perf_counter() - started)
            await resp.write(data)


@routes.post("/api/v1/processes/run")
async def run_process(request: web.Request) -> web.StreamResponse:
    """Start, stream output, report the exit; the request owns the process's unit.

    The process's whole tree is killed when the request ends: after the exit
    and the drain grace, on ``timeout``, or when the client goes away first.
    """
    req = parse(RunRequest, await read_json(request))
    proc = _start(_table(request), req, timeout=req.deadline, kill_tree_on_settle=True)
    resp = web.StreamResponse()
    try:
        resp = await sse.open_stream(request)
        await resp.write(
            sse.event(
                "started",
                {"handle": proc.handle, "pid": proc.pid, "started_at": proc.started_at_ms},
            )
        )
        await _pump(request, resp, proc, STREAMS["output"], tag_stream=True)
        ex = await proc.exited
        payload: dict[str, Any] = {
            "exit_code": ex.exit_code,
            "signal": ex.signal,
            "reason": ex.reason.value,
        }
        if ex.oom_killed:
            payload["oom_killed"] = True
        await resp.write(sse.event("exit", payload))
        await resp.write_eof()
        return resp
    except ConnectionResetError:
        return resp  # the client went away; the finally below ends the process
    finally:
        if proc.running or not proc.output.settled:
            proc.kill_tree()
