"""Snapshots across a fleet: data in a shared directory, metadata in etcd.

A real three-member etcd, a gateway, and three real hosts: ``a`` and ``b``
keep their snapshots in one shared directory (``--snapshot-dir``), ``c`` in
its own state dir. Driven by the official SDK through the gateway: a snapshot
taken on one node restores on another, is listed and read through any front,
outlives its node (restored and deleted elsewhere once the node is gone), and a
snapshot kept on a node that left the fleet is refused with a code.
"""

from __future__ import annotations

import os
import signal
import warnings
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import wait_for
from .test_fleet import (
    TTL,
    Fleet,
    describe,
    nodes_in_fleet,
    only_on,
    run_fleet,
)

SNAPS = "/v1/namespaces/default/snapshots"
SHARING = ("a", "b")  # the nodes on the shared store; c keeps its own


class SharedFleet(Fleet):
    def node_args(self, name: str, port: int) -> list[str]:
        shared = ["--snapshot-dir", str(self.root / "shared")] if name in SHARING else []
        return [*super().node_args(name, port), *shared]


@pytest.fixture(scope="module")
def fleet() -> Iterator[SharedFleet]:
    yield from run_fleet(SharedFleet, "sbs", ("a", "b", "c"))  # type: ignore[misc]


def _sdk(fleet: Fleet) -> dict[str, Any]:
    return {"api_url": fleet.gateway_url, "api_key": None}


def _client(url: str):  # type: ignore[no-untyped-def]
    from tensorlake.sandbox import SandboxClient

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return SandboxClient(api_url=url, api_key=None)


def _taken_on(fleet: Fleet, node: str, text: bytes) -> tuple[Any, str]:
    """A sandbox on ``node`` with /root/kept.txt, and a completed snapshot of it."""
    from tensorlake.sandbox import Sandbox

    with only_on(fleet, node):
        src = Sandbox.create(memory_mb=128, **_sdk(fleet))
    assert describe(fleet.gateway_url, src.sandbox_id)["node"] == node
    src.write_file("/root/kept.txt", text)
    snap = src.checkpoint()
    assert snap is not None and snap.status.value == "completed"
    return src, snap.snapshot_id


def _kill(fleet: Fleet, node: str) -> int:
    """SIGKILL the node's host; back when its lease ran out. Returns its port."""
    h = fleet.nodes[node]
    os.kill(h.proc.pid, signal.SIGKILL)
    h.proc.wait()
    wait_for(lambda: node not in nodes_in_fleet(",".join(fleet.etcd.endpoints)), timeout=TTL * 5)
    return int(h.url.rsplit(":", 1)[1])


def test_a_snapshot_taken_on_one_node_restores_on_another(fleet: SharedFleet) -> None:
    from tensorlake.sandbox import Sandbox

    gw = fleet.gateway_url
    src, snap = _taken_on(fleet, "a", b"taken on a")
    made = [src.sandbox_id]
    try:
        # The data is in the shared store, not in node a's state dir.
        assert [p.name for p in (fleet.root / "shared").glob(f"{snap}.tar.*")], "no archive"
        assert not list((fleet.root / "a" / "snapshots").glob(f"{snap}*"))
        # Listed and read fleet-wide, through the gateway and every node.
        for url in (gw, *(h.url for h in fleet.nodes.values())):
            listed = {s.snapshot_id for s in _client(url).list_snapshots()}
            assert snap in listed, url
            got = httpx.get(f"{url}{SNAPS}/{snap}", timeout=10).json()
            assert (got["status"], got["sandbox_id"]) == ("completed", src.sandbox_id), got
        # Restored through the gateway with node a out of service: b takes it.
        with only_on(fleet, "b"):
            clone = Sandbox.create(snapshot_id=snap, **_sdk(fleet))
        made.append(clone.sandbox_id)
        assert describe(gw, clone.sandbox_id)["node"] == "b"
        assert clone.read_file("/root/kept.txt").value == b"taken on a"
        # c does not mount the store: a restore with only c in service is refused, saying why.
        with only_on(fleet, "c"):
            r = httpx.post(gw + "/v1/namespaces/default/sandboxes", json={"snapshot_id": snap})
        assert (r.status_code, r.json()["code"]) == (409, "NO_CAPACITY"), r.text
        assert "c: not where the snapshot is" in r.json()["error"]
    finally:
        for sid in made:
            Sandbox.connect(sid, **_sdk(fleet)).terminate()
    Sandbox.delete_snapshot(snap, **_sdk(fleet))
    assert not list((fleet.root / "shared").glob(f"{snap}*"))
    assert httpx.get(f"{gw}{SNAPS}/{snap}", timeout=10).status_code == 404


def test_a_snapshot_outlives_its_node(fleet: SharedFleet) -> None:
    from tensorlake.sandbox import Sandbox

    gw = fleet.gateway_url
    src, snap = _taken_on(fleet, "b", b"b is gone")
    port = _kill(fleet, "b")
    try:
        # Read from etcd, restored on a (the other node on the store), deleted there.
        got = Sandbox.get_snapshot(snap, **_sdk(fleet))
        assert got.status.value == "completed"
        assert snap in {s.snapshot_id for s in _client(gw).list_snapshots()}
        clone = Sandbox.create(snapshot_id=snap, **_sdk(fleet))
        try:
            assert describe(gw, clone.sandbox_id)["node"] == "a"
            assert clone.run("cat", args=["/root/kept.txt"]).stdout == "b is gone"
        finally:
            clone.terminate()
        Sandbox.delete_snapshot(snap, **_sdk(fleet))
        assert not list((fleet.root / "shared").glob(f"{snap}*"))
        assert httpx.get(f"{gw}{SNAPS}/{snap}", timeout=10).status_code == 404
    finally:
        back = fleet.start_node("b", port)  # reconciles: src, given up on, is removed
    wait_for(
        lambda: (
            httpx.get(f"{back.url}/v1/namespaces/default/sandboxes/{src.sandbox_id}")
            .json()
            .get("termination_reason")
            == "node_lost"
        ),
        timeout=15,
    )


def test_a_snapshot_kept_on_a_lost_node_is_refused_with_a_code(fleet: SharedFleet) -> None:
    gw = fleet.gateway_url
    _src, snap = _taken_on(fleet, "c", b"only on c")
    assert list((fleet.root / "c" / "snapshots").glob(f"{snap}.tar.*"))  # its own state dir
    port = _kill(fleet, "c")
    try:
        r = httpx.post(gw + "/v1/namespaces/default/sandboxes", json={"snapshot_id": snap})
        assert (r.status_code, r.json()["code"]) == (409, "SNAPSHOT_NODE_LOST"), r.text
        assert "shared --snapshot-dir" in r.json()["error"]
        # Its record is still read (from etcd); a delete drops it.
        assert httpx.get(f"{gw}{SNAPS}/{snap}", timeout=10).json()["node"] == "c"
        assert httpx.delete(f"{gw}{SNAPS}/{snap}", timeout=10).status_code == 200
        assert httpx.get(f"{gw}{SNAPS}/{snap}", timeout=10).status_code == 404
    finally:
        fleet.start_node("c", port)


def test_an_unknown_snapshot_is_404_through_the_gateway(fleet: SharedFleet) -> None:
    r = httpx.post(
        fleet.gateway_url + "/v1/namespaces/default/sandboxes",
        json={"snapshot_id": "snap-0000000000000000"},
    )
    assert (r.status_code, r.json()["code"]) == (404, "SNAPSHOT_NOT_FOUND"), r.text
