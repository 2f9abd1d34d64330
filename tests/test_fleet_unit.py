"""The fleet's pure parts: cluster URLs, room counting, the lost-node rule, the hop value."""

from __future__ import annotations

import pytest

from sandboxd.fleet import keys
from sandboxd.fleet.hop import hop_value
from sandboxd.fleet.lost import lost_value, orphans
from sandboxd.fleet.node import Fate, Unpublished, copy_fate
from sandboxd.fleet.placement import no_capacity, rooms
from sandboxd.fleet.store import Entry, grpc_target, parse_cluster
from sandboxd.host.model import CreateSpec
from sandboxd.host.snapshots import COMPLETED, IN_PROGRESS, Snapshot


def test_cluster_urls() -> None:
    assert parse_cluster("etcd://10.0.0.1:2379,10.0.0.2,http://10.0.0.3:2381/") == [
        ("10.0.0.1", 2379),
        ("10.0.0.2", 2379),
        ("10.0.0.3", 2381),
    ]
    assert grpc_target([("127.0.0.1", 1), ("127.0.0.2", 2)]) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert grpc_target([("::1", 1)]) == "ipv6:[::1]:1"
    for bad in ("http://h:1", "etcd://", "etcd://:5"):
        with pytest.raises(ValueError):
            parse_cluster(bad)
    with pytest.raises(ValueError):
        grpc_target([("127.0.0.1", 1), ("::1", 2)])


def _node(name: str, slots: int = 2, memory: int = 1000) -> Entry:
    value = {"node": name, "url": f"http://{name}", "slots": slots, "memory_mb": memory,
             "images": ["default"]}  # fmt: skip
    return Entry(keys.node(name), value, 1, 7)


def _sbx(sid: str, node: str, status: str = "running", memory: int = 300) -> Entry:
    rec = {"id": sid, "namespace": "default", "status": status, "memory_mb": memory}
    return Entry(keys.sandbox("default", sid), {"node": node, "record": rec}, 5, 0)


def test_room_counts_live_sandboxes_reservations_and_drains() -> None:
    entries = [
        _node("a"),
        _node("b"),
        _sbx("sbx-1", "a"),
        _sbx("sbx-2", "a", status="terminated"),
        Entry(keys.reserved("a", "r1"), {"memory_mb": 300}, 9, 7),
        Entry(keys.drain("b"), {"since": 0}, 3, 0),
        Entry(keys.alloc("a"), {"last": "r1"}, 11, 0),
    ]
    r = rooms(entries)
    assert (r["a"].used, r["a"].memory_used, r["a"].alloc_rev) == (2, 600, 11)
    spec = CreateSpec(memory_mb=128)
    assert r["a"].fits(spec) == "all 2 sandbox slots taken"
    assert r["b"].fits(spec) == "draining"
    assert r["b"].fits(CreateSpec(image="python")) == "draining"
    r["b"].draining = False
    assert r["b"].fits(CreateSpec(image="python", memory_mb=128)) == "no image 'python'"
    assert "MiB of memory left" in (r["b"].fits(CreateSpec(memory_mb=2000)) or "")
    restarting = _node("c")
    restarting.value["restarting"] = True  # stopped cleanly, within its grace
    assert rooms([restarting])["c"].fits(spec) == "restarting"
    err = no_capacity(spec, {"a": "all 2 sandbox slots taken", "b": "draining"})
    assert (err.status, err.code) == (409, "NO_CAPACITY")
    assert "a: all 2 sandbox slots taken; b: draining" in err.message


def test_a_live_sandbox_of_a_node_without_a_key_is_an_orphan() -> None:
    entries = [_node("a"), _sbx("sbx-1", "a"), _sbx("sbx-2", "gone"),
               _sbx("sbx-3", "gone", status="failed")]  # fmt: skip
    assert [e.key for e in orphans(entries)] == [keys.sandbox("default", "sbx-2")]
    ended = lost_value(entries[2].value, 123.0)["record"]
    assert (ended["status"], ended["termination_reason"], ended["terminated_at"]) == (
        "terminated",
        "node_lost",
        123.0,
    )
    assert "'gone' was lost" in ended["error"]


def test_the_hop_value_is_bound_to_the_token_and_is_not_it() -> None:
    assert hop_value("s3cret") != hop_value("other")
    assert "s3cret" not in hop_value("s3cret")


def _shared_node(name: str, shared: str | None) -> Entry:
    e = _node(name)
    e.value["snapshot_dir"] = shared
    return e


def _snap_value(node: str, shared: str | None, kind: str = "filesystem", status: str = "completed"):  # type: ignore[no-untyped-def]
    meta = {
        "id": "snap-1", "namespace": "default", "sandbox_id": "sbx-1", "status": status,
        "base_image": "default", "cpus": 1.0, "memory_mb": 128, "disk_mb": 1024,
        "created_at": 1.0, "compression": "zst", "snapshot_type": kind,
    }  # fmt: skip
    return {"node": node, "dir": shared, "snapshot": meta}


