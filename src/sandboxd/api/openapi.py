"""The OpenAPI 3.1 document of the whole API, generated, never written by hand.

Request schemas are the pydantic models the handlers validate with
(``models.py``, ``pty.py``, ``files.py``, ``tunnels.py``); response schemas are
the models of ``schemas.py``, which forbid extra fields. What is left — which
route answers which status with which error ``code`` — is the table below, one
:class:`Operation` per route. ``tests/test_openapi.py`` fails when the router
and this table disagree, and ``tests/test_openapi_fuzz.py`` runs schemathesis
against a live daemon with the document, so a handler that answers anything
undocumented fails the suite.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from .. import __version__
from ..files import errors as fcodes
from . import files, models, pty, schemas, ssh, tunnels

REF = "#/components/schemas/{model}"
JSON = "application/json"
OCTETS = "application/octet-stream"
SSE = "text/event-stream"


@dataclass(frozen=True)
class Reply:
    """One response of one operation.

    ``model`` describes a JSON body; ``media`` a body of another type (its
    schema is a plain string or bytes); ``codes`` the machine codes an error
    body may carry under this status.
    """

    description: str
    model: type[BaseModel] | None = None
    media: Sequence[str] = ()
    codes: Sequence[str] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    sse_events: Sequence[str] = ()


@dataclass(frozen=True)
class Header:
    name: str
    description: str
    required: bool = False


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # the router's template, with regex constraints left out
    operation_id: str
    summary: str
    tag: str
    responses: Mapping[int, Reply]
    description: str = ""
    body: type[BaseModel] | None = None  # a JSON body, validated by this model
    raw_body: str | None = None  # a raw byte body: what it is
    query: type[BaseModel] | None = None  # query parameters, validated by this model
    headers: Sequence[Header] = ()
    # Path parameters with a closed set of values (the router's regex alternatives).
    path_enums: Mapping[str, Sequence[str]] = field(default_factory=dict)
    websocket: bool = False


def error(description: str, *codes: str) -> Reply:
    return Reply(description, schemas.ErrorBody, codes=codes)


# --- codes shared by several operations ---

JSON_BODY_400 = ("INVALID_JSON", "INVALID_REQUEST")
# What a start can fail with before any process exists (engine/spawn.py).
SPAWN_400 = (
    "INVALID_USER",
    "USER_NOT_FOUND",
    "GROUP_NOT_FOUND",
    "INVALID_COMMAND",
    "COMMAND_NOT_FOUND",
    "NOT_EXECUTABLE",
    "INTERPRETER_NOT_FOUND",
    "ARGUMENT_LIST_TOO_LONG",
    "WORKING_DIR_NOT_FOUND",
    "WORKING_DIR_NOT_A_DIRECTORY",
    "SPAWN_FAILED",
)
SPAWN_429 = error("The machine is out of processes, memory or descriptors.", "RESOURCE_EXHAUSTED")
PROCESS_404 = error("No process has this pid or name.", "NOT_FOUND")
SESSION_404 = error("No PTY session has this id.", "NOT_FOUND")

_PATH_PARAMS: dict[str, dict[str, Any]] = {
    "p": {
        "description": "A decimal pid, or the percent-encoded name of a managed process "
        "(an all-digit segment is always a pid).",
        "schema": {"type": "string", "minLength": 1},
    },
    "sid": {"description": "A PTY session id.", "schema": {"type": "string", "minLength": 1}},
    "stream": {"description": "Which output.", "schema": {"type": "string"}},
}


_FILES_STATUS = {
    400: "The path cannot be used for this, or the body was cut short.",
    403: "A `..` component, or the daemon may not do this.",
    404: "Nothing at this path.",
    409: "The file is busy.",
    413: "Too large for the filesystem.",
    429: "The daemon is out of descriptors or memory.",
    500: "An I/O error.",
    507: "The filesystem is full; the old file is intact.",
}


def _files_errors(*codes: str) -> dict[int, Reply]:
    """Group file error codes by the status ``api/files.py`` answers them with."""
    by_status: dict[int, list[str]] = {}
    for code in codes:
        by_status.setdefault(files.STATUS_OF_CODE[code], []).append(code)
    return {status: error(_FILES_STATUS[status], *cs) for status, cs in by_status.items()}


_FILE_OPEN = (
    fcodes.INVALID_PATH,
    fcodes.PATH_TRAVERSAL,
    fcodes.PERMISSION_DENIED,
    fcodes.NOT_FOUND,
    fcodes.RESOURCE_EXHAUSTED,
    fcodes.IO_ERROR,
)

_OUTPUT_ENUM = {"stream": ("stdout", "stderr", "output")}
_RAW_ENUM = {"stream": ("stdout", "stderr")}

# fmt: off
OPERATIONS: tuple[Operation, ...] = (
    # --- system ---
    Operation("GET", "/api/v1/health", "health", "Liveness", "system",
              {200: Reply("Always healthy while the daemon answers.", schemas.Health)}),
    Operation("GET", "/api/v1/info", "daemon_info", "Version, uptime and counters", "system",
              {200: Reply("Daemon facts.", schemas.Info)}),
    Operation("GET", "/api/v1/openapi.json", "openapi", "This document", "system",
              {200: Reply("The OpenAPI 3.1 document.", media=(JSON,))}),
    Operation("GET", "/metrics", "metrics", "Prometheus metrics", "system",
              {200: Reply("Prometheus text format (OpenMetrics when the Accept header asks).",
                          media=("text/plain", "application/openmetrics-text"))}),
    # --- processes ---
    Operation("POST", "/api/v1/processes", "start_process", "Start a process", "processes", {
        201: Reply("Started.", schemas.ProcessInfo),
        400: error("Invalid body, name or start parameters.", *JSON_BODY_400, "INVALID_NAME",
                   *SPAWN_400),
        409: error("A running managed process already has this name.", "NAME_IN_USE"),
        429: SPAWN_429,
        500: error("The process's cgroup could not be created.", "CGROUP_FAILED"),
    }, description="A `name`, `restart` or `health_check` makes the process managed "
                   "(supervised, restartable, addressable by name).",
       body=models.StartProcessRequest),
    Operation("GET", "/api/v1/processes", "list_processes", "List processes", "processes",
              {200: Reply("Every record held, running or exited.", schemas.ProcessList)}),
    Operation("POST", "/api/v1/processes/run", "run_process", "Run to completion, streaming",
              "processes", {
        200: Reply("`started`, then `output` events (tagged with `stream`), then `exit`.",
                   media=(SSE,), sse_events=("started", "output", "dropped", "exit")),
        400: error("Invalid body or start parameters.", *JSON_BODY_400, *SPAWN_400),
        429: SPAWN_429,
        500: error("The process's cgroup could not be created.", "CGROUP_FAILED"),
    }, description="The request owns the process: its whole tree is killed when the stream "
                   "ends, on `timeout` (seconds), or when the client goes away.",
       body=models.RunRequest),
    Operation("GET", "/api/v1/processes/{p}", "get_process", "One process", "processes",
              {200: Reply("The process.", schemas.ProcessInfo), 404: PROCESS_404}),
    Operation("DELETE", "/api/v1/processes/{p}", "kill_process", "Kill a process tree",
              "processes", {204: Reply("Killed, or had already exited."), 404: PROCESS_404},
              description="SIGKILL to the whole tree; a managed process gets SIGTERM, SIGKILL "
                          "after its stop grace, and is never restarted again. Idempotent."),
    Operation("POST", "/api/v1/processes/{p}/restart", "restart_process",
              "Restart a managed process", "processes", {
        200: Reply("The new incarnation (new pid and handle).", schemas.ProcessInfo),
        400: error("Not managed, or the new start failed.", "NOT_MANAGED", *SPAWN_400),
        404: PROCESS_404,
        409: error("The managed process was deleted.", "PROCESS_DELETED"),
        429: SPAWN_429,
        500: error("The process's cgroup could not be created.", "CGROUP_FAILED"),
    }),
    Operation("POST", "/api/v1/processes/{p}/signal", "send_signal", "Signal a process group",
              "processes", {
        200: Reply("Delivered.", schemas.SignalResult),
        400: error("Invalid body or signal, or the process is not running.", *JSON_BODY_400,
                   "INVALID_SIGNAL", "PROCESS_NOT_RUNNING"),
        404: PROCESS_404,
    }, body=models.SignalRequest),
    Operation("POST", "/api/v1/processes/{p}/stdin", "write_stdin", "Write to stdin", "processes", {
        204: Reply("Written."),
        400: error("stdin is not a pipe, is closed, or the process exited.",
                   "STDIN_NOT_WRITABLE"),
        404: PROCESS_404,
        408: error("The body stalled.", "REQUEST_TIMEOUT"),
    }, raw_body="Bytes for the process's stdin, verbatim."),
    Operation("POST", "/api/v1/processes/{p}/stdin/close", "close_stdin", "Close stdin",
              "processes", {
        204: Reply("Closed (also when it already was)."),
        400: error("The process was not started with `stdin_mode: pipe`.", "STDIN_NOT_WRITABLE"),
        404: PROCESS_404,
    }),
    Operation("GET", "/api/v1/processes/{p}/{stream}", "get_output", "Output lines so far",
              "output", {200: Reply("Retained lines of the stream(s).", schemas.OutputBody),
                         404: PROCESS_404}, path_enums=_OUTPUT_ENUM),
    Operation("GET", "/api/v1/processes/{p}/{stream}/raw", "get_raw_output",
              "Output bytes so far", "output", {
        200: Reply("The retained bytes, exactly as written.", media=(OCTETS,), headers={
            "X-Sandboxd-Dropped-Bytes": "Bytes dropped by the output cap.",
            "X-Sandboxd-Total-Bytes": "Bytes the stream produced in all.",
        }),
        404: PROCESS_404,
    }, path_enums=_RAW_ENUM),
    Operation("GET", "/api/v1/processes/{p}/{stream}/follow", "follow_output", "Follow output",
              "output", {
        200: Reply("Replays retained lines, then live ones; `eof` once the process has exited "
                   "and its pipes are drained, then the response ends.",
                   media=(SSE,), sse_events=("output", "dropped", "eof")),
        404: PROCESS_404,
    }, path_enums=_OUTPUT_ENUM),
    # --- files ---
    Operation("GET", "/api/v1/files", "read_file", "Read a file", "files", {
        200: Reply("The whole file (HEAD answers the headers only).", media=(OCTETS,),
                   headers={"ETag": "Size and mtime.", "Last-Modified": "The file's mtime."}),
        206: Reply("The requested byte range.", media=(OCTETS,),
                   headers={"Content-Range": "Which bytes, of how many."}),
        416: error("No byte of the range lies within the file.", "RANGE_NOT_SATISFIABLE"),
        **_files_errors(*_FILE_OPEN, fcodes.IS_DIRECTORY, fcodes.NOT_A_REGULAR_FILE,
                        fcodes.FILE_BUSY),
    }, query=files.PathQuery, headers=(
        Header("Range", "One `bytes=` range; anything else is ignored (the whole file)."),
        Header("If-Range", "An ETag or HTTP date; the range applies only if it still matches."),
    )),
    Operation("PUT", "/api/v1/files", "write_file", "Write a file", "files", {
        204: Reply("Replaced atomically; missing parent directories were created."),
        **_files_errors(*files.STATUS_OF_CODE),
    }, query=files.PathQuery, raw_body="The new content, verbatim (no size limit)."),
    Operation("DELETE", "/api/v1/files", "delete_file", "Delete a file", "files", {
        204: Reply("Deleted (a symlink itself, never its target)."),
        **_files_errors(*_FILE_OPEN, fcodes.IS_DIRECTORY, fcodes.READ_ONLY_FILESYSTEM,
                        fcodes.FILE_BUSY),
    }, query=files.PathQuery),
    Operation("GET", "/api/v1/files/list", "list_directory", "List a directory", "files", {
        200: Reply("The entries, symlinks followed.", schemas.DirectoryListing),
        **_files_errors(*_FILE_OPEN, fcodes.NOT_A_DIRECTORY),
    }, query=files.PathQuery),
    # --- terminals ---
    Operation("POST", "/api/v1/pty", "create_pty", "Start a terminal session", "pty", {
        201: Reply("Started; `token` opens this session's websocket.", schemas.PtyCreated),
        400: error("Invalid body or start parameters.", *JSON_BODY_400, *pty.FIELD_CODES.values(),
                   *SPAWN_400, "CGROUP_FAILED"),
        409: error("The daemon is shutting down.", "SHUTTING_DOWN"),
        429: error("Too many live sessions.", "TOO_MANY_SESSIONS", "RESOURCE_EXHAUSTED"),
    }, body=pty.CreatePtyRequest),
    Operation("GET", "/api/v1/pty", "list_ptys", "List terminal sessions", "pty",
              {200: Reply("Live and recently ended sessions (no tokens).", schemas.PtySessionList)}),
    Operation("GET", "/api/v1/pty/{sid}", "get_pty", "One terminal session", "pty",
              {200: Reply("The session (no token).", schemas.PtySessionInfo), 404: SESSION_404}),
    Operation("POST", "/api/v1/pty/{sid}/resize", "resize_pty", "Resize a terminal", "pty", {
        204: Reply("Resized (clamped); a no-op on an ended session."),
        400: error("Invalid body.", *JSON_BODY_400, "INVALID_SIZE"),
        404: SESSION_404,
    }, body=pty.ResizeRequest),
    Operation("DELETE", "/api/v1/pty/{sid}", "delete_pty", "End a terminal session", "pty",
              {204: Reply("SIGHUP, then SIGKILL after a grace; the session is gone."),
               404: SESSION_404}),
    Operation("GET", "/api/v1/pty/{sid}/ws", "pty_websocket", "Attach to a terminal", "pty", {
        101: Reply("Switching to the websocket. Binary frames only. Client: `0x00`+input, "
                   "`0x01`+cols(u16 BE)+rows(u16 BE), `0x02` ready. Server: `0x00`+output, "
                   "`0x03`+exit code (i32 BE), then close 1000 `exit:N`."),
        400: error("Not a websocket upgrade.", "WEBSOCKET_REQUIRED"),
        403: error("The session token is missing or wrong.", "INVALID_TOKEN"),
        404: error("No PTY session has this id.", "SESSION_NOT_FOUND"),
    }, query=pty.WsQuery, headers=(
        Header("X-PTY-Token", "The session token (or the `token` query parameter)."),
    ), websocket=True),
    # --- tunnels ---
    Operation("GET", "/api/v1/tunnels/tcp", "tcp_tunnel", "Tunnel to a loopback port", "tunnels", {
        101: Reply("Switching to the websocket: binary frames carry the TCP bytes both ways; "
                   "either side closing closes the other. Text frames close with 1003."),
        400: error("Bad port, or not a websocket upgrade.", "INVALID_PORT", "WEBSOCKET_REQUIRED"),
        502: error("127.0.0.1:port could not be reached (checked before the upgrade).",
                   "CONNECTION_REFUSED", "CONNECTION_FAILED", "CONNECTION_TIMEOUT"),
    }, query=tunnels.TunnelQuery, websocket=True),
    # --- sockets ---
    Operation("GET", "/api/v1/sockets", "list_sockets", "TCP sockets and their holders",
              "system", {200: Reply("Beyond the contract: every TCP socket of the sandbox, "
                                    "with the processes holding it.", schemas.SocketList)}),
    # --- ssh ---
    Operation("GET", "/api/v1/ssh/status", "ssh_status", "SSH server status", "ssh",
              {200: Reply("Whether the SSH server runs, and its host key.", schemas.SshStatus)}),
    Operation("POST", "/api/v1/ssh/enable", "ssh_enable", "Start the SSH server", "ssh", {
        200: Reply("Listening on the sandbox's 127.0.0.1; only `proxy_pubkey` may log in.",
                   schemas.SshStatus),
        400: error("Invalid body, key or user.", *JSON_BODY_400, "INVALID_PUBLIC_KEY",
                   "INVALID_USER", "USER_NOT_FOUND"),
        409: error("The configured port is taken.", "SSH_PORT_UNAVAILABLE"),
    }, description="Idempotent: a second enable replaces the authorized key and keeps the "
                   "host key.", body=ssh.EnableSshRequest),
    Operation("POST", "/api/v1/ssh/disable", "ssh_disable", "Stop the SSH server", "ssh",
              {200: Reply("Stopped; open SSH connections are closed.", schemas.SshStatus)}),
)
# fmt: on

# The body of every JSON-accepting route is read by the edge's read_json (edge/body.py).
_JSON_BODY_ERRORS = {
    408: error("The JSON body did not arrive in time.", "REQUEST_TIMEOUT"),
    413: error("The JSON body is over 1 MiB.", "PAYLOAD_TOO_LARGE"),
    415: error("The body is not sent as application/json.", "UNSUPPORTED_MEDIA_TYPE"),
}
_UNAUTHORIZED = error("The daemon has a token and the request did not carry it.", "UNAUTHORIZED")

_DESCRIPTION = """\
The Tensorlake Sandbox API as served by sandboxd.

