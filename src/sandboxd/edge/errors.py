"""Error bodies and the error middleware, for both apps (``serve`` and ``host``).

Every refusal is ``{"error": "<what to do>", "code": "<MACHINE_CODE>"}`` with a
status; the same condition gets the same status and code on both apps.

Exceptions that are not :class:`ApiError` (an engine's own errors, say) are
mapped to a response by an :class:`ErrorMap`, one table per app, instead of a
try/except in each route: ``errors.add(ProcessNotFound, 404, "NOT_FOUND")``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

log = logging.getLogger("sandboxd.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

# The code of a refusal aiohttp (or a route) makes with a bare status.
HTTP_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "REQUEST_TIMEOUT",
    413: "PAYLOAD_TOO_LARGE",
    414: "URI_TOO_LONG",
    415: "UNSUPPORTED_MEDIA_TYPE",
    429: "TOO_MANY_CONNECTIONS",
    431: "HEADERS_TOO_LARGE",
    500: "INTERNAL_ERROR",
}
# What the official SDK retries: a retried start would start the process twice,
# so the daemon never answers them (the host's proxy does, for an unreachable sandbox).
RETRIED_BY_SDK = frozenset({502, 503, 504})


class ApiError(Exception):
    """A refusal with its HTTP status and a stable machine-readable code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict[str, str]:
        return {"error": self.message, "code": self.code}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps({"error": message, "code": code}).encode(),
        content_type="application/json",
        headers=headers,
    )


def code_of(status: int) -> str:
    return HTTP_CODES.get(status, f"HTTP_{status}")


# None: "not mine", the lookup goes on up the MRO.
ToError = Callable[[BaseException], ApiError | None]


class ErrorMap:
    """Exception class → response, looked up along the exception's MRO (most specific first)."""

    def __init__(self) -> None:
        self._table: dict[type[BaseException], ToError] = {}

    def add(self, exc_type: type[BaseException], status: int, code: str) -> None:
        """Answer ``exc_type`` with ``status`` and ``code``; the message is ``str(exc)``."""
        self._table[exc_type] = lambda exc: ApiError(status, code, str(exc))

    def add_mapper(self, exc_type: type[BaseException], to_error: ToError) -> None:
        """For an exception that decides its own code (e.g. one that carries it).

        ``to_error`` may return None for an exception it does not answer.
        """
        self._table[exc_type] = to_error

    def lookup(self, exc: BaseException) -> ApiError | None:
        for klass in type(exc).__mro__:
            to_error = self._table.get(klass)
            if to_error is not None and (err := to_error(exc)) is not None:
                return err
        return None


def errors_middleware(errors: ErrorMap | None = None, *, allow_retried: bool = True) -> Middleware:
    """Turn every refusal into a JSON error body; never a traceback to the client.

    ``allow_retried=False`` (the daemon): a 502/503/504 about to go out is a bug
    (the SDK would retry it); it is logged and answered 500 instead.
    """
    table = errors or ErrorMap()

    def respond(err: ApiError, request: web.Request) -> web.Response:
        if not allow_retried and err.status in RETRIED_BY_SDK:
            log.error("refusing to answer %d (%s) on %s", err.status, err.code, request.path)
            return error_response(500, "INTERNAL_ERROR", err.message)
        return error_response(err.status, err.code, err.message)

    @web.middleware
    async def errors_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return respond(exc, request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 404:
                message = f"no route for {request.method} {request.path}"
            else:
                message = exc.reason
            response = error_response(exc.status, code_of(exc.status), message)
            if "Allow" in exc.headers:  # a 405 must say what is allowed (RFC 9110)
                response.headers["Allow"] = exc.headers["Allow"]
            return response
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:
            mapped = table.lookup(exc)
            if mapped is not None:
                return respond(mapped, request)
            log.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(500, "INTERNAL_ERROR", "internal error; see the server's log")

    return errors_mw