def test_where_a_restore_may_go() -> None:
    from sandboxd.fleet.snapshots import restore_nodes
    from sandboxd.host.model import ApiError

    nodes = [_shared_node("a", "/s"), _shared_node("b", "/s"), _shared_node("c", None)]
    # In the shared store: any node mounting it, its own gone or not.
    assert restore_nodes(_snap_value("a", "/s"), nodes, "snap-1") == {"a", "b"}
    assert restore_nodes(_snap_value("x", "/s"), nodes, "snap-1") == {"a", "b"}
    # Not settled yet, its node alive: there (it says SNAPSHOT_NOT_READY itself).
    assert restore_nodes(_snap_value("a", "/s", status="in_progress"), nodes, "s") == {"a"}
    # A memory snapshot, or one kept in a state dir: its node, or 409 with a code.
    assert restore_nodes(_snap_value("a", "/s", "memory"), nodes, "snap-1") == {"a"}
    assert restore_nodes(_snap_value("c", None), nodes, "snap-1") == {"c"}
    for value in (_snap_value("x", "/s", "memory"), _snap_value("x", None)):
        with pytest.raises(ApiError) as err:
            restore_nodes(value, nodes, "snap-1")
        assert (err.value.status, err.value.code) == (409, "SNAPSHOT_NODE_LOST")
    with pytest.raises(ApiError) as err:  # nobody mounts the store any more
        restore_nodes(_snap_value("x", "/gone"), nodes, "snap-1")
    assert err.value.code == "SNAPSHOT_STORE_UNREACHABLE"


def test_a_pool_is_split_over_the_emptiest_nodes() -> None:
    from sandboxd.fleet.placement import Room
    from sandboxd.fleet.pools import split, spread

    assert split(5, 3) == [2, 2, 1] and split(0, 2) == [0, 0] and sum(split(7, 4)) == 7
    fit = [Room(n, f"http://{n}", 4, 4096, ["default"]) for n in "abc"]
    body = {"image": "default", "resources": {"cpus": 1.0, "memory_mb": 128}}
    assert spread({**body, "warm_containers": 3, "max_containers": 6}, fit) == {
        n: {"warm": 1, "max": 2} for n in "abc"
    }
    # One warm sandbox: one node; none: one node too (claims cold-start there).
    assert spread({**body, "warm_containers": 1}, fit) == {"a": {"warm": 1, "max": None}}
    assert spread(body, fit) == {"a": {"warm": 0, "max": None}}
    # max_containers bounds the nodes: every share may hold one sandbox at least.
    assert spread({**body, "warm_containers": 2, "max_containers": 2}, fit) == {
        "a": {"warm": 1, "max": 1},
        "b": {"warm": 1, "max": 1},
    }


def _snapshot(status: str) -> Snapshot:
    return Snapshot(
        id="snap-0123456789abcdef",
        namespace="default",
        sandbox_id="sbx-0123456789abcdef",
        status=status,
        base_image="default",
        cpus=1.0,
        memory_mb=128,
        disk_mb=1024,
        created_at=0.0,
        compression="zst",
    )


def test_a_snapshot_completed_while_its_progress_was_being_copied_is_copied_again() -> None:
    """The snapshot is one object changed in place: identity cannot tell it changed.

    Seen in CI: the node copied "in progress" to etcd, the snapshot completed
    during that round trip, and the node then forgot it, so etcd said "in
    progress" for ever and a restore on another node was refused (or a drain
    waited on it).
    """
    changes = Unpublished()
    s = _snapshot(IN_PROGRESS)
    changes.note(s)
    [(taken, change)] = changes.pending()
    assert taken is s
    s.status = COMPLETED  # ...during the copy of the "in progress" state
    changes.note(s)
    changes.published(taken, change)
    [(again, later)] = changes.pending()
    assert again.status == COMPLETED and later != change
    changes.published(again, later)
    assert changes.pending() == []


def test_what_a_node_does_with_a_copy_the_fleet_puts_elsewhere() -> None:
    running = {"node": "b", "record": {"status": "running"}}
    ended = {"node": "b", "record": {"status": "terminated"}}
    to_a = {"state": "restoring", "from": "b", "to": "a"}
    moved_to_a = {**to_a, "state": "moved"}
    moved_to_c = {"state": "moved", "from": "a", "to": "c"}
    # A move here under way: the copy is the fleet's once the mover commits.
    assert copy_fate("a", True, running, to_a) == Fate.WAIT
    # The race seen in CI: the record was read before the mover's commit, the
    # move key after it. The copy is the fleet's now; ending it lost the sandbox.
    assert copy_fate("a", True, running, moved_to_a) == Fate.WAIT
    # The source of a done move ends its copy as moved; a copy of a move that
    # never committed (no key) as aborted; one the fleet ended meanwhile gives up.
    assert copy_fate("a", True, running, moved_to_c) == Fate.END_MOVED
    assert copy_fate("a", True, running, None) == Fate.END_ABORTED
    assert copy_fate("a", True, ended, None) == Fate.GIVE_UP
    assert copy_fate("a", False, running, None) == Fate.FINAL
