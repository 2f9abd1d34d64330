"""The PTY engine without HTTP: ring, token bucket, ids, and the attachment rules."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time

import pytest

from sandboxd.engine.pty import (
    PRE_READY_OVERFLOW,
    TERMINATED,
    ByteRing,
    Exited,
    InputRateExceeded,
    PtyManager,
    PtySettings,
    TokenBucket,
    clamp_size,
    get_winsize,
    new_session_id,
    new_token,
    session_members,
)

# --- pure parts ---


def test_ring_keeps_the_last_capacity_bytes_across_wraps() -> None:
    ring = ByteRing(10)
    ring.append(b"abcd")
    assert (ring.start, ring.end, ring.read(0, 100)) == (0, 4, b"abcd")
    ring.append(b"efghij")  # exactly full
    assert ring.read(0, 100) == b"abcdefghij"
    ring.append(b"klm")  # wraps
    assert (ring.start, ring.end) == (3, 13)
    assert ring.read(0, 100) == b"defghijklm"  # clamped to start
    assert ring.read(5, 4) == b"fghi"
    assert ring.read(8, 100) == b"ijklm"  # crosses the wrap point
    assert ring.read(13, 100) == b""
    ring.append(b"0123456789XYZ")  # longer than capacity: only the tail survives
    assert (ring.start, ring.end, len(ring)) == (16, 26, 10)
    assert ring.read(0, 100) == b"3456789XYZ"


def test_ring_matches_a_reference_model() -> None:
    import random

    rnd = random.Random(7)
    ring = ByteRing(97)
    model = bytearray()
    for i in range(500):
        chunk = bytes([i % 256]) * rnd.randint(0, 150)
        ring.append(chunk)
        model += chunk
        assert ring.end == len(model)
        start = rnd.randint(max(0, len(model) - 120), len(model))
        limit = rnd.randint(0, 130)
        lo = max(start, ring.start)
        assert ring.read(start, limit) == bytes(model[lo : min(len(model), lo + limit)])


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=100, burst=100, now=0.0)
    assert bucket.take(100, 0.0)
    assert not bucket.take(1, 0.0)
    assert bucket.take(50, 0.5)  # refilled 50
    assert not bucket.take(60, 0.5)
    assert bucket.take(100, 10.0)  # capped at the burst


def test_clamp_ids_and_tokens() -> None:
    assert clamp_size(0, 0) == (1, 1)
    assert clamp_size(-5, 5000) == (1, 1000)
    assert clamp_size(600, 80) == (500, 80)
    sid = new_session_id()
    assert re.fullmatch(r"[A-Za-z0-9_-]{21}", sid)
    assert new_session_id() != sid
    assert re.fullmatch(r"[0-9a-f]{64}", new_token())


def test_settings_from_env() -> None:
    s = PtySettings.from_env(
        {"SANDBOXD_PTY_IDLE_SECS": "12.5", "SANDBOXD_PTY_DEAD_RETENTION_SECS": "nope"}
    )
    assert s.idle_secs == 12.5
    assert s.dead_retention_secs == 60.0
    assert PtySettings.from_env({}, max_sessions=3).max_sessions == 3


def test_session_members_finds_a_setsid_tree() -> None:
    p = subprocess.Popen(["setsid", "sh", "-c", "sleep 30 & sleep 30"])
    try:
        members: list[int] = []
        deadline = time.monotonic() + 5
        while len(members) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
            members = session_members(p.pid)
        assert p.pid in members and len(members) == 3
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


# --- sessions, in process ---


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 20))


async def _drain(att, limit: int = 1 << 20):  # type: ignore[no-untyped-def]
    out = bytearray()
    while True:
        ev = await att.next(limit)
        if isinstance(ev, bytes):
            out += ev
        else:
            return bytes(out), ev


def test_exit_code_history_and_late_attach() -> None:
    async def main() -> None:
        mgr = PtyManager(PtySettings(dead_retention_secs=30), cgroups=None)
        try:
            s = mgr.create("sh", args=["-c", "printf 'one\\ntwo\\n'; exit 5"], rows=7, cols=33)
            att = s.attach()
            att.set_ready()
            data, ev = await _drain(att)
            assert ev == Exited(5)
            assert data == b"one\r\ntwo\r\n"  # onlcr: a real terminal
            info = s.info()
            assert info["exit_code"] == 5 and info["is_alive"] is False
            assert info["ended_at"] is not None and mgr.live_count == 0
            late = s.attach()  # after the end: history, then the exit again
            late.set_ready()
            assert await _drain(late) == (data, Exited(5))
        finally:
            await mgr.close()

    _run(main())


def test_signal_exit_is_128_plus_signal() -> None:
    async def main() -> None:
        mgr = PtyManager(cgroups=None)
        try:
            s = mgr.create("sh", args=["-c", "kill -TERM $$"])
            await s.wait_ended()
            assert (s.exit_code, s.signal) == (128 + 15, 15)
            assert s.info()["signal"] == 15
        finally:
            await mgr.close()

    _run(main())


def test_slow_client_skips_and_unready_client_overflows() -> None:
    async def main() -> None:
        mgr = PtyManager(PtySettings(history_bytes=64 << 10), cgroups=None)
        try:
            # stty raw: no \n -> \r\n, so byte counts are exact.
            s = mgr.create("sh", args=["-c", "stty raw -echo; sleep 0.3; head -c 300000 /dev/zero"])
            slow = s.attach()
            slow.set_ready()
            unready = s.attach()
            await s.wait_ended()
            assert unready.poll() is PRE_READY_OVERFLOW
            data, ev = await _drain(slow)
            assert ev == Exited(0)
            assert slow.skipped > 0
            assert slow.skipped + len(data) == 300000  # a gap, never a duplicate
            assert len(data) <= 64 << 10
        finally:
            await mgr.close()

    _run(main())


def test_resize_input_and_terminate() -> None:
    async def main() -> None:
        mgr = PtyManager(PtySettings(input_rate=4096), cgroups=None)
        try:
            s = mgr.create("cat", rows=10, cols=20)
            assert s._master is not None and get_winsize(s._master) == (10, 20)
            assert s.resize(0, 5000) == (1, 1000)
            assert get_winsize(s._master) == (1, 1000)
            att = s.attach()
            att.set_ready()
            await s.write_input(b"hi\n")
            seen = b""
            while b"hi\r\n" not in seen:
                ev = await att.next()
                assert isinstance(ev, bytes)
                seen += ev
            with pytest.raises(InputRateExceeded):
                await s.write_input(b"x" * 5000)
            assert await mgr.delete(s.id)
            assert att.poll() is TERMINATED
            assert mgr.get(s.id) is None and not await mgr.delete(s.id)
            assert s.exit_code == 128 + signal.SIGHUP
        finally:
            await mgr.close()

    _run(main())


def test_stop_escalates_to_sigkill_after_the_grace() -> None:
    async def main() -> None:
        mgr = PtyManager(PtySettings(kill_grace_secs=0.3), cgroups=None)
        try:
            s = mgr.create("sh", args=["-c", "trap '' HUP; sleep 100; :"])
            await asyncio.sleep(0.2)
            tree = session_members(s.pid)
            assert len(tree) == 2  # sh and sleep, both ignoring SIGHUP
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            assert await mgr.delete(s.id)
            assert 0.3 <= loop.time() - t0 < 2
            assert s.signal == signal.SIGKILL and session_members(s.pid) == []
        finally:
            await mgr.close()

    _run(main())
