"""Streaming an upload into a :class:`StagedFile` without blocking the event loop.

Chunks are gathered into batches of about :data:`BATCH_BYTES` and each batch is
written with one ``writev`` in a worker thread, while the next batch is being
received: memory stays at about two batches per upload whatever the file size,
and the event loop never waits on the disk (a write can stall for a long time
once the kernel throttles dirty pages). One thread hop per batch instead of
per network chunk (typically 64 KiB or less) keeps the hop cost negligible.

Cancellation (the client went away) or any error discards the temp file once
the step running in the worker thread has finished (see :mod:`.threads`).
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from concurrent.futures import Executor

from .errors import INCOMPLETE_BODY, FilesError
from .staging import StagedFile
from .threads import Serial

BATCH_BYTES = 1 << 20


async def receive(
    path: str,
    chunks: AsyncIterable[bytes],
    *,
    expected_length: int | None = None,
    executor: Executor | None = None,
    batch_bytes: int = BATCH_BYTES,
) -> int:
    """Replace ``path`` with the bytes of ``chunks``, atomically; return the byte count.

    ``expected_length`` (the request's Content-Length) guards against a body
    that ended early without an error being raised by the transport.
    """
    staged = StagedFile(path)
    steps = Serial(executor)
    received = 0
    try:
        await steps.run(staged.open)
        batch: list[bytes] = []
        batched = 0
        async for chunk in chunks:
            batch.append(chunk)
            batched += len(chunk)
            if batched >= batch_bytes:
                await steps.start(staged.write, batch)
                received += batched
                batch, batched = [], 0
        if batch:
            await steps.start(staged.write, batch)
            received += batched
        if expected_length is not None and received != expected_length:
            raise FilesError(
                INCOMPLETE_BODY,
                f"the body ended after {received} of {expected_length} bytes; {path} is unchanged",
            )
        await steps.run(staged.commit)
    except BaseException:
        steps.then(staged.discard)
        raise
    return received
