"""``sandboxd host``, lifecycle part two, end to end with the official SDK.

Suspend/resume with a counting process, filesystem snapshots and restores
(across a restart of the control plane), live resize, warm pools, and 404s for
unknown ids. Real bubblewrap sandboxes under a host subprocess, as in
``test_host.py`` (whose helpers these are); skips with the reason where that
cannot run.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import wait_for
from .test_host import NS, Host, _cgroup_dirs, _cleanup, assert_gone, make_state_root, start_host

P = "/v1/namespaces/default"


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    yield from make_state_root("sbl")


@pytest.fixture(scope="module")
def host(state_root: Path) -> Iterator[Host]:
    h = start_host(state_root / "s")
    yield h
    with contextlib.suppress(httpx.HTTPError), h.http() as c:
        for p in c.get(f"{P}/sandbox-pools").json()["pools"]:
            c.delete(f"{P}/sandbox-pools/{p['id']}")
    _cleanup(h)
    h.stop()


def _sdk(h: Host) -> dict[str, object]:
    return {"api_url": h.url, "api_key": None}


def _client(h: Host):  # type: ignore[no-untyped-def]
    """Pools are only on SandboxClient, which warns that it is deprecated."""
    from tensorlake.sandbox import SandboxClient

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return SandboxClient(api_url=h.url, api_key=None)


def _host_file(h: Host, sandbox_id: str, name: str) -> Path | None:
    """A file the sandbox wrote, read from the host side (its writable layer)."""
    return next((h.state / "sandboxes" / sandbox_id / "rw").rglob(name), None)


COUNTER = (
    "import time\n"
    "i = 0\n"
    "with open('/tmp/count', 'a', buffering=1) as f:\n"
    "    while True:\n"
    "        i += 1\n"
    "        f.write(f'{i}\\n')\n"
    "        time.sleep(0.05)\n"
)


def test_suspend_stops_a_counter_and_resume_continues_it_exactly(host: Host) -> None:
    from tensorlake.sandbox import Sandbox

    sbx = Sandbox.create(name="counter", memory_mb=256, **_sdk(host))
    try:
        sbx.start_process("python3", args=["-c", COUNTER])

        def counted() -> list[int]:
            f = _host_file(host, sbx.sandbox_id, "count")
            text = f.read_text() if f is not None else ""
            return [int(x) for x in text.split("\n")[:-1]]  # complete lines only

        wait_for(lambda: len(counted()) >= 5, timeout=10)
        sbx.suspend()
        assert sbx.status.value == "suspended"
        frozen_at = counted()
        time.sleep(0.6)  # 12 ticks if it were running
        assert counted() == frozen_at, "the counter moved while suspended"
        sbx.resume()
        assert sbx.status.value == "running"
        wait_for(lambda: len(counted()) >= len(frozen_at) + 3, timeout=10)
        after = counted()
        # Not restarted, nothing lost: the next value is the last one + 1.
        assert after[: len(frozen_at)] == frozen_at
        assert after[len(frozen_at)] == frozen_at[-1] + 1
        assert after == list(range(1, len(after) + 1))
        # wait_ms is the server's wait: 0 may answer 202 (the SDK then polls).
        with host.http() as c:
            r = c.post(f"{NS}/{sbx.sandbox_id}/suspend", params={"wait_ms": "soon"})
            assert (r.status_code, r.json()["code"]) == (400, "INVALID_WAIT_MS")
            r = c.post(f"{NS}/{sbx.sandbox_id}/suspend", params={"wait_ms": 0})
            assert r.status_code in (200, 202)
            wait_for(lambda: c.get(f"{NS}/counter").json()["status"] == "suspended", timeout=5)
            r = c.post(f"{NS}/{sbx.sandbox_id}/resume", params={"wait_ms": 5000})
            assert r.status_code == 200
            assert c.get(f"{NS}/counter").json()["status"] == "running"
    finally:
        sbx.terminate()
    assert_gone(host, sbx.sandbox_id)


def test_snapshot_restore_survives_a_restart_and_memory_is_refused(state_root: Path) -> None:
    from tensorlake.sandbox import Sandbox
    from tensorlake.sandbox.exceptions import RemoteAPIError, SandboxError

    h = start_host(state_root / "r", warm=0)
    try:
        src = Sandbox.create(memory_mb=192, disk_mb=2048, **_sdk(h))
        setup = (
            "mkdir -p /root/proj && echo before > /root/proj/keep.txt && chmod 600 "
            "/root/proj/keep.txt && ln -s keep.txt /root/proj/link && rm -f /etc/motd"
        )
        assert src.run("sh", args=["-c", setup]).exit_code == 0
        t0 = time.monotonic()
        snap = src.checkpoint()
        took = time.monotonic() - t0
        assert snap is not None and snap.status.value == "completed"
        assert snap.snapshot_type is not None and snap.snapshot_type.value == "filesystem"
        assert snap.size_bytes and snap.sandbox_id == src.sandbox_id
        print(f"\ncheckpoint(): {took * 1000:.0f} ms, {snap.size_bytes} bytes")
        src.run("sh", args=["-c", "echo later > /root/proj/after.txt"])
        assert src.status.value == "running"  # thawed
        assert snap.snapshot_id in [s.snapshot_id for s in src.list_snapshots()]
        with h.http() as c:
            r = c.post(f"{NS}/{src.sandbox_id}/snapshot", json={"snapshot_type": "memory"})
            assert (r.status_code, r.json()["code"]) == (400, "UNSUPPORTED_SNAPSHOT_TYPE")
            assert "vDSO" in r.json()["error"]
            r = c.post(NS, json={"snapshot_id": "snap-0000000000000000"})
            assert (r.status_code, r.json()["code"]) == (404, "SNAPSHOT_NOT_FOUND")
        from tensorlake.sandbox.models import CheckpointType

        with pytest.raises(SandboxError):
            src.checkpoint(checkpoint_type=CheckpointType.MEMORY)
        src.terminate()

        h.stop()  # the snapshot and its record outlive the control plane
        h = start_host(state_root / "r", warm=0)
        got = Sandbox.get_snapshot(snap.snapshot_id, **_sdk(h))
        assert (got.status.value, got.size_bytes) == ("completed", snap.size_bytes)
        assert snap.snapshot_id in [s.snapshot_id for s in _client(h).list_snapshots()]

        clone = Sandbox.create(snapshot_id=snap.snapshot_id, **_sdk(h))
        fresh = Sandbox.create(memory_mb=128, **_sdk(h))
        try:
            r = clone.run(
                "sh",
                args=[
                    "-c",
                    "cat /root/proj/link; stat -c %a /root/proj/keep.txt; "
                    "test -e /root/proj/after.txt || echo no-after; "
                    "test -e /etc/motd || echo no-motd",
                ],
            )
            assert r.stdout.split() == ["before", "600", "no-after", "no-motd"], r.stdout + r.stderr
            res = clone.info().resources  # inherited: the SDK sent no resources
            assert (res.memory_mb, res.disk_mb) == (192, 2048)
            assert fresh.run("test", args=["-e", "/root/proj/keep.txt"]).exit_code != 0
            # The image has /etc/motd: the clone lacks it through the layer's whiteout.
            assert fresh.run("test", args=["-e", "/etc/motd"]).exit_code == 0
        finally:
            clone.terminate()
            fresh.terminate()

        Sandbox.delete_snapshot(snap.snapshot_id, **_sdk(h))
        with pytest.raises(RemoteAPIError) as e:
            Sandbox.get_snapshot(snap.snapshot_id, **_sdk(h))
        assert e.value.status_code == 404
        assert not list((h.state / "snapshots").iterdir())
    finally:
        _cleanup(h)
        h.stop()


HOG = "b = b'x' * (200 << 20)"
HOLD = "import sys, time\nb = b'x' * (250 << 20)\nprint('ready', flush=True)\ntime.sleep(60)"


def _memory_limits(sandbox_id: str) -> list[int]:
    mem = [Path(p) for p in _cgroup_dirs(sandbox_id) if "/memory/" in p]
    whole = int((mem[0] / "memory.limit_in_bytes").read_text())
    caps = [int(p.read_text()) for p in mem[0].glob("sandboxd-*[0-9]/memory.limit_in_bytes")]
    return [whole >> 20, *(c >> 20 for c in caps)]


def test_a_live_memory_resize_moves_the_oom_point(host: Host) -> None:
    from tensorlake.sandbox import Sandbox
    from tensorlake.sandbox.exceptions import SandboxError, SandboxResizeError

    from sandboxd.host.resize import can_grow_disks

    sbx = Sandbox.create(memory_mb=128, **_sdk(host))
    try:
        assert sbx.run("python3", args=["-c", HOG]).exit_code != 0  # OOM-killed at 128
        t0 = time.monotonic()
        traced = sbx.update(memory_mb=384)
        took = time.monotonic() - t0
        rr = traced.resource_resize
        assert rr is not None and rr.status.value == "succeeded" and rr.generation == 1
        assert traced.resources.memory_mb == 384
        assert _memory_limits(sbx.sandbox_id) == [384 + 64, 384]
        assert sbx.wait_for_resource_resize(1, timeout=5).resources.memory_mb == 384
        print(f"\nupdate(memory_mb=384) through the SDK: {took * 1000:.0f} ms")
        assert sbx.run("python3", args=["-c", HOG]).exit_code == 0  # fits now

        # A shrink below what a process holds fails cleanly, limits unchanged.
        holder = sbx.start_process("python3", args=["-c", HOLD])
        wait_for(lambda: "ready" in sbx.get_stdout(holder.pid).lines, timeout=15)
        with pytest.raises(SandboxResizeError) as e:
            sbx.update(memory_mb=128)
        assert e.value.reason == "failed" and "below" in str(e.value)
        assert sbx.info().resources.memory_mb == 384
        assert _memory_limits(sbx.sandbox_id) == [384 + 64, 384]
        assert sbx.get_process(holder.pid).status.value == "running"

        assert sbx.update(cpus=2).resources.cpus == 2.0
        cpu = [Path(p) for p in _cgroup_dirs(sbx.sandbox_id) if "/cpu" in p and "cpuacct" not in p]
        assert int((cpu[0] / "cpu.cfs_quota_us").read_text()) == 200_000
        # disk_mb grows online where the host may resize ext4; it never shrinks.
        if can_grow_disks():
            grown = sbx.update(disk_mb=12288)
            assert grown.resources.disk_mb == 12288
            df = sbx.run("sh", args=["-c", "df -m /tmp | tail -1"]).stdout.split()
            assert 11800 < int(df[1]) <= 12288, df
        else:
            with pytest.raises(SandboxError, match="CAP_SYS_RESOURCE"):
                sbx.update(disk_mb=12288)
            assert sbx.info().resources.disk_mb == 10240
        with host.http() as c:
            r = c.patch(f"{NS}/{sbx.sandbox_id}", json={"resources": {"disk_mb": 1024}})
            assert (r.status_code, r.json()["code"]) == (400, "DISK_SHRINK_UNSUPPORTED")
    finally:
        sbx.terminate()
    assert_gone(host, sbx.sandbox_id)


def test_pools_through_the_sdk(host: Host) -> None:
    from tensorlake.sandbox import Sandbox
    from tensorlake.sandbox.exceptions import PoolInUseError, PoolNotFoundError, SandboxError

    client = _client(host)
    pool_id = client.create_pool(
        image="python", cpus=1.0, memory_mb=256, max_containers=2, warm_containers=1
    ).pool_id
    claimed: list[object] = []
    try:

        def idle() -> bool:
            got = client.get_pool(pool_id)
            return any(c.state == "Idle" for c in got.containers or [])

        info = client.get_pool(pool_id)
        assert (info.image, info.resources.memory_mb, info.max_containers) == ("python", 256, 2)
        assert pool_id in [p.pool_id for p in client.list_pools()]
        times = []
        for _ in range(2):
            wait_for(idle, timeout=20)
            time.sleep(0.1)
            t0 = time.monotonic()
            sbx = Sandbox.create(pool_id=pool_id, **_sdk(host))
            assert sbx.run("echo", args=["claimed"]).stdout.strip() == "claimed"
            times.append(time.monotonic() - t0)
            claimed.append(sbx)
            assert sbx.info().pool_id == pool_id
        print(f"\npool claim -> first command: {[f'{t * 1000:.0f} ms' for t in times]}")
        assert min(times) < 0.5
        running = [c for c in client.get_pool(pool_id).containers or [] if c.state == "Running"]
        assert len(running) == 2
        # max_containers claimed: refused at once, never queued.
        with pytest.raises(SandboxError) as e:
            Sandbox.create(pool_id=pool_id, **_sdk(host))
        assert "429" in str(e.value) or "POOL_AT_CAPACITY" in str(e.value)
        with pytest.raises(PoolInUseError):
            client.delete_pool(pool_id)
        updated = client.update_pool(
            pool_id, image="python", cpus=1.0, memory_mb=256, max_containers=3, warm_containers=0
        )
        assert (updated.max_containers, updated.warm_containers) == (3, 0)
        for s in claimed:
            s.terminate()  # type: ignore[attr-defined]
        client.delete_pool(pool_id)
        with pytest.raises(PoolNotFoundError):
            client.get_pool(pool_id)
    finally:
        for s in claimed:
            with contextlib.suppress(Exception):
                s.terminate()  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            client.delete_pool(pool_id)


def test_a_pool_is_refilled_after_a_restart(state_root: Path) -> None:
    h = start_host(state_root / "p", warm=0)
    try:
        client = _client(h)
        pool_id = client.create_pool(image="python", memory_mb=128, warm_containers=1).pool_id
        h.stop()
        h = start_host(state_root / "p", warm=0)
        client = _client(h)

        def idle() -> bool:
            return any(c.state == "Idle" for c in client.get_pool(pool_id).containers or [])

        wait_for(idle, timeout=20)
        client.delete_pool(pool_id)
    finally:
        _cleanup(h)
        h.stop()


def test_unknown_ids_are_404_with_a_code_and_the_sdk_errors(host: Host) -> None:
    from tensorlake.sandbox import Sandbox
    from tensorlake.sandbox.exceptions import (
        PoolNotFoundError,
        RemoteAPIError,
        SandboxNotFoundError,
    )

    client = _client(host)
    nope = "sbx-0000000000000000"
    for call in (
        lambda: Sandbox.connect(nope, **_sdk(host)),
        lambda: client.get(nope),
        lambda: client.delete(nope),
        lambda: client.suspend(nope),
        lambda: client.resume(nope),
        lambda: client.update_sandbox(nope, name="x"),
        lambda: client.update_sandbox(nope, memory_mb=512),
        lambda: client.snapshot(nope),
        lambda: client.copy(nope, times=1),
    ):
        with pytest.raises(SandboxNotFoundError):
            call()
    for call in (
        lambda: client.get_pool("pool-nope"),
        lambda: client.delete_pool("pool-nope"),
        lambda: client.update_pool("pool-nope", image="python"),
    ):
        with pytest.raises(PoolNotFoundError):
            call()
    for call in (
        lambda: client.get_snapshot("snap-nope"),
        lambda: client.delete_snapshot("snap-nope"),
        lambda: client.list_sandbox_snapshots(nope),
        lambda: Sandbox.create(pool_id="pool-nope", **_sdk(host)),
    ):
        with pytest.raises(RemoteAPIError) as e:
            call()
        assert e.value.status_code == 404
    with host.http() as c:
        for method, path, code in (
            ("PATCH", f"{NS}/{nope}", "SANDBOX_NOT_FOUND"),
            ("POST", f"{NS}/{nope}/snapshot", "SANDBOX_NOT_FOUND"),
            ("POST", f"{NS}/{nope}/copy", "SANDBOX_NOT_FOUND"),
            ("GET", f"{NS}/{nope}/snapshots", "SANDBOX_NOT_FOUND"),
            ("POST", f"{NS}/{nope}/suspend", "SANDBOX_NOT_FOUND"),
            ("GET", f"{P}/snapshots/snap-nope", "SNAPSHOT_NOT_FOUND"),
            ("DELETE", f"{P}/snapshots/snap-nope", "SNAPSHOT_NOT_FOUND"),
            ("GET", f"{P}/sandbox-pools/pool-nope", "POOL_NOT_FOUND"),
            ("PUT", f"{P}/sandbox-pools/pool-nope", "POOL_NOT_FOUND"),
            ("DELETE", f"{P}/sandbox-pools/pool-nope", "POOL_NOT_FOUND"),
            ("POST", f"{P}/sandbox-pools/pool-nope/sandboxes", "POOL_NOT_FOUND"),
        ):
            body = {"image": "python"} if method == "PUT" else None
            r = c.request(method, path, json=body if method == "PUT" else None)
            if method == "PATCH":
                r = c.patch(path, json={"resources": {"memory_mb": 512}})
            assert (r.status_code, r.json()["code"]) == (404, code), (method, path)


def test_copy_makes_running_sandboxes_with_the_sources_files(host: Host) -> None:
    from tensorlake.sandbox import Sandbox

    src = Sandbox.create(memory_mb=256, **_sdk(host))
    copies: list[str] = []
    try:
        src.run("sh", args=["-c", "echo copied > /root/state.txt"])
        with host.http() as c:
            r = c.post(f"{NS}/{src.sandbox_id}/copy", params={"times": "0"})
            assert (r.status_code, r.json()["code"]) == (400, "INVALID_TIMES")
        reply = src.copy(times=2)
        copies = [s.sandbox_id for s in reply.sandboxes]
        assert reply.source_sandbox_id == src.sandbox_id and len(set(copies)) == 2
        assert all(s.status == "running" and s.sandbox_url for s in reply.sandboxes)
        for sid in copies:
            twin = Sandbox.connect(sid, **_sdk(host))
            assert twin.run("cat", args=["/root/state.txt"]).stdout == "copied"
            # Each copy is its own sandbox: a write there is not seen by the source.
            twin.run("sh", args=["-c", "echo mine > /root/own.txt"])
        assert src.run("test", args=["-e", "/root/own.txt"]).exit_code != 0
        # The snapshot behind the copy is gone once the copies have their files.
        with host.http() as c:
            wait_for(lambda: c.get(f"{P}/snapshots").json()["snapshots"] == [], timeout=10)
    finally:
        with host.http() as c:
            for sid in copies:
                c.delete(f"{NS}/{sid}")
        src.terminate()
    for sid in [*copies, src.sandbox_id]:
        assert_gone(host, sid)


def test_a_host_stopped_mid_snapshot_puts_a_suspended_sandbox_back_suspended(
    state_root: Path,
) -> None:
    from tensorlake.sandbox import Sandbox

    from sandboxd.host.model import SNAPSHOTTING, SUSPENDED
    from sandboxd.host.store.records import Store

    from .test_host import _frozen

    h = start_host(state_root / "m", warm=0)
    try:
        sbx = Sandbox.create(name="mid-snap", memory_mb=128, **_sdk(h))
        sbx.run("sh", args=["-c", "echo kept > /root/f"])
        sbx.suspend()
        h.stop()
        # As a stop in the middle of a snapshot of it would have left the record.
        store = Store(h.state / "sandboxes.db")
        rec = store.snapshot(sbx.sandbox_id)
        assert rec is not None
        rec.status, rec.status_before = SNAPSHOTTING, SUSPENDED
        store.put(rec)
        store.close()
        h = start_host(state_root / "m", warm=0)
        again = Sandbox.connect(sbx.sandbox_id, **_sdk(h))
        assert again.status.value == "suspended" and _frozen(sbx.sandbox_id)
        again.resume()
        assert again.run("cat", args=["/root/f"]).stdout == "kept"
    finally:
        _cleanup(h)
        h.stop()


def test_a_delete_racing_a_suspend_always_ends_terminated_with_the_name_free(host: Host) -> None:
    """Whichever lands first, the DELETE wins: never a terminated sandbox back as suspended."""
    import threading

    from tensorlake.sandbox import Sandbox

    for i in range(4):
        sbx = Sandbox.create(name=f"race-{i}", memory_mb=128, **_sdk(host))
        sid = sbx.sandbox_id
        answers: dict[str, int] = {}

        def call(method: str, path: str, key: str, into: dict[str, int]) -> None:
            with host.http() as c:
                into[key] = c.request(method, path).status_code

        threads = [
            threading.Thread(target=call, args=("POST", f"{NS}/{sid}/suspend", "suspend", answers)),
            threading.Thread(target=call, args=("DELETE", f"{NS}/{sid}", "delete", answers)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert answers["delete"] == 200 and answers["suspend"] in (200, 202, 409), answers
        with host.http() as c:
            path = f"{NS}/{sid}"
            wait_for(lambda c=c, path=path: c.get(path).json()["status"] == "terminated", 10)
            assert c.get(f"{NS}/race-{i}").status_code == 404  # the name is free
        assert_gone(host, sid)
