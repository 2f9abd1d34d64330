"""A sandbox's logs as the SDK reads them: ``GET {P}/sandboxes/{id}/logs`` and ``…/processes``.

Two sources, one list in time order:

* lifecycle events, from the record itself (created, the entrypoint's start
  or its failure, the end and its reason);
* its processes' output, line by line (stdout at level info, stderr at
  level error), from the daemon while the sandbox runs. When it is
  terminated the host first copies that output to
  ``<state-dir>/logs/<id>.jsonl`` (root only), so it is still readable after
  the sandbox and its daemon are gone. A suspended sandbox's daemon is frozen:
  it shows what was copied, if anything, and its lifecycle events.

Entries keep their place: each has a stable uuid (from the sandbox and its
position), and ``nextToken`` is the position after the page. Files of records
the archive evicted are removed when a new one is written.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from .model import FAILED, RUNNING, TERMINATED, Record, bad
from .proxy import http_proxy as proxy

if TYPE_CHECKING:
    from .manager import Manager

log = logging.getLogger("sandboxd.host")

# The SDK's SandboxLogLevel as it sends it (`level=3`), probed on 0.5.163.
LEVELS = {"trace": 1, "debug": 2, "info": 3, "warn": 4, "error": 5, "fatal": 6}
INFO, ERROR = LEVELS["info"], LEVELS["error"]
DEFAULT_PAGE = 100
MAX_PAGE = 10_000
CAPTURE_TIMEOUT_S = 2.0
# One reply of the daemon: a process's retained output (16 MiB) as JSON lines,
# escapes included, fits; a daemon answering more is not believed.
LOG_REPLY_LIMIT = 128 << 20
MAX_CAPTURED_PROCESSES = 256


def log_dir(m: Manager) -> Path:
    d = m.state_dir / "logs"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


# -- collecting ---------------------------------------------------------------------


async def _get_json(session: aiohttp.ClientSession, path: str) -> Any:
    async with session.get(
        "http://sandbox" + path, timeout=aiohttp.ClientTimeout(total=CAPTURE_TIMEOUT_S)
    ) as r:
        if r.status != 200:
            return None
        # The daemon keeps at most its output cap per process; beyond this, something lies.
        return await proxy.daemon_json(r, limit=LOG_REPLY_LIMIT)


async def from_daemon(session: aiohttp.ClientSession) -> list[dict[str, Any]]:
    """Every process's output as entries (``t`` in ns, from the process's start)."""
    listed = await _get_json(session, "/api/v1/processes")
    procs = (listed or {}).get("processes") or []
    out: list[dict[str, Any]] = []
    for p in procs[-MAX_CAPTURED_PROCESSES:]:
        pid = p.get("pid")
        if not isinstance(pid, int):
            continue
        command = " ".join([str(p.get("command", "")), *map(str, p.get("args") or [])]).strip()
        t0 = int(p.get("started_at") or 0) * 1_000_000
        seq = 0
        for stream, level in (("stdout", INFO), ("stderr", ERROR)):
            body = await _get_json(session, f"/api/v1/processes/{pid}/{stream}")
            for line in (body or {}).get("lines") or []:
                seq += 1
                out.append(
                    {
                        "t": t0 + seq,
                        "level": level,
                        "body": line,
                        "pid": pid,
                        "command": command,
                        "stream": stream,
                    }
                )
    return out


def _events(rec: Record) -> list[dict[str, Any]]:
    """The record's lifecycle as entries."""
    ns = 1_000_000_000
    ev = [
        {
            "t": int(rec.created_at * ns),
            "level": INFO,
            "body": f"sandbox created (image {rec.image_asked or rec.image}, "
            f"{rec.cpus:g} cpus, {rec.memory_mb} MiB memory, {rec.disk_mb} MiB disk)",
            "event": "created",
        }
    ]
    if rec.entrypoint:
        if rec.entrypoint_error is not None:
            what = f"entrypoint {rec.entrypoint!r} could not start: {rec.entrypoint_error}"
            ev.append({"t": int(rec.created_at * ns) + 1, "level": ERROR, "body": what})
        elif rec.entrypoint_pid is not None:
            what = f"entrypoint {rec.entrypoint!r} started, pid {rec.entrypoint_pid}"
            ev.append({"t": int(rec.created_at * ns) + 1, "level": INFO, "body": what})
        ev[-1]["event"] = "entrypoint"
    if rec.status in (TERMINATED, FAILED) and rec.terminated_at is not None:
        what = f"sandbox {rec.status} ({rec.termination_reason})"
        if rec.error:
            what += f": {rec.error}"
        level = ERROR if rec.status == FAILED else INFO
        ev.append({"t": int(rec.terminated_at * ns), "level": level, "body": what, "event": "end"})
    return ev


