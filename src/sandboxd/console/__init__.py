"""The web console of ``sandboxd host`` (docs/console.md).

Static files only: the pages call the same public API the SDK does (the
lifecycle routes and ``/api/v1/*`` through the proxy) with the key the
operator pasted. Two pieces run on the host:

* :mod:`.static`: ``GET /console/…`` serves the packaged files, with a strict
  Content-Security-Policy. They hold no secret, so they are served without the
  token (the page asks for it).
* :mod:`.wscarriage`: a browser cannot set headers on a websocket, so the
  console's terminal carries the key and the sandbox id in its
  ``Sec-WebSocket-Protocol`` list; this middleware turns them back into the
  ``Authorization`` and ``X-Tensorlake-Sandbox-Id`` headers every other client
  sends, before the token check runs.
"""

from __future__ import annotations

from .static import add_routes, is_asset
from .wscarriage import ws_credentials

__all__ = ["add_routes", "is_asset", "ws_credentials"]
