"""A warm pool spread over a fleet's nodes, claimed through any front, refilled on a loss.

The same real fleet as tests/test_fleet_snapshots.py (three-member etcd, a
gateway, hosts a, b and c), driven by the official SDK: a pool's warm
sandboxes are split over the nodes, a claim through a node takes that node's
ready one, a claim through the gateway takes a ready one anywhere, a node
killed with SIGKILL has its share moved to the others, and back it drops its
old copy of the pool. Node c is reached through a TCP relay the tests can cut:
a share moved to c while c cannot be reached is asked again until c has it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from . import etcd_fixture
from .conftest import stop_process, wait_for
from .test_fleet import Fleet, describe, drain, hop_header, run_fleet
from .test_fleet_snapshots import SharedFleet, _kill

RELAY = textwrap.dedent(
    """
    import asyncio, signal, sys

    target, counter = int(sys.argv[1]), sys.argv[2]
    state = {"open": True, "refused": 0}
    live = set()

    async def pump(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(reader, writer):
        if not state["open"]:
            state["refused"] += 1
            with open(counter, "w") as f:
                f.write(str(state["refused"]))
            writer.transport.abort()
            return
        try:
            far_r, far_w = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.transport.abort()
            return
        live.update((writer, far_w))
        await asyncio.gather(pump(reader, far_w), pump(far_r, writer))
        live.difference_update((writer, far_w))

    def cut():
        state["open"] = False
        for w in list(live):
            w.transport.abort()

    def mend():
        state["open"] = True

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, cut)
        loop.add_signal_handler(signal.SIGUSR2, mend)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


class Relay:
    """A TCP relay on loopback in front of one node: the address the node advertises.

    Its own process (the SDK's calls hold the GIL while they wait, so a relay
    thread in the test's process could not answer the front they wait on).
    ``cut()`` closes every relayed connection and refuses new ones (counted:
    ``refused``): the node runs on, unreachable for the fleet. ``mend()``
    relays again.
    """

    def __init__(self, root: Path, target: int) -> None:
        self.counter = root / "relay-refused"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RELAY, str(target), str(self.counter)],
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    @property
    def refused(self) -> int:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(self.counter.read_text())
        return 0

    def cut(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)

    def mend(self) -> None:
        self.proc.send_signal(signal.SIGUSR2)

    def close(self) -> None:
        stop_process(self.proc)  # type: ignore[arg-type]


@dataclass
class RelayedFleet(SharedFleet):
    relay: Relay | None = None

    def node_args(self, name: str, port: int) -> list[str]:
        args = super().node_args(name, port)
        if name != "c":
            return args
        if self.relay is None:  # c advertises the relay, which leads to its port
            self.relay = Relay(self.root, port)
        at = args.index("--advertise") + 1
        args[at] = f"http://127.0.0.1:{self.relay.port}"
        return args


@pytest.fixture(scope="module")
def fleet() -> Iterator[RelayedFleet]:
    f: RelayedFleet | None = None
    try:
        for f in run_fleet(RelayedFleet, "sbp", ("a", "b", "c")):  # type: ignore[assignment]
            yield f  # type: ignore[misc]
    finally:
        if f is not None and f.relay is not None:
            f.relay.close()


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
            hop = hop_header(fleet)
            wait_for(
                lambda: httpx.get(f"{back.url}{POOLS}/{pool}", headers=hop).status_code == 404,
                timeout=30,
            )
        for sid in claimed:
            Sandbox.connect(sid, api_url=gw, api_key=None).terminate()
    _client(gw).delete_pool(pool)
    assert httpx.get(f"{gw}{POOLS}/{pool}", timeout=10).status_code == 404
    hop = hop_header(fleet)
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


def _in_etcd(fleet: RelayedFleet, pool_id: str) -> dict[str, Any]:
    """The pool's key in etcd (its shares), read with etcdctl."""
    r = subprocess.run(
        [etcd_fixture.ETCDCTL, "--endpoints", ",".join(fleet.etcd.endpoints), "get",
         "--print-value-only", f"/sandboxd/pools/default/{pool_id}"],
        capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=10,
    )  # fmt: skip
    return json.loads(r.stdout) if r.stdout.strip() else {}


def _held_by(fleet: Fleet, url: str, pool_id: str) -> dict[str, Any] | None:
    """The node's own copy of the pool (asked as a front asks it), or None."""
    r = httpx.get(f"{url}{POOLS}/{pool_id}", headers=hop_header(fleet), timeout=10)
    return r.json() if r.status_code == 200 else None


def test_a_moved_share_is_asked_of_its_node_until_the_node_has_it(fleet: RelayedFleet) -> None:
    gw = fleet.gateway_url
    c = fleet.nodes["c"].url  # c's own port: the relay is what the fleet uses
    drain(fleet, "c")  # the pool on a and b; c is the one a lost share can move to
    try:
        pool = _client(gw).create_pool(image="default", memory_mb=128, warm_containers=2).pool_id
    finally:
        drain(fleet, "c", undo=True)
    port = 0
    try:
        assert set(_in_etcd(fleet, pool)["nodes"]) == {"a", "b"}
        _relay(fleet).cut()  # c runs on, but the fleet cannot reach it
        port = _kill(fleet, "b")
        # b's share moves to c, and asking c for it fails, again and again.
        wait_for(lambda: set(_in_etcd(fleet, pool)["nodes"]) == {"a", "c"}, timeout=30)
        wait_for(lambda: _relay(fleet).refused >= 2, timeout=30)
        assert _held_by(fleet, c, pool) is None
        _relay(fleet).mend()
        # Reachable again: the next try takes, and c warms its share.
        wait_for(lambda: _held_by(fleet, c, pool) is not None, timeout=60)
        assert _held_by(fleet, c, pool)["warm_containers"] == 1  # type: ignore[index]
        wait_for(lambda: _idle(gw, pool).get("c") is not None, timeout=60)
        assert set(_idle(gw, pool)) == {"a", "c"}
    finally:
        _relay(fleet).mend()
        if port:
            fleet.start_node("b", port)
    _client(gw).delete_pool(pool)
    for h in fleet.nodes.values():
        assert _held_by(fleet, h.url, pool) is None


def _relay(fleet: RelayedFleet) -> Relay:
    assert fleet.relay is not None
    return fleet.relay
