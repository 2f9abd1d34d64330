"""``/api/v1/health``, ``/api/v1/info`` and the OpenAPI document: answered from memory,
never behind a lock."""

from __future__ import annotations

import time

from aiohttp import web

from .. import __version__
from .processes import TABLE

routes = web.RouteTableDef()
STARTED_AT = web.AppKey("started_at", float)


@routes.get("/api/v1/health")
async def health(request: web.Request) -> web.Response:
    return web.json_response({"healthy": True})


@routes.get("/api/v1/info")
async def info(request: web.Request) -> web.Response:
    table = request.app[TABLE]
    return web.json_response(
        {
            "version": __version__,
            "uptime_secs": int(time.monotonic() - request.app[STARTED_AT]),
            "running_processes": table.running_count,
            "total_processes": len(table),
            "spawned_total": table.spawned_total,
            "cgroups": table.cgroups.describe(),
        }
    )


@routes.get("/api/v1/openapi.json")
async def openapi_document(request: web.Request) -> web.Response:
    # Generated once per process from the models the handlers validate with;
    # imported here, not at start-up: the generator and the response models
    # are 1.3 MB that a daemon nobody asks for its document never needs.
    from . import openapi

    return web.Response(body=openapi.document_bytes(), content_type="application/json")
