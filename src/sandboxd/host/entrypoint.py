"""A sandbox's entrypoint: started by the host through the daemon's own process API.

Once the daemon answers health, the host asks it (``POST /api/v1/processes``)
to start the entrypoint as an ordinary process: its output is captured, it is
in ``list_processes``, it can be followed and killed like any other. Nothing
about it is special to the daemon, so a sandbox whose entrypoint exits (or is
killed) keeps running. One that cannot start (no such command) leaves its
reason on the sandbox's record, where ``info`` shows it.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import aiohttp

if TYPE_CHECKING:
    from .manager import Manager

log = logging.getLogger("sandboxd.host")

START_TIMEOUT_S = 10.0


class Started:
    """The answer of the daemon: a pid, or why the entrypoint did not start."""

    __slots__ = ("error", "pid")

    def __init__(self, pid: int | None, error: str | None) -> None:
        self.pid, self.error = pid, error


async def start(session: aiohttp.ClientSession, argv: list[str]) -> Started:
    body = {"command": argv[0], "args": argv[1:]}
    try:
        async with session.post(
            "http://sandbox/api/v1/processes",
            json=body,
            timeout=aiohttp.ClientTimeout(total=START_TIMEOUT_S),
        ) as r:
            raw = await r.read()
            status = r.status
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return Started(None, f"the sandbox's daemon did not take it: {exc}")
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = {}
    if status == 201 and isinstance(answer, dict) and isinstance(answer.get("pid"), int):
        return Started(answer["pid"], None)
    detail = answer.get("error") or answer.get("message") if isinstance(answer, dict) else None
    code = answer.get("code") if isinstance(answer, dict) else None
    what = detail or raw.decode(errors="replace")[:300] or f"HTTP {status}"
    return Started(None, f"{code}: {what}" if code else what)


def of_image(m: Manager, image: str) -> list[str]:
    """An image's own entrypoint: its ``Entrypoint`` followed by its ``Cmd``, as Docker runs them.

    Used when the create names none. An ``entrypoint`` given at create is the
    whole command line and replaces both (Tensorlake's entrypoint is a full
    argv, unlike ``docker run``'s, whose arguments replace only ``Cmd``).
    """
    img = m.images.get(image)
    if img is None:
        return []
    return [*img.config.entrypoint, *img.config.cmd]


async def run_on(m: Manager, sandbox_id: str) -> None:
    """Start the record's entrypoint (or its image's), and write down the pid or the reason."""
    rec = m.store.by_id(sandbox_id)
    if rec is None:
        return
    argv = rec.entrypoint or of_image(m, rec.image)
    if not argv:
        return
    got = await start(m.sessions.get(sandbox_id), argv)
    if got.error is not None:
        log.warning("sandbox %s: its entrypoint did not start: %s", sandbox_id, got.error)
    note(m, sandbox_id, got, argv)


def note(m: Manager, sandbox_id: str, got: Started, argv: list[str] | None = None) -> None:
    cur = m.store.snapshot(sandbox_id)
    if cur is None:
        return
    if argv is not None:
        cur.entrypoint = argv  # the image's, when the create named none: info shows it
    cur.entrypoint_pid, cur.entrypoint_error = got.pid, got.error
    m.store.put(cur)
