"""The HTTP edge shared by ``sandboxd serve`` (``api/``) and ``sandboxd host`` (``host/``).

What a request meets before a route runs, and how a refusal looks, exist once
here so that both apps answer the same condition with the same status and code:

* :mod:`.errors`: :class:`ApiError`, the JSON error body, the error middleware
  and :class:`ErrorMap` (exception class → status and code);
* :mod:`.auth`: bearer-token auth;
* :mod:`.crosssite`: ``Origin`` and ``Host`` checks against web pages;
* :mod:`.body`: reading a JSON body (type, size, time, depth, NaN);
* :mod:`.limits` and :mod:`.connections`: connection cap, idle and header
  timeouts, malformed requests, the descriptor limit.
"""

from __future__ import annotations

from .auth import bearer_auth, carries_token, expected_header
from .body import read_json
from .connections import harden
from .crosssite import cross_site_guard
from .errors import ApiError, ErrorMap, error_response, errors_middleware
from .limits import LIMITS, MAX_WS_MESSAGE, Limits

__all__ = [
    "LIMITS",
    "MAX_WS_MESSAGE",
    "ApiError",
    "ErrorMap",
    "Limits",
    "bearer_auth",
    "carries_token",
    "cross_site_guard",
    "error_response",
    "errors_middleware",
    "expected_header",
    "harden",
    "read_json",
]
