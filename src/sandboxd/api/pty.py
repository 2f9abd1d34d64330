"""``/api/v1/pty``: terminal sessions, and the websocket that drives them.

Thin on purpose: validation and frame (de)coding here, everything with state in
``engine/pty/``. Wire format (docs/terminals-and-tunnels.md), all
frames binary, text frames ignored:

* client → server: ``0x00`` + input bytes, ``0x01`` + cols (u16 BE) + rows
  (u16 BE), ``0x02`` READY;
* server → client: ``0x00`` + output bytes, ``0x03`` + exit code (i32 BE)
  followed by a close frame ``1000 exit:N``.

Errors before the upgrade are JSON: 404 ``SESSION_NOT_FOUND`` and 403
``INVALID_TOKEN`` on the websocket route, 404 ``NOT_FOUND`` on the REST routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import struct
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from aiohttp import web
from aiohttp.http import WSMsgType  # not `from aiohttp`: see sandboxd.leanimports
from pydantic import Field, field_validator

from ..engine import (
    DEFAULT_COLS,
    DEFAULT_ROWS,
    Attachment,
    Closed,
    Exited,
    InputRateExceeded,
    PtyManager,
    PtySession,
    PtySettings,
)
from . import models, processes
from .error_map import engine_errors
from .errors import ApiError, bad_request, not_found

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

MANAGER: web.AppKey[PtyManager] = web.AppKey("pty_manager", PtyManager)
# Optional: set by the app factory (e.g. from CLI flags) before startup;
# otherwise the settings come from SANDBOXD_PTY_* environment variables.
SETTINGS: web.AppKey[PtySettings] = web.AppKey("pty_settings", PtySettings)

OP_DATA = 0x00
OP_RESIZE = 0x01
OP_READY = 0x02
OP_EXIT = 0x03
MAX_FRAME = 64 << 10  # client frames: 64 KiB payload + the opcode byte
HEARTBEAT_S = 30.0
# The sync SDK (websocket-client) applies its connect_timeout (default 10 s) to
# every recv: a terminal that prints nothing for 10 s would fail the client.
# Any frame resets that clock, so a client that was sent nothing for this long
# gets a ping.
KEEPALIVE_S = 3.0


async def lifespan(app: web.Application) -> AsyncIterator[None]:
    table = app[processes.TABLE]
    settings = app.get(SETTINGS) or PtySettings.from_env(
        memory_limit=table.settings.process_memory_limit,
        pids_limit=table.settings.process_pids_limit,
    )
    manager = PtyManager(
        settings,
        cgroups=table.cgroups,
        base_env=table.base_env,
        cwd=table.cwd,
        # The table's orphan reaper skips these pids (see engine/pty.py).
        guard_pids=table.guarded_pids,
        ingest_budget=table.ingest_budget,
        egress_budget=table.egress_budget,
        child_oom_score_adj=table.child_oom_score_adj,
        # One owner for every stop of a tree, processes and terminals alike.
        stops=table.stops,
    )
    app[MANAGER] = manager
    yield
    await manager.close()


async def on_shutdown(app: web.Application) -> None:
    """Close every client before the server waits for open handlers to finish."""
    manager = app.get(MANAGER)
    if manager is not None:
        for session in manager.all():
            session.terminate()


def _manager(request: web.Request) -> PtyManager:
    return request.app[MANAGER]


def _session(request: web.Request) -> PtySession:
    sid = request.match_info["sid"]
    session = _manager(request).get(sid)
    if session is None:
        raise not_found(f"PTY session {sid} not found")
    return session


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(body).encode(), content_type="application/json"
    )


# --- request validation ---

# The first field that fails names the code (see ``models.parse``); fields are
# declared in the order the checks ran before they were a model.
FIELD_CODES = {
    "command": "INVALID_COMMAND",
    "working_dir": "INVALID_WORKING_DIR",
    "rows": "INVALID_SIZE",
    "cols": "INVALID_SIZE",
    "args": "INVALID_ARGS",
    "env": "INVALID_ENV",
}
# JSON null means "the default" (24 rows, 80 columns); sizes are clamped, not refused.
Size = Annotated[
    int | None,
    Field(description="Clamped to 1..500 rows and 1..1000 columns; null means the default."),
]


class CreatePtyRequest(models.Strict):
    command: Annotated[models.Text, Field(min_length=1)]
    working_dir: models.Text | None = None
    rows: Size = None
    cols: Size = None
    args: list[models.Text] | None = None
    env: Annotated[dict[str, models.Text] | None, Field(json_schema_extra=models.ENV_SCHEMA)] = None

    @field_validator("env")
    @classmethod
    def _check_env(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return None if v is None else models.check_env(v)

    def size(self) -> tuple[int, int]:
        return (
            DEFAULT_ROWS if self.rows is None else self.rows,
            DEFAULT_COLS if self.cols is None else self.cols,
        )


class ResizeRequest(models.Strict):
    # Both keys are required; null still means the default, as it did before.
    rows: Size
    cols: Size

    def size(self) -> tuple[int, int]:
        return (
            DEFAULT_ROWS if self.rows is None else self.rows,
            DEFAULT_COLS if self.cols is None else self.cols,
        )


# --- REST ---


@routes.post("/api/v1/pty")
async def create_session(request: web.Request) -> web.Response:
    req = models.parse(CreatePtyRequest, await processes.read_json(request), FIELD_CODES)
    rows, cols = req.size()
    # The same answers as a process start (error_map.py).
    with engine_errors():
        session = _manager(request).create(
            req.command,
            args=req.args or [],
            env=req.env or {},
            working_dir=req.working_dir,
            rows=rows,
            cols=cols,
        )
    # The contract needs session_id and token; the rest is the session's info.
    return _json({**session.info(), "token": session.token}, status=201)


@routes.get("/api/v1/pty")
async def list_sessions(request: web.Request) -> web.Response:
    return _json({"sessions": [s.info() for s in _manager(request).all()]})


@routes.get("/api/v1/pty/{sid}")
async def get_session(request: web.Request) -> web.Response:
    return _json(_session(request).info())


@routes.post("/api/v1/pty/{sid}/resize")
async def resize_session(request: web.Request) -> web.Response:
    session = _session(request)
    req = models.parse(ResizeRequest, await processes.read_json(request), FIELD_CODES)
    session.resize(*req.size())  # clamped; a no-op on an ended session
    return web.Response(status=204)


@routes.delete("/api/v1/pty/{sid}")
async def delete_session(request: web.Request) -> web.Response:
    sid = request.match_info["sid"]
    if not await _manager(request).delete(sid):
        raise not_found(f"PTY session {sid} not found")
    return web.Response(status=204)


# --- websocket ---


class WsQuery(models.Strict):
    token: str | None = Field(
        default=None, description="The session token (or the X-PTY-Token header)."
    )


def _token_ok(expected: str, request: web.Request) -> bool:
    want = expected.encode()
    ok = False
    query = WsQuery.model_validate({"token": request.query.get("token")})
    # Both places are checked (no short cut), so timing says nothing either.
    for given in (query.token, request.headers.get("X-PTY-Token")):
        if given is not None:
            ok |= hmac.compare_digest(given.encode("utf-8", "replace"), want)
    return ok


@routes.get("/api/v1/pty/{sid}/ws")
async def session_ws(request: web.Request) -> web.StreamResponse:
    sid = request.match_info["sid"]
    session = _manager(request).get(sid)
    if session is None:
        raise ApiError(404, "SESSION_NOT_FOUND", f"PTY session {sid} not found")
    if not _token_ok(session.token, request):
        raise ApiError(403, "INVALID_TOKEN", "invalid or missing PTY session token")
    # aiohttp refuses a frame whose length is >= max_msg_size, hence the +2.
    # No permessage-deflate: it would add CPU and latency to every keystroke echo.
    ws = web.WebSocketResponse(max_msg_size=MAX_FRAME + 2, heartbeat=HEARTBEAT_S, compress=False)
    if not ws.can_prepare(request).ok:
        raise bad_request("WEBSOCKET_REQUIRED", "this route needs a websocket upgrade")
    await ws.prepare(request)
    att = session.attach()
    sender = asyncio.create_task(_send_output(ws, att), name=f"pty-{sid}-out")
    try:
        await _receive_input(ws, session, att, sender)
    finally:
        att.detach()
        if not sender.done():
            sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender
        if not ws.closed:
            with contextlib.suppress(ConnectionError):
                await ws.close()
    return ws


async def _send_output(ws: web.WebSocketResponse, att: Attachment) -> None:
    budget = att.session.manager.egress_budget
    while True:
        if budget is not None:
            await budget.turn()  # a fair share of the loop for bulk output
        started = time.perf_counter()
        event = att.poll()
        if event is None:
            # asyncio.wait on the shared future, not wait_for(att.next()): no Task
            # and no shield per output frame (measured: wait_for was 12% of the
            # echo path), and a timeout leaves the shared future alone.
            done, _ = await asyncio.wait((att.changed(),), timeout=KEEPALIVE_S)
            if not done:
                await ws.ping()
            continue
        if isinstance(event, bytes):
            await ws.send_bytes(b"\x00" + event)
            if budget is not None:
                budget.charge(time.perf_counter() - started)
        elif isinstance(event, Exited):
            await ws.send_bytes(struct.pack(">Bi", OP_EXIT, event.exit_code))
            await ws.close(code=1000, message=f"exit:{event.exit_code}".encode())
            return
        elif isinstance(event, Closed):
            await ws.close(code=event.code, message=event.reason.encode())
            return


async def _receive_input(
    ws: web.WebSocketResponse, session: PtySession, att: Attachment, sender: asyncio.Task[None]
) -> None:
    async for msg in ws:
        if sender.done():
            return
        if msg.type is not WSMsgType.BINARY:
            continue  # text frames are ignored; close/error end the loop
        data: bytes = msg.data
        if not data:
            continue
        op = data[0]
        if op == OP_DATA:
            try:
                await session.write_input(data[1:])
            except InputRateExceeded:
                await ws.close(code=1008, message=b"input rate limit exceeded")
                return
        elif op == OP_RESIZE and len(data) >= 5:
            cols, rows = struct.unpack(">HH", data[1:5])
            session.resize(rows, cols)
        elif op == OP_READY:
            att.set_ready()
        # Unknown opcodes and short frames are ignored, like text frames.
