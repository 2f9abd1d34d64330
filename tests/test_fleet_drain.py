"""``sandboxd host drain NODE --move``: a draining node's sandboxes move to other nodes.

A real three-member etcd, a gateway and three real hosts on one shared
snapshot store, driven by the official SDK through the gateway: a named
sandbox with a file, labels, a timeout and an exposed port moves off its node
and answers under the same id and name from another (the SDK's object keeps
working); nothing of it is left on the old node; creates avoid it. A fleet
with no room refuses the move and the sandbox runs on where it was. Two
drains at once move each sandbox once; a suspended one moves suspended; one
terminated during its move is neither moved nor resurrected; the copy of a
move whose mover died before committing is removed by its node.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandboxd.fleet.hop import fleet_hop
from sandboxd.host.runtime.cgroup import host_tag

from .conftest import wait_for
from .test_fleet import Fleet, describe, drain, hop_header, only_on, run_fleet, terminate
from .test_host import NS, _procs_mentioning, cgroup_glob

NODES = ("a", "b", "c")


class SharedFleet(Fleet):
    def node_args(self, name: str, port: int) -> list[str]:
        return [*super().node_args(name, port), "--snapshot-dir", str(self.root / "shared")]


@pytest.fixture(scope="module")
def fleet() -> Iterator[SharedFleet]:
    yield from run_fleet(SharedFleet, "sbd", NODES)  # type: ignore[misc]


def move(fleet: Fleet, node: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandboxd", "host", "drain", node, "--move",
         "--cluster", fleet.etcd.url],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def sdk(fleet: Fleet, sid: str) -> Any:
    from tensorlake.sandbox import Sandbox

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return Sandbox.connect(sid, api_url=fleet.gateway_url, api_key=None)


def local(fleet: Fleet, node: str, sid: str) -> dict[str, Any] | None:
    """What ``node``'s own store says of ``sid`` (a request between nodes: no forwarding)."""
    r = httpx.get(f"{fleet.nodes[node].url}{NS}/{sid}", headers=hop_header(fleet), timeout=10)
    return r.json() if r.status_code == 200 else None


def left_on(fleet: Fleet, node: str, sid: str) -> list[str]:
    """Processes and cgroups of ``sid`` that belong to ``node``'s host."""
    tag = f"sandboxd-host-{host_tag(fleet.nodes[node].state)}"
    found = []
    for pid in _procs_mentioning(sid):
        with contextlib.suppress(OSError):
            if tag in Path(f"/proc/{pid}/cgroup").read_text():
                found.append(f"process {pid}")
    cgroups = cgroup_glob(f"**/{tag}/{sid}")
    found += ["cgroups kept changing under every walk"] if cgroups is None else map(str, cgroups)
    return found


def live_copies(fleet: Fleet, sid: str) -> list[str]:
    return [
        n
        for n in fleet.nodes
        if (rec := local(fleet, n, sid)) is not None
        and rec["status"] in ("pending", "running", "suspended", "snapshotting")
    ]


def create_on(fleet: Fleet, node: str, **body: Any) -> str:
    body.setdefault("resources", {"cpus": 1.0, "memory_mb": 128})
    with only_on(fleet, node):
        r = httpx.post(fleet.gateway_url + NS, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json()["sandbox_id"])


def shared_archives(fleet: Fleet) -> list[str]:
    return sorted(p.name for p in (fleet.root / "shared").glob("*.tar*"))


