"""Captured output: a bounded, byte-exact log per process, and its line view.

Rules this module keeps
-----------------------
* Bytes are stored exactly as read from the pipes, as *chunks*
  ``(stream, timestamp_ms, data)`` in arrival order. The combined view is that
  order; the stdout and stderr views filter it. Nothing is decoded on the way in.
* The store is bounded in bytes. When it is full the oldest chunks are dropped
  and counted per stream (``dropped``); a reader whose cursor falls behind the
  head learns how many bytes it missed. Nothing is dropped silently.
* Lines are derived from bytes, per reader, by :class:`LineSplitter`: split on
  ``\\n``, strip one ``\\r`` before it, decode UTF-8 with U+FFFD for invalid
  bytes, emit a final unterminated line at EOF, and cut lines longer than
  ``max_line`` bytes into pieces so no reader holds unbounded memory.
* A line's timestamp is the arrival time of its first byte. In the combined
  view lines are ordered by the arrival of the byte that completed them.
* Readers hold absolute chunk sequence numbers, so replay and live reading are
  the same loop over the same log: no gap and no duplicate between them.

Nothing here touches a file descriptor or the clock; the only asyncio object is
the :class:`Broadcast` that wakes waiting readers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from .fairness import LoopBudget

STDOUT = 0
STDERR = 1
STREAM_NAMES = ("stdout", "stderr")

# Per-chunk bookkeeping counted against the cap, so a flood of tiny writes
# cannot hold more memory than the cap suggests.
CHUNK_OVERHEAD = 64


class Broadcast:
    """Wake every waiter at once; waiters re-check state after waking."""

    __slots__ = ("_future",)

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    def notify(self) -> None:
        fut = self._future
        if fut is not None:
            self._future = None
            if not fut.done():
                fut.set_result(None)

    def wait(self) -> asyncio.Future[None]:
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        return self._future


Chunk = tuple[int, int, bytes]  # (stream, timestamp_ms, data)


class OutputPool:
    """A budget shared by every store: the daemon's total output memory.

    A per-process cap alone bounds nothing when processes are many (1,024
    records of 16 MiB is 16 GiB). When the total goes over ``limit_bytes`` the
    pool takes bytes back, oldest first, from settled stores (processes that are
    over), in the order they settled; only if that is not enough does the
    store being written give up its own oldest bytes. Every byte taken is
    counted as dropped by its store, so the API still says what was lost.
    """

    def __init__(self, limit_bytes: int | None) -> None:
        self.limit_bytes = limit_bytes
        self.total = 0
        self._settled: dict[int, OutputStore] = {}  # id -> store, in settling order

    def add(self, n: int) -> None:
        self.total += n

    def over(self) -> int:
        if self.limit_bytes is None:
            return 0
        return max(0, self.total - self.limit_bytes)

    def settled(self, store: OutputStore) -> None:
        self._settled[id(store)] = store

    def forget(self, store: OutputStore) -> None:
        """The store's record is gone: its bytes no longer count."""
        self._settled.pop(id(store), None)
        self.total -= store.retained_bytes

    def reclaim(self, writer: OutputStore) -> None:
        for key in list(self._settled):
            if self.over() <= 0:
                return
            store = self._settled[key]
            store.drop_oldest(self.over(), keep_last=False)
            if store.retained_bytes == 0:
                del self._settled[key]
        if self.over() > 0:
            writer.drop_oldest(self.over(), keep_last=True)


