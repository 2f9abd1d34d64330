"""How a front talks to a node: the hop mark, the fleet's headers, a connection to its address.

A request a front forwards to a node carries :data:`HOP`, a mark derived from
the fleet's secret (random, made once in etcd) and its token: the node then
handles it as placed already (no second placement, no second forwarding). The
mark is neither the secret nor the token, and without the secret nobody can
compute it, token or not.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from .store import ROOT, Etcd

HOP = "X-Sandboxd-Fleet-Hop"
# On a create forwarded for a restore: the snapshot the node must adopt first.
RESTORE_OF = "X-Sandboxd-Fleet-Snapshot"
HOP_SECRET = ROOT + "hop-secret"  # random, made once: what hop marks are derived from


def hop_value(token: str | None, secret: str = "") -> str:
    """What a node-to-node request carries: bound to the fleet's secret and token, neither."""
    key = f"{secret}\0{token or ''}".encode()
    return hmac.new(key, b"sandboxd-fleet-hop", hashlib.sha256).hexdigest()


async def fleet_hop(etcd: Etcd, token: str | None) -> str:
    """The fleet's hop mark: from a secret in etcd, made by the first front to ask.

    Derived from the token alone, a fleet without ``--token`` would have a mark
    anyone can compute, and a key holder could send creates straight to a
    node, past placement and the fleet's name check. Only the fleet's nodes,
    gateways and operators read etcd.
    """
    e = await etcd.read(HOP_SECRET)
    if e is None:
        made = {"secret": secrets.token_hex(32)}
        await etcd.transaction([etcd.absent(HOP_SECRET)], [etcd.put_op(HOP_SECRET, made)])
        e = await etcd.read(HOP_SECRET)
        assert e is not None
    return hop_value(token, str(e.value["secret"]))


class NodeConnector(aiohttp.BaseConnector):
    """Every connection to one node's address, whatever Host the request names."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(limit=256)
        self._host, self._port = host, port

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
        try:
            async with asyncio.timeout(timeout.sock_connect):
                _, proto = await self._loop.create_connection(self._factory, self._host, self._port)
        except OSError as exc:
            raise aiohttp.ClientConnectionError(
                f"node at {self._host}:{self._port}: {exc}"
            ) from exc
        return proto


def node_session(url: str) -> aiohttp.ClientSession:
    """A session to the node advertised at ``url`` (bodies passed on as they come)."""
    u = urlsplit(url)
    return aiohttp.ClientSession(
        connector=NodeConnector(u.hostname or "127.0.0.1", u.port or 80),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
    )
