"""Reaching a sandbox's daemon: the rules every way in shares (HTTP proxy, SSH gateway).

A sandbox being snapshotted is waited for (its cgroup is frozen while its
layer is archived, then thawed); one being suspended is refused; a suspended
one is resumed when it resumes on access, else refused; a starting one is
refused (try again); an ended one has no daemon any more. Each refusal is an
:class:`ApiError` with its own code: the HTTP proxy answers it as it is, the
SSH gateway prints its message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..manager import Manager
from ..model import PENDING, RUNNING, SNAPSHOTTING, SUSPENDED, SUSPENDING, ApiError, Record


def _as_is(rec: Record | None) -> Record | None:
    return rec


async def running(
    m: Manager, sid: str, see: Callable[[Record | None], Record | None] = _as_is
) -> Record:
    """The sandbox's record once it runs, or the reason it cannot.

    ``see`` hides what the caller may not see (another namespace's sandbox
    reads as missing: 404, never 403).
    """
    rec = see(m.store.by_id(sid))
    if rec is not None and rec.status == SNAPSHOTTING:
        await m.snapshots.settled(sid)
        rec = see(m.store.by_id(sid))
    if rec is not None and rec.status == SUSPENDING:
        raise ApiError(
            409, "SANDBOX_SUSPENDING", f"sandbox {sid} is being suspended; try again once it is"
        )
    if rec is not None and rec.status == SUSPENDED:
        if not rec.auto_resume:
            raise ApiError(
                409,
                "SANDBOX_SUSPENDED",
                f"sandbox {sid} is suspended: resume it first (sandboxd sbx resume {sid})",
            )
        # The host's task, shielded: a client that goes away mid-resume does
        # not cut a restore (gVisor's, from disk) in half.
        rec = see(await asyncio.shield(m.own(m.resume(sid))))
    if rec is None:
        raise ApiError(404, "SANDBOX_NOT_FOUND", f"no sandbox {sid!r}")
    if rec.status == PENDING:
        raise ApiError(
            409, "SANDBOX_STARTING", f"sandbox {sid} is still starting: wait for running"
        )
    if rec.status != RUNNING:
        # 404 still (the SDK's callers test for it), with its own code and a way forward.
        raise ApiError(
            404,
            "SANDBOX_TERMINATED",
            f"sandbox {sid} is {rec.status}: its daemon is gone; read what it left with "
            "get_logs() or get_archived()",
        )
    return rec