class OutputStore:
    """The chunks one process wrote, bounded by ``cap_bytes`` (and the pool's budget)."""

    def __init__(self, cap_bytes: int, pool: OutputPool | None = None) -> None:
        self.cap_bytes = max(cap_bytes, 1)
        self.pool = pool
        self._chunks: list[Chunk] = []
        self._head = 0  # index in _chunks of the oldest retained chunk
        self._first_seq = 0  # absolute sequence number of _chunks[0]
        self._size = 0
        self.total = [0, 0]  # bytes ever written, per stream
        self.dropped = [0, 0]  # bytes dropped from the head, per stream
        self.open = [True, True]  # False once a stream reached EOF (or was discarded)
        self.settled = False  # no reader should wait for more (see _state.py)
        self.changed = Broadcast()

    # --- writing ---

    def append(self, stream: int, data: bytes, ts_ms: int) -> None:
        if not data:
            return
        self._chunks.append((stream, ts_ms, data))
        self.total[stream] += len(data)
        n = len(data) + CHUNK_OVERHEAD
        self._size += n
        if self._size > self.cap_bytes:
            self.drop_oldest(self._size - self.cap_bytes, keep_last=True)
        pool = self.pool
        if pool is not None:
            pool.add(n)
            if pool.over():
                pool.reclaim(self)
        self.changed.notify()

    def close_stream(self, stream: int) -> None:
        self.open[stream] = False
        self.changed.notify()

    def settle(self) -> None:
        """Tell readers that the process is over: send what is there, then EOF."""
        if not self.settled:
            self.settled = True
            if self.pool is not None:
                self.pool.settled(self)
            self.changed.notify()

    def drop_oldest(self, nbytes: int, *, keep_last: bool) -> None:
        """Drop at least ``nbytes`` from the head, counting them as dropped.

        ``keep_last`` keeps the newest chunk even when it alone is over: a
        live process's latest output is never thrown away as it arrives.
        """
        chunks = self._chunks
        keep = 1 if keep_last else 0
        freed = 0
        while freed < nbytes and len(chunks) - self._head > keep:
            stream, _ts, data = chunks[self._head]
            chunks[self._head] = (stream, 0, b"")  # free the bytes now
            self._head += 1
            n = len(data) + CHUNK_OVERHEAD
            freed += n
            self.dropped[stream] += len(data)
        self._size -= freed
        if self.pool is not None:
            self.pool.add(-freed)
        if self._head > 1024 and self._head * 2 > len(chunks):
            del chunks[: self._head]
            self._first_seq += self._head
            self._head = 0

    # --- reading ---

    @property
    def start_seq(self) -> int:
        """Sequence number of the oldest retained chunk."""
        return self._first_seq + self._head

    @property
    def end_seq(self) -> int:
        """Sequence number the next chunk will get."""
        return self._first_seq + len(self._chunks)

    @property
    def retained_bytes(self) -> int:
        return self._size

    def is_drained(self, streams: Iterable[int]) -> bool:
        return all(not self.open[s] for s in streams)

    def read(self, seq: int, limit_bytes: int = 1 << 30) -> tuple[int, list[Chunk], int]:
        """Chunks from ``seq`` on, up to about ``limit_bytes``.

        Returns ``(next_seq, chunks, missed)`` where ``missed`` is the number of
        chunks between ``seq`` and the head that were already dropped.
        """
        missed = 0
        if seq < self.start_seq:
            missed = self.start_seq - seq
            seq = self.start_seq
        i = seq - self._first_seq
        out: list[Chunk] = []
        size = 0
        chunks = self._chunks
        n = len(chunks)
        while i < n and size < limit_bytes:
            chunk = chunks[i]
            out.append(chunk)
            size += len(chunk[2])
            i += 1
        return self._first_seq + i, out, missed

    def bytes_of(self, stream: int) -> bytes:
        """Every retained byte of one stream, exactly as written."""
        _, chunks, _ = self.read(self.start_seq)
        return b"".join(data for s, _ts, data in chunks if s == stream)


class Line(NamedTuple):
    stream: int
    timestamp_ms: int
    text: str


class LineRun(NamedTuple):
    """Consecutive lines of one stream that share a timestamp."""

    stream: int
    timestamp_ms: int
    texts: list[str]


class LineSplitter:
    """Turns chunks into runs of lines, one partial-line buffer per stream.

    The hot path splits and decodes a whole chunk with one C call each
    (``bytes.find``/``decode``/``str.split``); only the line that continues a
    partial one and the tail are handled on their own. That is equivalent to
    decoding line by line because ``\n`` never occurs inside a UTF-8 sequence.
    """

    __slots__ = ("_pending", "_pending_ts", "max_line", "streams")

    def __init__(self, streams: tuple[int, ...] = (STDOUT, STDERR), max_line: int = 1 << 20):
        self.streams = streams
        self.max_line = max_line
        self._pending: list[bytearray] = [bytearray(), bytearray()]
        self._pending_ts = [0, 0]

    def feed(self, chunks: Iterable[Chunk]) -> list[LineRun]:
        out: list[LineRun] = []
        streams = self.streams
        max_line = self.max_line
        for stream, ts, data in chunks:
            if stream not in streams or not data:
                continue
            pending = self._pending[stream]
            if not pending:
                self._pending_ts[stream] = ts
            first = data.find(b"\n")
            if first < 0:
                pending += data
                if len(pending) >= max_line:
                    out.extend(self._cut(stream, ts))
                continue
            if pending:
                pending += data[:first]
                head = bytes(pending)
                pending.clear()
            else:
                head = data[:first]
            out.extend(self._lines(stream, self._pending_ts[stream], head))
            last = data.rfind(b"\n")
            if last > first:
                block = data[first + 1 : last]
                if last - first - 1 > max_line:
                    for raw in block.split(b"\n"):
                        out.extend(self._lines(stream, ts, raw))
                else:
                    text = block.decode("utf-8", "replace")
                    if "\r" in text:
                        text = text.replace("\r\n", "\n")
                        if text.endswith("\r"):
                            text = text[:-1]
                    out.append(LineRun(stream, ts, text.split("\n")))
            if last + 1 < len(data):
                pending += data[last + 1 :]
                self._pending_ts[stream] = ts
                if len(pending) >= max_line:
                    out.extend(self._cut(stream, ts))
        return out

    def _lines(self, stream: int, ts: int, raw: bytes) -> list[LineRun]:
        """One complete line, cut into pieces when it is longer than ``max_line``."""
        if len(raw) <= self.max_line:
            return [LineRun(stream, ts, [_decode(raw)])]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        buf = bytearray(raw)
        pieces = []
        while len(buf) > self.max_line:
            end = _utf8_boundary(buf, self.max_line)
            pieces.append(bytes(buf[:end]).decode("utf-8", "replace"))
            del buf[:end]
        pieces.append(bytes(buf).decode("utf-8", "replace"))
        return [LineRun(stream, ts, pieces)]

    def _cut(self, stream: int, ts: int) -> Iterator[LineRun]:
        pending = self._pending[stream]
        while len(pending) >= self.max_line:
            end = _utf8_boundary(pending, self.max_line)
            if end > 1 and pending[end - 1] == 0x0D:
                end -= 1  # keep a CR with the byte after it: it may be half of a CRLF
            piece = bytes(pending[:end])
            del pending[:end]
            yield LineRun(stream, self._pending_ts[stream], [piece.decode("utf-8", "replace")])
            self._pending_ts[stream] = ts

    def flush(self) -> list[LineRun]:
        """Emit the unterminated tail of each stream as a final line."""
        out = []
        for stream in self.streams:
            pending = self._pending[stream]
            if pending:
                out.append(LineRun(stream, self._pending_ts[stream], [_decode(bytes(pending))]))
                pending.clear()
        return out