def test_a_drained_node_moves_its_sandbox_keeping_id_name_and_files(fleet: SharedFleet) -> None:
    from .test_host_dropin import SERVER

    gw = fleet.gateway_url
    before = shared_archives(fleet)
    sid = create_on(
        fleet,
        "a",
        name="mover",
        labels={"team": "infra"},
        timeout_secs=3600,
        exposed_ports=[8080],
        allow_unauthenticated_access=True,
    )
    sbx = sdk(fleet, sid)  # the SDK's object, held across the move
    made = [sid]
    try:
        sbx.write_file("/root/kept.txt", b"written on a")
        assert sbx.run("cat", args=["/root/kept.txt"]).stdout == "written on a"
        r = move(fleet, "a")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"{sid} (mover): moved to " in r.stdout, r.stdout
        got = describe(gw, "mover")
        assert got["id"] == sid and got["node"] in ("b", "c"), got
        assert got["status"] == "running"
        assert got["labels"] == {"team": "infra"}
        assert (got["timeout_secs"], got["exposed_ports"]) == (3600, [8080])
        assert got["resources"]["memory_mb"] == 128
        assert got["allow_unauthenticated_access"] is True
        # The same object answers from the new node: its file is there (processes restarted).
        assert sbx.read_file("/root/kept.txt").value == b"written on a"
        assert sbx.run("cat", args=["/root/kept.txt"]).stdout == "written on a"
        sbx.start_process("python3", args=["-c", SERVER, "8080"])
        port = gw.rsplit(":", 1)[1]

        def page() -> str | None:
            with contextlib.suppress(httpx.HTTPError):
                host = {"Host": f"8080-{sid}.localhost:{port}"}
                r = httpx.get(gw + "/", headers=host, timeout=10)
                return r.text if r.status_code == 200 else None
            return None

        wait_for(lambda: page() == "hello from inside", timeout=15)
        # Node a keeps no copy: its record ended, reason moved; no process, no cgroup.
        old = local(fleet, "a", sid)
        assert old is not None and old["status"] == "terminated", old
        assert old["termination_reason"] == "moved"
        wait_for(lambda: not left_on(fleet, "a", sid), timeout=10)
        assert live_copies(fleet, sid) == [got["node"]]
        # The move's snapshot is gone from the shared store and from the fleet's list.
        assert shared_archives(fleet) == before
        snaps = httpx.get(gw + "/v1/namespaces/default/snapshots", timeout=10).json()
        assert not [s for s in snaps["snapshots"] if s["sandbox_id"] == sid]
        # Creates avoid the drained node; the name stays taken fleet-wide.
        for _ in range(2):
            r2 = httpx.post(gw + NS, json={"resources": {"memory_mb": 128}}, timeout=60)
            assert r2.status_code == 200, r2.text
            made.append(r2.json()["sandbox_id"])
            assert describe(gw, made[-1])["node"] != "a"
        again = httpx.post(gw + NS, json={"name": "mover"}, timeout=60)
        assert (again.status_code, again.json()["code"]) == (409, "NAME_TAKEN")
    finally:
        drain(fleet, "a", undo=True)
        for i in made:
            terminate(gw, i)
    # Terminated through the gateway, the moved sandbox ends on its new node, name freed.
    assert describe(gw, sid)["status"] == "terminated"
    assert live_copies(fleet, sid) == []
    wait_for(lambda: httpx.post(gw + NS, json={"name": "mover"}).status_code == 200, timeout=10)
    terminate(gw, "mover")


def test_a_move_with_no_room_fails_and_the_sandbox_runs_on(fleet: SharedFleet) -> None:
    gw = fleet.gateway_url
    before = shared_archives(fleet)
    sid = create_on(fleet, "a", name="stays")
    sdk(fleet, sid).write_file("/root/kept.txt", b"still on a")
    for n in ("b", "c"):  # no other node takes it
        drain(fleet, n)
    try:
        r = move(fleet, "a")
        for n in ("b", "c"):
            drain(fleet, n, undo=True)
        assert r.returncode == 1, r.stdout + r.stderr
        line = [x for x in r.stdout.splitlines() if x.startswith(sid)]
        assert len(line) == 1 and "failed: no other node has room" in line[0], r.stdout
        assert "draining" in line[0] and "still runs on a" in line[0]
        got = describe(gw, "stays")
        assert (got["id"], got["node"], got["status"]) == (sid, "a", "running")
        assert sdk(fleet, sid).read_file("/root/kept.txt").value == b"still on a"
        assert live_copies(fleet, sid) == ["a"]
        assert shared_archives(fleet) == before  # its snapshot went with the failed move
    finally:
        for n in ("a", "b", "c"):
            drain(fleet, n, undo=True)
        terminate(gw, sid)


def test_two_drains_at_once_move_each_sandbox_once(fleet: SharedFleet) -> None:
    gw = fleet.gateway_url
    ids = [create_on(fleet, "b", name=f"twice-{i}") for i in range(2)]
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            runs = list(pool.map(lambda _: move(fleet, "b"), range(2)))
        assert [r.returncode for r in runs] == [0, 0], [r.stdout + r.stderr for r in runs]
        out = "\n".join(r.stdout for r in runs)
        for sid in ids:
            moved = [x for x in out.splitlines() if x.startswith(sid) and "moved to" in x]
            assert len(moved) == 1, out  # one drain moved it; the other left it alone
            node = describe(gw, sid)["node"]
            assert node in ("a", "c")
            assert live_copies(fleet, sid) == [node]
            assert sdk(fleet, sid).run("echo", args=["once"]).stdout.strip() == "once"
    finally:
        drain(fleet, "b", undo=True)
        for sid in ids:
            terminate(gw, sid)


