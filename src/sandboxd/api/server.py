"""Connection-level protections of the daemon: see :mod:`sandboxd.edge.connections`.

``json_errors(runner)`` (called after ``runner.setup()``) gives the server the
edge's protocol handler: JSON error bodies for requests aiohttp rejects
itself, a connection cap, the idle/header timeout, the descriptor limit.
"""

from __future__ import annotations

from ..edge.connections import harden as json_errors

__all__ = ["json_errors"]
