"""Pull-on-create: a create naming a registry image the store lacks fetches it first.

One pull per image at a time, however many creates wait on it; it runs in a
thread (skopeo and umoci are subprocesses) and its progress goes to the
host's log. A pull the create stopped waiting for (the client went away)
still completes into the store. Failures answer with the store's code
(``IMAGE_NOT_FOUND``, ``REGISTRY_AUTH_REQUIRED``...), never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from ...edge.errors import ApiError
from . import registry
from .image_store import ImageError, ImageStore

log = logging.getLogger("sandboxd.host")

_inflight: dict[tuple[Path, str], asyncio.Future[object]] = {}


async def ensure(store: ImageStore, name: str) -> None:
    """Return once ``name`` is in the store (pulling a registry reference), else raise ApiError."""
    if store.get(name) is not None:
        return
    if not registry.is_reference(name):
        raise ApiError(400, "UNKNOWN_IMAGE", store.missing_hint(name))
    key = (store.root, registry.parse(name).key)  # type: ignore[union-attr]
    fut = _inflight.get(key)
    if fut is None:
        log.info("pulling image %s into %s", name, store.root)
        fut = asyncio.ensure_future(asyncio.to_thread(store.pull, name, sys.stderr.fileno()))
        _inflight[key] = fut
        fut.add_done_callback(lambda _f: _inflight.pop(key, None))
    try:
        await asyncio.shield(fut)
    except ImageError as exc:
        # Always a 4xx, even when the registry is at fault: the SDK reads a 5xx
        # on create as retryable server trouble (model.py).
        raise ApiError(400, exc.code, f"pulling image {name!r} failed: {exc}") from None