* **Auth**: when the daemon is started with a token, every route (this one, `/metrics`
  and the websockets included) needs `Authorization: Bearer <token>`; otherwise 401
  `UNAUTHORIZED`, with no side effect. Without a token there is no auth.
* **Errors** are JSON `{"error": "<message>", "code": "<CODE>"}`; each response lists
  the codes it can carry. Streams (SSE, websockets) report errors this way only before
  they start. The daemon never answers 503 or 504, and 502 only on the tunnel route:
  the SDK retries those, and a retried start would start twice.
* **Browsers**: a request with a foreign `Origin` is 403 `FOREIGN_ORIGIN`, and without a
  token a `Host` that is not a loopback name is 403 `HOST_NOT_ALLOWED` (docs/http-edge.md).
* **Websocket** routes are marked `x-websocket`; they answer 101 to an upgrade.
* **Server-sent events**: the schema of a `text/event-stream` response describes one
  event (OpenAPI 3.2's `itemSchema`): its `event:` name and its `data:`, a JSON document
  described by `contentSchema`. Every event ends with a blank line; `:` lines are
  keep-alive comments.
"""


def _operation_object(op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
    }
    if op.description:
        out["description"] = op.description
    if op.websocket:
        out["x-websocket"] = True
    params = []
    for name in re.findall(r"\{(\w+)\}", op.path):
        param = {"name": name, "in": "path", "required": True, **_PATH_PARAMS[name]}
        if name in op.path_enums:
            param["schema"] = {"type": "string", "enum": list(op.path_enums[name])}
        params.append(param)
    if op.query is not None:
        schema = op.query.model_json_schema(ref_template=REF)
        required = set(schema.get("required", ()))
        for name, prop in schema["properties"].items():
            prop = dict(prop)
            desc = prop.pop("description", None)
            param = {"name": name, "in": "query", "required": name in required, "schema": prop}
            if desc:
                param["description"] = desc
            params.append(param)
    for h in op.headers:
        params.append(
            {
                "name": h.name,
                "in": "header",
                "required": h.required,
                "description": h.description,
                "schema": {"type": "string"},
            }
        )
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {
            "required": True,
            "content": {JSON: {"schema": {"$ref": REF.format(model=op.body.__name__)}}},
        }
    elif op.raw_body is not None:
        out["requestBody"] = {
            "required": False,
            "description": op.raw_body,
            "content": {OCTETS: {"schema": {"type": "string", "format": "binary"}}},
        }
    responses = dict(op.responses)
    if op.body is not None:
        for status, reply in _JSON_BODY_ERRORS.items():
            responses.setdefault(status, reply)
    responses.setdefault(401, _UNAUTHORIZED)
    out["responses"] = {str(s): _response_object(responses[s]) for s in sorted(responses)}
    return out


def _response_object(reply: Reply) -> dict[str, Any]:
    out: dict[str, Any] = {"description": reply.description}
    content: dict[str, Any] = {}
    if reply.model is not None:
        schema: dict[str, Any] = {"$ref": REF.format(model=reply.model.__name__)}
        if reply.codes:
            schema = {
                "allOf": [schema],
                "properties": {"code": {"enum": list(dict.fromkeys(reply.codes))}},
            }
        content[JSON] = {"schema": schema}
    for media in reply.media:
        if media == SSE:
            content[media] = {"schema": _sse_schema(reply.sse_events)}
        elif media == JSON:
            content[media] = {"schema": {"type": "object"}}
        else:
            content[media] = {"schema": {"type": "string", "format": "binary"}}
    if content:
        out["content"] = content
    if reply.headers:
        out["headers"] = {
            name: {"description": desc, "schema": {"type": "string"}}
            for name, desc in reply.headers.items()
        }
    return out


def _sse_schema(names: Sequence[str]) -> dict[str, Any]:
    """One event of the stream (as OpenAPI 3.2's ``itemSchema`` would say, and as
    schemathesis reads ``schema`` of ``text/event-stream`` before 3.2): its name
    and its ``data:``, a JSON document whose schema is ``contentSchema``."""
    return {
        "oneOf": [
            {
                "type": "object",
                "required": ["event", "data"],
                "additionalProperties": False,
                "properties": {
                    "event": {"const": name},
                    "data": {
                        "type": "string",
                        "contentMediaType": JSON,
                        "contentSchema": {
                            "$ref": REF.format(model=schemas.SSE_EVENTS[name].__name__)
                        },
                    },
                },
            }
            for name in names
        ]
    }


def _component_schemas() -> dict[str, Any]:
    """Every body model and what they refer to, under their class names."""
    wanted: dict[type[BaseModel], JsonSchemaMode] = {}
    for op in OPERATIONS:
        if op.body is not None:
            wanted[op.body] = "validation"
        for reply in op.responses.values():
            if reply.model is not None:
                wanted[reply.model] = "validation"
    wanted[schemas.ErrorBody] = "validation"
    for event in schemas.SSE_EVENTS.values():
        wanted[event] = "validation"
    _, top = models_json_schema(list(wanted.items()), ref_template=REF)
    defs: dict[str, Any] = top.get("$defs", {})
    missing = {m.__name__ for m in wanted} - defs.keys()
    assert not missing, f"models renamed by pydantic (name clash?): {missing}"
    return dict(sorted(defs.items()))


@functools.cache
def document_bytes() -> bytes:
    """The document as served: built and encoded once (about 30 ms), on first request."""
    return json.dumps(document()).encode()


@functools.cache
def document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation_object(op)
    return {
        "openapi": "3.1.0",
        "info": {"title": "sandboxd", "version": __version__, "description": _DESCRIPTION},
        "tags": [{"name": t} for t in dict.fromkeys(op.tag for op in OPERATIONS)],
        "paths": paths,
        "components": {
            "schemas": _component_schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        # Either the bearer token, or nothing when the daemon runs without one.
        "security": [{"bearer": []}, {}],
    }
