"""Error bodies: ``{"error": "<message>", "code": "<MACHINE_CODE>"}``, always JSON.

Never answer 502, 503 or 504 from this daemon: the official SDK retries those,
and a retried start would start the process twice.
"""

from __future__ import annotations

import json

from aiohttp import web


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        assert status not in (502, 503, 504), "the SDK would retry this"
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps({"error": message, "code": code}).encode(),
        content_type="application/json",
    )


def not_found(message: str) -> ApiError:
    return ApiError(404, "NOT_FOUND", message)


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)
