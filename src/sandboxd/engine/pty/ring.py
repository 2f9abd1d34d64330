"""A terminal's history and its input budget: pure data structures, no I/O.

:class:`ByteRing` keeps the last bytes of a stream addressed by absolute
offsets (every client of a session is just an offset into it);
:class:`TokenBucket` bounds a session's input rate.
"""

from __future__ import annotations


class ByteRing:
    """The last ``capacity`` bytes of a stream, addressed by absolute offsets.

    ``end`` counts every byte ever appended; bytes ``[start, end)`` are
    retained. The buffer grows on demand up to ``capacity`` (most sessions never
    write a full MiB), then wraps.
    """

    __slots__ = ("_buf", "capacity", "end")

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._buf = bytearray()
        self.end = 0

    @property
    def start(self) -> int:
        return max(0, self.end - self.capacity)

    def __len__(self) -> int:
        return self.end - self.start

    def append(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        n = len(view)
        if n == 0:
            return
        cap = self.capacity
        if n >= cap:
            # Only the tail survives; pretend the rest was written and overwritten.
            self.end += n - cap
            view = view[n - cap :]
            n = cap
        buf = self._buf
        if len(buf) < cap:
            # Still filling linearly: position == end until the buffer is full.
            room = cap - len(buf)
            take = min(room, n)
            buf += view[:take]
            self.end += take
            view = view[take:]
            n -= take
            if n == 0:
                return
        pos = self.end % cap
        first = min(n, cap - pos)
        buf[pos : pos + first] = view[:first]
        if first < n:
            buf[: n - first] = view[first:]
        self.end += n

    def read(self, offset: int, limit: int) -> bytes:
        """Up to ``limit`` bytes from ``offset`` (clamped to ``start``)."""
        offset = max(offset, self.start)
        stop = min(self.end, offset + max(0, limit))
        if stop <= offset:
            return b""
        cap = self.capacity
        p = offset % cap
        q = stop - offset
        buf = self._buf
        if p + q <= cap:
            return bytes(buf[p : p + q])
        return bytes(buf[p:]) + bytes(buf[: q - (cap - p)])


class TokenBucket:
    """``rate`` bytes per second with a burst of ``burst`` bytes."""

    __slots__ = ("_t", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self._t = now

    def take(self, n: int, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self._t) * self.rate)
        self._t = now
        if n > self.tokens:
            return False
        self.tokens -= n
        return True
