"""The sans-IO parts of the engine: output store, line view, exit classification."""

from __future__ import annotations

import os
import random
import signal

import pytest

from sandboxd.engine._state import (
    ExitReason,
    ProcessStatus,
    RestartPolicy,
    classify_exit,
    restart_decision,
)
from sandboxd.engine.output import STDERR, STDOUT, LineSplitter, OutputStore, snapshot_lines


def lines_of(store: OutputStore, streams=(STDOUT, STDERR), max_line: int = 1 << 20) -> list[str]:  # type: ignore[no-untyped-def]
    return [ln.text for ln in snapshot_lines(store, streams, max_line)]


def test_split_on_newline_strip_crlf_and_final_line() -> None:
    s = OutputStore(1 << 20)
    s.append(STDOUT, b"a\r\nb\n\nc\rd\nlast", 1)
    assert lines_of(s) == ["a", "b", "", "c\rd", "last"]


def test_lines_join_across_chunks_and_keep_first_byte_timestamp() -> None:
    s = OutputStore(1 << 20)
    s.append(STDOUT, b"hel", 10)
    s.append(STDOUT, b"lo\nwor", 20)
    s.append(STDOUT, b"ld\n", 30)
    got = snapshot_lines(s, (STDOUT,), 1 << 20)
    assert [(ln.text, ln.timestamp_ms) for ln in got] == [("hello", 10), ("world", 20)]


def test_invalid_utf8_becomes_replacement_and_split_sequences_survive() -> None:
    s = OutputStore(1 << 20)
    euro = "€".encode()
    s.append(STDOUT, b"a" * 8191 + euro[:1], 1)
    s.append(STDOUT, euro[1:] + b"\n\xff\xfebad\n", 2)
    assert lines_of(s) == ["a" * 8191 + "€", "\ufffd\ufffdbad"]


def test_combined_view_is_in_arrival_order() -> None:
    s = OutputStore(1 << 20)
    s.append(STDOUT, b"o1\n", 1)
    s.append(STDERR, b"e1\n", 2)
    s.append(STDOUT, b"o2\n", 3)
    got = snapshot_lines(s, (STDOUT, STDERR), 1 << 20)
    assert [(ln.stream, ln.text) for ln in got] == [(STDOUT, "o1"), (STDERR, "e1"), (STDOUT, "o2")]
    assert lines_of(s, (STDERR,)) == ["e1"]


def test_long_lines_are_cut_without_splitting_utf8() -> None:
    splitter = LineSplitter((STDOUT,), max_line=10)
    data = ("é" * 12).encode()  # 24 bytes, 2 bytes per char
    runs = splitter.feed([(STDOUT, 1, data)]) + splitter.flush()
    texts = [t for r in runs for t in r.texts]
    assert "".join(texts) == "é" * 12
    assert all("\ufffd" not in t for t in texts)
    assert all(len(t.encode()) <= 10 for t in texts)


def reference_lines(data: bytes, max_line: int) -> list[str]:
    """The line rules written the slow, obvious way."""
    out = []
    for i, raw in enumerate(data.split(b"\n")):
        last = i == data.count(b"\n")
        if last and not raw:
            break
        if raw.endswith(b"\r") and not last:
            raw = raw[:-1]
        while len(raw) > max_line:
            cut = max_line
            while cut > max_line - 3 and cut < len(raw) and (raw[cut] & 0xC0) == 0x80:
                cut -= 1
            out.append(raw[:cut].decode("utf-8", "replace"))
            raw = raw[cut:]
        if last and raw.endswith(b"\r"):
            raw = raw[:-1]
        out.append(raw.decode("utf-8", "replace"))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_fast_splitter_matches_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = [
        b"a",
        b"b",
        b"\n",
        b"\r",
        b"\r\n",
        "é".encode(),
        "€".encode(),
        b"\xff",
        b"\xe2\x82",
        b" ",
    ]
    data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3000)))
    max_line = rng.choice([7, 64, 1 << 20])
    splitter = LineSplitter((STDOUT,), max_line=max_line)
    runs = []
    pos = 0
    while pos < len(data):
        n = rng.randint(1, 300)
        runs += splitter.feed([(STDOUT, pos, data[pos : pos + n])])
        pos += n
    runs += splitter.flush()
    got = [t for r in runs for t in r.texts]
    if max_line >= len(data):
        assert got == reference_lines(data, max_line)
    else:
        # Cut points depend on chunking; the text and the line breaks do not.
        assert "".join(got) == "".join(reference_lines(data, max_line))
        assert all(len(t.encode()) <= max_line for t in got if "\ufffd" not in t)


