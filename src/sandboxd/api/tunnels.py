"""Placeholder: routes of /api/v1/tunnels (being written)."""

from __future__ import annotations

from aiohttp import web

routes = web.RouteTableDef()