def test_a_suspended_sandbox_moves_suspended(fleet: SharedFleet) -> None:
    gw = fleet.gateway_url
    sid = create_on(fleet, "c", name="asleep")  # (only named sandboxes suspend)
    try:
        sdk(fleet, sid).write_file("/root/kept.txt", b"asleep")
        r = httpx.post(f"{gw}{NS}/{sid}/suspend", params={"wait_ms": 60000}, timeout=90)
        assert r.status_code < 300, r.text
        wait_for(lambda: describe(gw, sid)["status"] == "suspended", timeout=30)
        r = move(fleet, "c")
        assert r.returncode == 0, r.stdout + r.stderr
        got = describe(gw, sid)
        assert got["node"] in ("a", "b") and got["status"] == "suspended", got
        assert live_copies(fleet, sid) == [got["node"]]
        # Resumed where it went, its file there.
        r = httpx.post(f"{gw}{NS}/{sid}/resume", params={"wait_ms": 60000}, timeout=90)
        assert r.status_code < 300, r.text
        assert sdk(fleet, sid).read_file("/root/kept.txt").value == b"asleep"
    finally:
        drain(fleet, "c", undo=True)
        terminate(gw, sid)


def test_the_copy_of_a_move_whose_mover_died_is_removed(fleet: SharedFleet) -> None:
    """A mover that restored on the target and died before its commit: the target ends its copy."""
    from sandboxd.fleet.move import Mover
    from sandboxd.fleet.store import Etcd

    gw = fleet.gateway_url
    sid = create_on(fleet, "a", name="half-moved")
    target: list[str] = []

    async def restore_then_die() -> None:
        etcd = Etcd(fleet.etcd.url)
        mover = Mover(etcd, "a", await fleet_hop(etcd, None), None, lambda o: None)
        mover.lease = await etcd.grant(5)
        import aiohttp

        mover.http = aiohttp.ClientSession()
        try:
            e = await etcd.get(f"/sandboxd/sandboxes/default/{sid}")
            assert e is not None
            src = (await etcd.get("/sandboxd/nodes/a")).value  # type: ignore[union-attr]
            e, status, mkey = await mover._claim(src["url"], "default", sid)
            snap = await mover._snapshot(src["url"], "default", sid)
            res = await mover._reserve(e.value["record"], "default", src["snapshot_dir"])
            target.append(res.node)
            await mover._step(mkey, "restoring", {"to": res.node, "snapshot": snap})
            await mover._restore(res.url, "default", sid, e.value["record"], snap, status)
            await etcd.revoke(mover.lease)  # the mover dies: its claim goes with its lease
            target.append(snap)
        finally:
            await mover.http.close()
            await etcd.close()

    try:
        asyncio.run(restore_then_die())
        # The target ends its copy (never the fleet's); the sandbox runs on, on a.
        wait_for(lambda: local(fleet, target[0], sid)["status"] == "terminated", timeout=15)  # type: ignore[index]
        assert local(fleet, target[0], sid)["termination_reason"] == "move_aborted"  # type: ignore[index]
        got = describe(gw, "half-moved")
        assert (got["id"], got["node"], got["status"]) == (sid, "a", "running")
        assert live_copies(fleet, sid) == ["a"]
        assert sdk(fleet, sid).run("echo", args=["here"]).stdout.strip() == "here"
    finally:
        terminate(gw, sid)
        if len(target) == 2:  # the dead mover's snapshot: deleted by hand
            httpx.delete(f"{gw}/v1/namespaces/default/snapshots/{target[1]}", timeout=30)


def test_a_sandbox_terminated_during_its_move_is_not_moved_nor_resurrected(
    fleet: SharedFleet,
) -> None:
    """A DELETE lands on the source after the target restored it, before the commit."""
    from sandboxd.fleet.move import Mover, Outcome
    from sandboxd.fleet.store import Etcd

    gw = fleet.gateway_url
    sid = create_on(fleet, "a", name="ended-midway")
    targets: list[str] = []

    class DeletedMidway(Mover):
        async def _restore(self, url: str, *args: Any) -> None:
            await super()._restore(url, *args)
            targets.append(url)
            # The user's DELETE, through the gateway: the fleet's record still names a.
            await asyncio.to_thread(terminate, gw, sid)

    async def drain_a() -> list[Outcome]:
        etcd = Etcd(fleet.etcd.url)
        try:
            hop = await fleet_hop(etcd, None)
            return await DeletedMidway(etcd, "a", hop, None, lambda o: None).run()
        finally:
            await etcd.close()

    try:
        (o,) = asyncio.run(drain_a())
        assert o.sid == sid and o.moved_to is None, o
        assert o.skipped is not None and "ended during the move" in o.skipped, o
        assert len(targets) == 1  # it was restored on the target before the DELETE
        # Ended everywhere: the fleet's record on a, no copy anywhere, the name free.
        got = describe(gw, sid)
        assert (got["node"], got["status"]) == ("a", "terminated"), got
        wait_for(lambda: live_copies(fleet, sid) == [], timeout=15)
        again = httpx.post(gw + NS, json={"name": "ended-midway"}, timeout=60)
        assert again.status_code == 200, again.text
        terminate(gw, again.json()["sandbox_id"])
    finally:
        drain(fleet, "a", undo=True)
