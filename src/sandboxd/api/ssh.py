"""``/api/v1/ssh/status|enable|disable``: the daemon's SSH server (``sandboxd.ssh``).

Bodies, as the contract gives them: enable takes ``{"proxy_pubkey": str,
"backend_user"?: str = "tl-user"}``; all three answer ``{"enabled": bool,
"pid": int|null, "host_key_fingerprint": str|null}`` (plus ``port``, where
the server listens on the sandbox's loopback).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Annotated

from aiohttp import web
from pydantic import Field

from ..ssh.server import DEFAULT_USER, SshError, SshService
from . import models, processes, pty
from .errors import ApiError

routes = web.RouteTableDef()

SERVICE: web.AppKey[SshService] = web.AppKey("ssh_service", SshService)
MAX_KEY = 16 << 10  # a public key line; an RSA-16384 one is under 3 KiB


FIELD_CODES = {"proxy_pubkey": "INVALID_PUBLIC_KEY", "backend_user": "INVALID_USER"}


class EnableSshRequest(models.Strict):
    proxy_pubkey: Annotated[
        models.Text,
        Field(
            min_length=1,
            max_length=MAX_KEY,
            description="The one OpenSSH public key allowed to log in (the SSH proxy's).",
        ),
    ]
    backend_user: Annotated[
        models.Text | None,
        Field(min_length=1, max_length=256, description="Whom sessions run as; null: tl-user."),
    ] = DEFAULT_USER


def _port_from_env() -> int:
    raw = os.environ.get("SANDBOXD_SSH_PORT", "0")
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise SystemExit(f"SANDBOXD_SSH_PORT={raw!r}: give a port number (0: any free one)")
    return port


async def lifespan(app: web.Application) -> AsyncIterator[None]:
    service = SshService(app[processes.TABLE], app[pty.MANAGER], port=_port_from_env())
    app[SERVICE] = service
    yield
    await service.close()


def _answer(body: dict[str, object]) -> web.Response:
    return web.json_response(body)


@routes.get("/api/v1/ssh/status")
async def status(request: web.Request) -> web.Response:
    return _answer(request.app[SERVICE].status())


@routes.post("/api/v1/ssh/enable")
async def enable(request: web.Request) -> web.Response:
    req = models.parse(EnableSshRequest, await processes.read_json(request), FIELD_CODES)
    try:
        user = req.backend_user or DEFAULT_USER
        return _answer(await request.app[SERVICE].enable(req.proxy_pubkey.strip(), user))
    except SshError as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None


@routes.post("/api/v1/ssh/disable")
async def disable(request: web.Request) -> web.Response:
    return _answer(await request.app[SERVICE].disable())