async def capture(m: Manager, sandbox_id: str) -> None:
    """Copy the processes' output out of a sandbox about to be torn down (bounded wait)."""
    try:
        entries = await asyncio.wait_for(from_daemon(m.sessions.get(sandbox_id)), CAPTURE_TIMEOUT_S)
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        log.info("sandbox %s: its output could not be kept: %s", sandbox_id, exc)
        return
    d = log_dir(m)
    path = d / f"{sandbox_id}.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        for e in entries:
            f.write(json.dumps(e) + "\n")
    _prune(m, d)


def _prune(m: Manager, d: Path) -> None:
    for p in d.glob("*.jsonl"):
        if m.store.by_id(p.stem) is None:
            with contextlib.suppress(OSError):
                p.unlink()


def _captured(m: Manager, sandbox_id: str) -> list[dict[str, Any]]:
    path = m.state_dir / "logs" / f"{sandbox_id}.jsonl"
    try:
        text = path.read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


async def entries(m: Manager, rec: Record) -> list[dict[str, Any]]:
    if rec.status == RUNNING:
        try:
            output = await from_daemon(m.sessions.get(rec.id))
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            output = _captured(m, rec.id)
    else:
        output = _captured(m, rec.id)
    return sorted(_events(rec) + output, key=lambda e: e["t"])


# -- answering --------------------------------------------------------------------


def process_id(e: dict[str, Any]) -> str:
    return str(e["pid"]) if "pid" in e else ""


def signal(rec: Record, e: dict[str, Any], index: int) -> dict[str, Any]:
    """One SandboxLogSignal (the SDK's shape; ``timestamp`` in ns)."""
    attrs: dict[str, Any] = {}
    resource = [["sandbox_id", rec.id]]
    if "pid" in e:
        attrs = {"stream": e["stream"], "process_id": process_id(e), "command": e["command"]}
        resource.append(["process_id", process_id(e)])
    elif "event" in e:
        attrs = {"event": e["event"]}
    return {
        "timestamp": e["t"],
        "uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sandboxd:{rec.id}:{index}")),
        "namespace": rec.namespace,
        "application": "",
        "sandboxId": rec.id,
        "resourceAttributes": resource,
        "body": e["body"],
        "logAttributes": json.dumps(attrs),
        "allocations": [],
        "functionRuns": [],
        "level": e["level"],
    }


def _count(raw: str | None, key: str) -> int | None:
    if raw is None:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if not 1 <= n <= MAX_PAGE:
        raise bad("INVALID_" + key.upper(), f"{key} must be an integer from 1 to {MAX_PAGE}")
    return n


def _token(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        n = int(base64.urlsafe_b64decode(raw.encode()).decode())
        if n >= 0:
            return n
    except (ValueError, binascii.Error, UnicodeDecodeError):
        pass
    raise bad("INVALID_NEXT_TOKEN", "nextToken must be the nextToken of an earlier page")


def page(rec: Record, all_entries: list[dict[str, Any]], query: Any) -> dict[str, Any]:
    """Filters (``level``, ``processId``, ``body``) then one page (``head``/``tail``/``nextToken``)."""
    levels: set[int] = set()
    for raw in query.getall("level", []):
        try:
            levels.add(int(raw))
        except ValueError:
            raise bad("INVALID_LEVEL", f"level must be one of {sorted(LEVELS.values())}") from None
    pids = set(query.getall("processId", []))
    needle = query.get("body")
    head, tail = _count(query.get("head"), "head"), _count(query.get("tail"), "tail")
    if head is not None and tail is not None:
        raise bad("INVALID_QUERY", "give head or tail, not both")
    indexed = [
        (i, e)
        for i, e in enumerate(all_entries)
        if (not levels or e["level"] in levels)
        and (not pids or process_id(e) in pids)
        and (not needle or needle in e["body"])
    ]
    start = _token(query.get("nextToken"))
    size = head or tail or DEFAULT_PAGE
    if start is None:
        start = max(0, len(indexed) - tail) if tail is not None else 0
    chunk = indexed[start : start + size]
    body: dict[str, Any] = {"logs": [signal(rec, e, i) for i, e in chunk]}
    end = start + len(chunk)
    body["nextToken"] = (
        base64.urlsafe_b64encode(str(end).encode()).decode() if end < len(indexed) else None
    )
    return body


def processes(all_entries: list[dict[str, Any]]) -> dict[str, Any]:
    """SandboxProcessLogFilter per process that wrote a line."""
    seen: dict[str, dict[str, Any]] = {}
    for e in all_entries:
        if "pid" not in e:
            continue
        pid = process_id(e)
        p = seen.get(pid)
        if p is None:
            p = seen[pid] = {
                "processId": pid,
                "processPid": pid,
                "processCommand": e["command"],
                "processManagedId": "",
                "processManagedName": "",
                "firstSeen": e["t"],
                "lastSeen": e["t"],
                "logCount": 0,
            }
        p["firstSeen"] = min(p["firstSeen"], e["t"])
        p["lastSeen"] = max(p["lastSeen"], e["t"])
        p["logCount"] += 1
    return {"processes": list(seen.values())}
