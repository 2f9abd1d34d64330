"""Reading a JSON request body, with the same bounds on both apps.

* **Type**: a body must say ``Content-Type: application/json``. A browser can
  send a cross-site ``text/plain`` or form body without asking first (no CORS
  preflight); it cannot send ``application/json``. So a page that is not ours
  cannot make one of our JSON requests act (415 ``UNSUPPORTED_MEDIA_TYPE``).
  The official SDK sends the type with every JSON body, and no type with an
  empty one.
* **Size**: 1 MiB (413 ``PAYLOAD_TOO_LARGE``), checked as it arrives.
* **Time**: the whole body within the idle timeout (408 ``REQUEST_TIMEOUT``),
  so a client trickling bytes cannot hold a handler forever.
* **Depth** and **NaN**: too deep a nesting and ``NaN``/``Infinity`` are
  ``INVALID_JSON`` (400), never a 500 or an infinite timeout in the engine.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from .errors import ApiError
from .limits import limits_of

_NO_DEFAULT: Any = object()


def is_json_type(content_type: str) -> bool:
    """``application/json`` (any parameters) or a ``+json`` type; case-insensitive."""
    main = content_type.split(";", 1)[0].strip().lower()
    return main == "application/json" or (
        main.startswith("application/") and main.endswith("+json")
    )


def check_json_type(request: web.Request, has_body: bool) -> None:
    declared = request.headers.get("Content-Type")
    if declared is None and not has_body:
        return
    if declared is None or not is_json_type(declared):
        raise ApiError(
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            f"send this body with 'Content-Type: application/json' (got {declared or 'none'})",
        )


async def read_json(request: web.Request, empty: Any = _NO_DEFAULT) -> Any:
    """The request's JSON body; ``empty``, when given, is the value of an empty body."""
    limits = limits_of(request.app)
    cap = limits.max_json_body
    too_large = ApiError(413, "PAYLOAD_TOO_LARGE", f"JSON bodies are limited to {cap} bytes")
    if request.content_length is not None and request.content_length > cap:
        raise too_large
    # Checked before reading: a refused body is never read at all.
    check_json_type(request, request.body_exists)
    raw = bytearray()
    limit = limits.idle_timeout_s
    try:
        async with asyncio.timeout(limit):
            async for chunk in request.content.iter_any():
                raw += chunk
                if len(raw) > cap:
                    raise too_large
    except TimeoutError:
        raise ApiError(
            408, "REQUEST_TIMEOUT", f"the JSON body did not arrive within {limit:g} s"
        ) from None
    if not raw and empty is not _NO_DEFAULT:
        return empty
    try:
        return json.loads(raw, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "INVALID_JSON", f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        # "[[[[...": a megabyte of nesting exhausts the parser's stack (was a 500).
        raise ApiError(400, "INVALID_JSON", "the body is nested too deeply") from None


def _not_json(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON does not (RFC 8259), and an
    # infinite timeout or a NaN size must not reach the engine.
    raise ValueError(f"{name} is not a JSON value")
