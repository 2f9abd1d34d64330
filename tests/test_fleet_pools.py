"""A warm pool spread over a fleet's nodes, claimed through any front, refilled on a loss.

The same real fleet as tests/test_fleet_snapshots.py (three-member etcd, a
gateway, hosts a, b and c), driven by the official SDK: a pool's warm
sandboxes are split over the nodes, a claim through a node takes that node's
ready one, a claim through the gateway takes a ready one anywhere, a node
killed with SIGKILL has its share moved to the others, and back it drops its
old copy of the pool.
"""

from __future__ import annotations

import warnings
from typing import Any

import httpx

from sandboxd.fleet.front import HOP, hop_value

from .conftest import wait_for
from .test_fleet import describe
from .test_fleet_snapshots import SharedFleet, _kill, fleet

__all__ = ["fleet"]  # the module's fleet fixture, started again for this module

POOLS = "/v1/namespaces/default/sandbox-pools"


def _client(url: str):  # type: ignore[no-untyped-def]
    from tensorlake.sandbox import SandboxClient

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return SandboxClient(api_url=url, api_key=None)


def _pool(url: str, pool_id: str) -> dict[str, Any]:
    r = httpx.get(f"{url}{POOLS}/{pool_id}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _idle(url: str, pool_id: str) -> dict[str, list[str]]:
    """The pool's ready warm sandboxes, by node."""
    out: dict[str, list[str]] = {}
    for c in _pool(url, pool_id)["containers"]:
        if c["state"] == "Idle":
            out.setdefault(c["node"], []).append(c["id"])
    return out


def test_a_pool_spans_nodes_and_a_lost_share_is_refilled(fleet: SharedFleet) -> None:
    from tensorlake.sandbox import Sandbox

    gw = fleet.gateway_url
    pool = (
        _client(gw)
        .create_pool(image="default", memory_mb=128, warm_containers=3, max_containers=6)
        .pool_id
    )
    claimed: list[str] = []
    port = 0
    try:
        # Split over the three nodes, one warm sandbox each, all of them ready.
        assert _pool(gw, pool)["nodes"] == {n: {"warm": 1, "max": 2} for n in "abc"}
        wait_for(lambda: sorted(_idle(gw, pool)) == ["a", "b", "c"], timeout=60)
        listed = [p for p in _client(gw).list_pools() if p.pool_id == pool]
        assert len(listed) == 1 and listed[0].warm_containers == 3
        # Through node b: b's own ready one.
        ready_on_b = _idle(gw, pool)["b"]
        got = _client(fleet.nodes["b"].url).claim(pool)
        claimed.append(got.sandbox_id)
        assert got.sandbox_id in ready_on_b
        assert describe(gw, got.sandbox_id)["node"] == "b"
        # Through the gateway: a ready one, wherever it is; it answers commands.
        ready = {sid for ids in _idle(gw, pool).values() for sid in ids}
        got = _client(gw).claim(pool)
        claimed.append(got.sandbox_id)
        assert got.sandbox_id in ready
        sbx = Sandbox.connect(got.sandbox_id, api_url=gw, api_key=None)
        assert sbx.run("echo", args=["warm"]).stdout.strip() == "warm"
        # Node c dies: its share moves to the survivors, which warm it up.
        port = _kill(fleet, "c")
        wait_for(lambda: "c" not in _pool(gw, pool)["nodes"], timeout=30)
        shares = _pool(gw, pool)["nodes"]
        assert sum(int(s["warm"]) for s in shares.values()) == 3, shares
        wait_for(lambda: sum(len(v) for v in _idle(gw, pool).values()) == 3, timeout=60)
        assert set(_idle(gw, pool)) == {"a", "b"}
    finally:
        if port:
            back = fleet.start_node("c", port)
            # Back, c finds its share gone: its own copy of the pool is deleted.
            hop = {HOP: hop_value(None)}
            wait_for(
                lambda: httpx.get(f"{back.url}{POOLS}/{pool}", headers=hop).status_code == 404,
                timeout=30,
            )
        for sid in claimed:
            Sandbox.connect(sid, api_url=gw, api_key=None).terminate()
    _client(gw).delete_pool(pool)
    assert httpx.get(f"{gw}{POOLS}/{pool}", timeout=10).status_code == 404
    hop = {HOP: hop_value(None)}
    for h in fleet.nodes.values():  # gone from every node
        assert httpx.get(f"{h.url}{POOLS}/{pool}", headers=hop).status_code == 404


def test_a_pool_in_use_is_not_deleted_through_the_gateway(fleet: SharedFleet) -> None:
    gw = fleet.gateway_url
    pool = _client(gw).create_pool(image="default", memory_mb=128, warm_containers=2).pool_id
    sid = _client(gw).claim(pool).sandbox_id
    r = httpx.delete(f"{gw}{POOLS}/{pool}", timeout=30)
    assert (r.status_code, r.json()["code"]) == (409, "POOL_IN_USE"), r.text
    assert sid in r.json()["error"]
    assert httpx.delete(f"{gw}/v1/namespaces/default/sandboxes/{sid}").status_code == 200
    assert httpx.delete(f"{gw}{POOLS}/{pool}", timeout=30).status_code == 200


def test_a_client_cannot_choose_a_pool_id_or_make_a_node_adopt_a_snapshot(
    fleet: SharedFleet,
) -> None:
    # The fleet's own headers count only on a request that carries the hop value.
    a = fleet.nodes["a"].url
    chosen = "pool-" + "0" * 16
    r = httpx.post(
        a + POOLS,
        json={"image": "default", "resources": {"cpus": 1.0, "memory_mb": 128}},
        headers={"X-Sandboxd-Fleet-Pool": chosen},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    made = r.json()["pool_id"]
    try:
        assert made != chosen
        assert httpx.get(f"{a}{POOLS}/{chosen}", timeout=10).status_code == 404
    finally:
        assert httpx.delete(f"{a}{POOLS}/{made}", timeout=30).status_code == 200
    r = httpx.post(
        a + "/v1/namespaces/default/sandboxes",
        json={"snapshot_id": "snap-" + "0" * 16},
        headers={"X-Sandboxd-Fleet-Snapshot": "snap-" + "0" * 16},
        timeout=30,
    )
    assert (r.status_code, r.json()["code"]) == (404, "SNAPSHOT_NOT_FOUND"), r.text
