"""A ``sandboxd host`` joined to a fleet: its node agent and its front, started with the app."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from ..host.manager import Manager
from .front import Front
from .move import watched as watched_moves
from .node import DEFAULT_RESTART_GRACE_S, DEFAULT_TTL_S, NodeAgent
from .store import Etcd, Tls, Unavailable


@dataclass(frozen=True)
class ClusterOptions:
    """``--cluster``, ``--node``, ``--advertise``, ``--lease-ttl``, ``--slots``."""

    cluster: str
    node: str
    advertise: str
    ttl: int = DEFAULT_TTL_S
    slots: int | None = None
    tls: Tls | None = None  # --etcd-ca/--etcd-cert/--etcd-key
    restart_grace: int = DEFAULT_RESTART_GRACE_S
    snapshot_dir: Path | None = None  # --snapshot-dir: the fleet's shared snapshot store


class Joined:
    def __init__(self, opts: ClusterOptions, manager: Manager, token: str | None) -> None:
        self.etcd = Etcd(opts.cluster, opts.tls)
        shared = None
        if opts.snapshot_dir is not None:
            shared = str(opts.snapshot_dir.resolve())
            manager.snapshots.use_dir(Path(shared))  # before the host's recovery reads it
        moves = watched_moves(self.etcd)  # one watch for the agent and the front
        self.agent = NodeAgent(
            self.etcd,
            manager,
            opts.node,
            opts.advertise,
            ttl=opts.ttl,
            slots=opts.slots,
            restart_grace=opts.restart_grace,
            snapshot_dir=shared,
            moves=moves,
        )
        self.front = Front(
            self.etcd,
            opts.node,
            token,
            lease_of=lambda: self.agent.lease,
            ttl=opts.ttl,
            moves=moves,
        )
        self.front.snapshots = manager.snapshots
        self.agent.reserved = self.front.reserved

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        """After the host's own start-up (its recovery): join, then serve as one of the fleet."""
        from ..host.app import AUTHORITY

        try:
            await self.agent.start()
            await self.front.start()
        except Unavailable as exc:
            await self.etcd.close()
            raise SystemExit(f"sandboxd host: cannot join the fleet: {exc.message}") from None
        # Namespace keys are the fleet's (etcd), not this state dir's: every node takes them.
        app[AUTHORITY].use_keys(self.front.keys)
        yield
        with contextlib.suppress(Exception):
            await self.front.stop()
        with contextlib.suppress(Exception):
            await self.agent.stop()
        await self.etcd.close()
