"""Running the blocking steps of one file in worker threads, safely under cancellation.

aiohttp cancels a handler when its client disconnects. A step already running
in a thread cannot be stopped, so cleanup (closing the descriptor, removing a
temp file) must wait for it: closing a descriptor under a running ``read`` or
``writev`` could let its number be reused by an unrelated ``open`` and have
bytes land in the wrong file.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")


class Serial:
    """Steps of one file, run in ``executor`` one at a time, in order."""

    def __init__(self, executor: Executor | None = None) -> None:
        self._executor = executor
        self._last: asyncio.Future[Any] | None = None

    async def start(self, fn: Callable[..., Any], *args: Any) -> None:
        """Start ``fn`` once the previous step has succeeded; don't wait for it."""
        await self._wait()
        self._last = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        await self.start(fn, *args)
        result: T = await self._wait()
        return result

    async def _wait(self) -> Any:
        if self._last is None:
            return None
        # Shielded: cancelling the caller must not abandon a running step.
        return await asyncio.shield(self._last)

    def then(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` on the event loop as soon as no step is running."""

        def after(done: asyncio.Future[Any]) -> None:
            if not done.cancelled():
                done.exception()  # retrieved: the caller is already reporting an error
            fn()

        last = self._last
        if last is None:
            fn()
        elif last.done():
            after(last)
        else:
            last.add_done_callback(after)