def test_cap_drops_oldest_and_counts_per_stream() -> None:
    s = OutputStore(cap_bytes=1000)
    for i in range(100):
        s.append(STDOUT if i % 2 == 0 else STDERR, b"x" * 99 + b"\n", i)
    assert s.retained_bytes <= 1000
    assert s.total == [5000, 5000]
    assert s.dropped[STDOUT] > 0 and s.dropped[STDERR] > 0
    assert s.total[STDOUT] - s.dropped[STDOUT] == len(s.bytes_of(STDOUT))
    # A reader that started at 0 learns how much it missed.
    _, chunks, missed = s.read(0)
    assert missed == s.start_seq > 0
    assert len(chunks) == s.end_seq - s.start_seq


def test_store_is_byte_exact() -> None:
    s = OutputStore(1 << 20)
    blob = os.urandom(100_000)
    for i in range(0, len(blob), 4096):
        s.append(STDOUT, blob[i : i + 4096], i)
    assert s.bytes_of(STDOUT) == blob


def test_classify_exit() -> None:
    ex = classify_exit(os.CLD_EXITED, 3, ended_at_ms=5)
    assert (ex.status, ex.reason, ex.exit_code, ex.signal) == (
        ProcessStatus.EXITED,
        ExitReason.EXITED,
        3,
        None,
    )
    ex = classify_exit(os.CLD_KILLED, signal.SIGKILL, ended_at_ms=5)
    assert (ex.status, ex.reason, ex.signal) == (ProcessStatus.SIGNALED, ExitReason.SIGNALED, 9)
    ex = classify_exit(os.CLD_KILLED, signal.SIGKILL, ended_at_ms=5, oom_kills=1)
    assert (ex.status, ex.reason, ex.oom_killed) == (
        ProcessStatus.OOM_KILLED,
        ExitReason.OOM_KILLED,
        True,
    )
    ex = classify_exit(os.CLD_KILLED, signal.SIGKILL, ended_at_ms=5, oom_kills=1, timed_out=True)
    assert ex.reason is ExitReason.TIMED_OUT and ex.status is ProcessStatus.SIGNALED
    # Another signal with an OOM count in the cgroup (a child was OOM-killed) is not an OOM.
    ex = classify_exit(os.CLD_KILLED, signal.SIGTERM, ended_at_ms=5, oom_kills=1)
    assert ex.reason is ExitReason.SIGNALED
    assert classify_exit(os.CLD_DUMPED, signal.SIGSEGV, ended_at_ms=5).signal == signal.SIGSEGV


def test_restart_backoff_grows_and_caps() -> None:
    crash = classify_exit(os.CLD_EXITED, 1, ended_at_ms=0)
    delays = [
        restart_decision(
            RestartPolicy.ALWAYS,
            crash,
            restart_count=i,
            max_restarts=None,
            backoff_step=i,
            initial_backoff_ms=100,
            max_backoff_ms=1000,
        ).delay_ms
        for i in range(6)
    ]
    assert delays == [100, 200, 400, 800, 1000, 1000]
    ok = classify_exit(os.CLD_EXITED, 0, ended_at_ms=0)
    kw = dict(
        restart_count=0, max_restarts=None, backoff_step=0, initial_backoff_ms=1, max_backoff_ms=1
    )
    assert restart_decision(RestartPolicy.ON_FAILURE, ok, **kw).restart is False  # type: ignore[arg-type]
    assert restart_decision(RestartPolicy.ALWAYS, ok, **kw).restart is True  # type: ignore[arg-type]
    stop = restart_decision(
        RestartPolicy.ALWAYS, crash, **{**kw, "restart_count": 3, "max_restarts": 3}
    )  # type: ignore[arg-type]
    assert stop.restart is False and "max_restarts" in (stop.reason or "")


def test_the_pool_bounds_all_stores_and_takes_from_finished_ones_first() -> None:
    from sandboxd.engine.output import CHUNK_OVERHEAD, OutputPool

    pool = OutputPool(limit_bytes=10_000)
    done = OutputStore(1 << 20, pool)
    for i in range(20):
        done.append(STDOUT, b"d" * 200, i)
    done.settle()
    live = OutputStore(1 << 20, pool)
    for i in range(20):
        live.append(STDOUT, b"l" * 200, i)
        assert pool.total <= 10_000 + 200 + CHUNK_OVERHEAD
    # The finished store paid first; the live one kept everything it could.
    assert done.dropped[STDOUT] > 0
    assert live.dropped[STDOUT] == 0
    for i in range(20, 200):
        live.append(STDOUT, b"l" * 200, i)
    assert pool.total <= 10_000
    assert live.dropped[STDOUT] > 0  # nothing left to take from others: its own oldest bytes
    assert live.total[STDOUT] - live.dropped[STDOUT] == len(live.bytes_of(STDOUT))
    assert pool.total == done.retained_bytes + live.retained_bytes
    pool.forget(done)
    assert pool.total == live.retained_bytes