def _utf8_boundary(buf: bytearray, end: int) -> int:
    """Move ``end`` back so ``buf[:end]`` does not stop inside a UTF-8 sequence.

    Decided from the bytes before ``end`` only, since the rest of a sequence
    may not have arrived yet.
    """
    for back in range(1, 4):
        i = end - back
        if i <= 0:
            break
        b = buf[i]
        if b & 0xC0 == 0x80:
            continue  # a continuation byte: look further back for its lead
        if b >= 0xC0 and back < (2 if b < 0xE0 else 3 if b < 0xF0 else 4):
            return i  # the sequence starting at i would run past end
        break
    return end


def _decode(raw: bytes) -> str:
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return raw.decode("utf-8", "replace")


def snapshot_lines(store: OutputStore, streams: tuple[int, ...], max_line: int) -> list[Line]:
    """All retained lines of ``streams``, including an unterminated tail."""
    splitter = LineSplitter(streams, max_line)
    _, chunks, _ = store.read(store.start_seq)
    runs = splitter.feed(chunks)
    runs.extend(splitter.flush())
    return [Line(r.stream, r.timestamp_ms, t) for r in runs for t in r.texts]


@dataclass(slots=True)
class Batch:
    """What a follower sends in one write."""

    lines: list[LineRun]
    missed_chunks: int  # chunks dropped from the head before this reader got to them
    final: bool  # the process is over and everything was read: send EOF after this
    idle: bool = False  # nothing happened for a while: a keep-alive is due


async def follow(
    store: OutputStore,
    streams: tuple[int, ...],
    *,
    max_line: int,
    budget: LoopBudget | None = None,
    batch_bytes: int = 64 << 10,
    idle_after: float = 15.0,
) -> AsyncIterator[Batch]:
    """Replay everything retained, then go live, then end once settled.

    Replay and live reading are one loop over one cursor, so there is neither
    a gap nor a duplicate between them. ``settled`` is sampled *before* each
    read: once it was true and the read caught up, nothing more can come.
    """
    splitter = LineSplitter(streams, max_line)
    seq = 0
    while True:
        if budget is not None:
            await budget.turn()
        started = time.perf_counter()
        settled = store.settled
        seq, chunks, missed = store.read(seq, batch_bytes)
        lines = splitter.feed(chunks)
        if budget is not None:
            budget.charge(time.perf_counter() - started)
        caught_up = seq >= store.end_seq
        if settled and caught_up:
            lines.extend(splitter.flush())
            yield Batch(lines, missed, final=True)
            return
        if lines or missed:
            yield Batch(lines, missed, final=False)
        if not caught_up:
            # A write to a fast client may never suspend: hand the loop back so
            # one follower cannot hold it for a whole backlog.
            await asyncio.sleep(0)
        else:
            try:
                await asyncio.wait_for(asyncio.shield(store.changed.wait()), idle_after)
            except TimeoutError:
                yield Batch([], 0, final=False, idle=True)
