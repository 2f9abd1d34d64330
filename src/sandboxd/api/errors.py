"""Error bodies: ``{"error": "<message>", "code": "<MACHINE_CODE>"}``, always JSON.

They live in the shared HTTP edge (:mod:`sandboxd.edge.errors`); this module
keeps the names the daemon's routes import. The daemon never answers 502, 503
or 504 (the official SDK retries those, and a retried start would start the
process twice): its error middleware turns one into a logged 500.
"""

from __future__ import annotations

from ..edge.errors import ApiError, error_response

__all__ = ["ApiError", "bad_request", "error_response", "not_found"]


def not_found(message: str) -> ApiError:
    return ApiError(404, "NOT_FOUND", message)


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)
