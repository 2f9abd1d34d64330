"""A fleet of ``sandboxd host`` nodes on a real three-member etcd cluster, driven by the SDK.

Two real hosts (their own state dirs and loopback ports, ``--cluster``) and a
node-less gateway, on a three-member etcd started for this module: creates
spread over the nodes, names are unique across them, a sandbox on one node is
reached (run, PTY) through the gateway and the other node, a full fleet says
``NO_CAPACITY``, and a node killed with SIGKILL has its sandboxes reported
lost within its lease while creates go on; back, it removes them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from . import etcd_fixture
from .conftest import free_port, skip_with_reason, stop_process, wait_for
from .test_host import (
    NS,
    Host,
    _cgroup_dirs,
    _procs_mentioning,
    make_state_root,
    start_host,
)

TTL = 2  # seconds: a killed node is reported lost within this (and a sweep)
SLOTS = 3


@dataclass
class Fleet:
    etcd: etcd_fixture.EtcdCluster
    root: Path
    nodes: dict[str, Host]
    gateway_url: str
    gateway: subprocess.Popen[bytes]
    GATEWAY_ARGS: ClassVar[tuple[str, ...]] = ()  # more flags for `sandboxd gateway`

    def node_args(self, name: str, port: int) -> list[str]:
        return [
            "--no-net",
            *("--cluster", self.etcd.url, "--node", name),
            *("--advertise", f"http://127.0.0.1:{port}"),
            *("--lease-ttl", str(TTL), "--slots", str(SLOTS)),
        ]

    def start_node(self, name: str, port: int | None = None) -> Host:
        port = port or free_port()
        h = start_host(self.root / name, port, warm=0, extra_args=self.node_args(name, port))
        self.nodes[name] = h
        wait_for(lambda: name in nodes_in_fleet(",".join(self.etcd.endpoints)), timeout=15)
        return h


def nodes_in_fleet(url: str) -> set[str]:
    """The nodes in the fleet now, as etcd has them (``url``: its endpoints)."""
    r = subprocess.run(
        [etcd_fixture.ETCDCTL, "--endpoints", url, "get", "--prefix", "--keys-only",
         "/sandboxd/nodes/"],
        capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=10,
    )  # fmt: skip
    return {line.rsplit("/", 1)[-1] for line in r.stdout.split() if line}


def hop_header(fleet: Fleet, token: str | None = None) -> dict[str, str]:
    """The header a front puts on what it forwards, from the fleet's secret in etcd."""
    from sandboxd.fleet.hop import HOP, HOP_SECRET, hop_value

    r = subprocess.run(
        [etcd_fixture.ETCDCTL, "--endpoints", ",".join(fleet.etcd.endpoints), "get",
         "--print-value-only", HOP_SECRET],
        capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=10,
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    return {HOP: hop_value(token, json.loads(r.stdout)["secret"])}


def run_fleet(
    kind: type[Fleet], prefix: str, names: tuple[str, ...]
) -> Iterator[Fleet]:
    """A real fleet for a module: three etcd members, a gateway, ``names`` nodes; all ended after."""
    reason = etcd_fixture.missing()
    if reason:
        skip_with_reason(reason)
    roots = make_state_root(prefix)
    root = next(roots)
    cluster = etcd_fixture.start_cluster()
    gw_port = free_port()
    log = open(root / "gateway.log", "ab")  # noqa: SIM115 (the child keeps it)
    gateway = subprocess.Popen(
        [sys.executable, "-m", "sandboxd", "gateway", "--cluster", cluster.url,
         "--port", str(gw_port), "--lease-ttl", str(TTL), *kind.GATEWAY_ARGS],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    f = kind(cluster, root, {}, f"http://127.0.0.1:{gw_port}", gateway)
    try:
        wait_for(lambda: _answers(f.gateway_url), timeout=15)
        for name in names:
            port = free_port()
            h = start_host(root / name, port, warm=0, extra_args=f.node_args(name, port))
            f.nodes[name] = h
        wait_for(lambda: set(names) <= nodes_in_fleet(",".join(cluster.endpoints)), timeout=15)
        yield f
    finally:
        for name, h in list(f.nodes.items()):
            if h.proc.poll() is not None:  # killed by a test that stopped midway:
                with contextlib.suppress(Exception):  # back, it cleans up what it left
                    f.start_node(name, int(h.url.rsplit(":", 1)[1]))
        for h in f.nodes.values():
            with contextlib.suppress(Exception):
                _end_all(h)
            stop_process(h.proc)
        stop_process(gateway)
        etcd_fixture.stop_cluster(cluster)
        for log_file in root.glob("*.log"):  # what the processes said, for a failure's report
            text = log_file.read_text(errors="replace").splitlines()
            said = [line for line in text if "sandboxd.http" not in line]
            sys.stderr.write(f"--- {log_file.name}\n" + "\n".join(said[-60:]) + "\n")
        with contextlib.suppress(StopIteration):
            next(roots)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    yield from run_fleet(Fleet, "sbf", ("a", "b"))


def _answers(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url + "/health", timeout=1).status_code == 200
    return False


def _end_all(h: Host) -> None:
    with h.http() as c:
        for s in c.get(NS).json()["sandboxes"]:
            c.delete(f"{NS}/{s['id']}")


def create(url: str, **body: Any) -> httpx.Response:
    body.setdefault("resources", {"cpus": 1.0, "memory_mb": 128})
    return httpx.post(url + NS, json=body, timeout=60)


def describe(url: str, ident: str) -> dict[str, Any]:
    r = httpx.get(f"{url}{NS}/{ident}", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def terminate(url: str, ident: str) -> None:
    assert httpx.delete(f"{url}{NS}/{ident}", timeout=30).status_code == 200


def test_creates_spread_over_nodes_and_every_front_lists_them(fleet: Fleet) -> None:
    gw = fleet.gateway_url
    made = [create(gw) for _ in range(2)]
    assert [r.status_code for r in made] == [200, 200], [r.text for r in made]
    ids = [r.json()["sandbox_id"] for r in made]
    try:
        # Placement is explainable: describe shows the node; two creates, two nodes.
        assert {describe(gw, i)["node"] for i in ids} == {"a", "b"}
        # The answer points the SDK back at the front it asked, not at the node.
        assert made[0].json()["sandbox_url"] == gw
        for url in (gw, fleet.nodes["a"].url, fleet.nodes["b"].url):
            listed = httpx.get(url + NS, timeout=10).json()["sandboxes"]
            assert set(ids) <= {s["id"] for s in listed}, url
        # Paginated across nodes: one a page, oldest first, the cursor to the next.
        first = httpx.get(gw + NS, params={"limit": 1}, timeout=10).json()
        assert [s["id"] for s in first["sandboxes"]] == ids[:1]
        rest = httpx.get(gw + NS, params={"limit": 1, "cursor": first["next_cursor"]}).json()
        assert [s["id"] for s in rest["sandboxes"]] == ids[1:]
    finally:
        for i in ids:
            terminate(gw, i)
    for i in ids:
        assert describe(gw, i)["status"] == "terminated"


def test_sbx_ls_and_describe_say_each_sandbox_s_node(fleet: Fleet) -> None:
    """The command line against a gateway: a NODE column (a lone host's list has none)."""
    import re
    from types import SimpleNamespace

    from .test_cli_host import ok

    gw = fleet.gateway_url
    made = [create(gw) for _ in range(2)]
    assert [r.status_code for r in made] == [200, 200], [r.text for r in made]
    ids = [r.json()["sandbox_id"] for r in made]
    front = SimpleNamespace(url=gw)
    try:
        header, *rows = ok(front, "sbx", "ls").splitlines()  # type: ignore[arg-type]
        assert header.split()[:4] == ["ID", "NAME", "STATUS", "NODE"], header
        listed = {r.split()[0]: r.split()[3] for r in rows}
        assert {listed[i] for i in ids} == {"a", "b"}, listed
        for i in ids:
            shown = ok(front, "sbx", "describe", i)  # type: ignore[arg-type]
            assert re.search(rf"^node\s+{listed[i]}$", shown, re.M), shown
    finally:
        for i in ids:
            terminate(gw, i)


def test_a_name_is_unique_across_the_fleet(fleet: Fleet) -> None:
    a, b = fleet.nodes["a"].url, fleet.nodes["b"].url
    r = create(a, name="only-one")
    assert r.status_code == 200, r.text
    sid = r.json()["sandbox_id"]
    try:
        # Whichever node would take it, the name is held fleet-wide.
        for url in (b, a, fleet.gateway_url):
            again = create(url, name="only-one")
            assert again.status_code == 409, again.text
            assert again.json()["code"] == "NAME_TAKEN"
        assert describe(b, "only-one")["id"] == sid
    finally:
        terminate(b, "only-one")
    # Freed with its sandbox: taken again through the other node.
    wait_for(lambda: create(b, name="only-one").status_code == 200, timeout=10)
    terminate(a, "only-one")


def test_commands_and_a_pty_reach_a_sandbox_on_another_node(fleet: Fleet) -> None:
    from tensorlake.sandbox import Sandbox

    from .test_pty import BASH, BASH_ENV, Screen

    gw = fleet.gateway_url
    sbx = Sandbox.create(api_url=gw, api_key=None, memory_mb=128)
    try:
        node = describe(gw, sbx.sandbox_id)["node"]
        other = fleet.nodes["b" if node == "a" else "a"].url
        r = sbx.run("sh", args=["-c", "echo via-gateway $((6*7))"])
        assert (r.exit_code, r.stdout.strip()) == (0, "via-gateway 42")
        # The other node forwards too (its own sandbox_url, the node's).
        far = Sandbox.connect(sbx.sandbox_id, api_url=other, api_key=None)
        r = far.run("sh", args=["-c", "cat /etc/hostname >/dev/null; echo via-node"])
        assert (r.exit_code, r.stdout.strip()) == (0, "via-node")
        screen = Screen()
        pty = far.create_pty("bash", args=BASH, env=BASH_ENV, on_data=screen)
        try:
            pty.send_input("echo pty-$((6*7))\n")
            screen.expect("pty-42")
        finally:
            pty.disconnect()
    finally:
        sbx.terminate()


def test_a_full_fleet_says_no_capacity_and_two_fronts_never_overbook(fleet: Fleet) -> None:
    fronts = [fleet.gateway_url, fleet.nodes["a"].url]
    total = SLOTS * 2
    made: list[str] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=total + 2) as pool:
            answers = list(
                pool.map(
                    lambda i: create(fronts[i % 2], wait=False),
                    range(total + 2),
                )
            )
        made = [r.json()["sandbox_id"] for r in answers if r.status_code in (200, 202)]
        refused = [r for r in answers if r.status_code not in (200, 202)]
        assert len(made) == total, [r.text for r in answers]
        assert {r.status_code for r in refused} == {409}
        assert {r.json()["code"] for r in refused} == {"NO_CAPACITY"}
        assert "slots taken" in refused[0].json()["error"]
        nodes = [describe(fleet.gateway_url, i)["node"] for i in made]
        assert sorted(nodes) == ["a"] * SLOTS + ["b"] * SLOTS
    finally:
        for i in made:
            terminate(fleet.gateway_url, i)


def _status(url: str, sid: str) -> dict[str, Any]:
    return httpx.get(f"{url}{NS}/{sid}", timeout=10).json()


def test_a_killed_node_is_reported_lost_and_comes_back_without_its_sandboxes(
    fleet: Fleet,
) -> None:
    gw = fleet.gateway_url
    # Four creates spread two and two; on b, one will die with its node and one survive it.
    made = [create(gw, name=f"lost-{i}").json()["sandbox_id"] for i in range(4)]
    on = {"a": [], "b": []}  # type: dict[str, list[str]]
    for i in made:
        on[describe(gw, i)["node"]].append(i)
    assert (len(on["a"]), len(on["b"])) == (2, 2), on
    for i in on["a"]:
        terminate(gw, i)
    sid, survivor = on["b"]
    name = describe(gw, sid)["name"]
    b = fleet.nodes["b"]
    port = int(b.url.rsplit(":", 1)[1])
    # SIGKILL the node's host process, then one sandbox's processes (a power loss); the
    # other runs on without its host, as sandboxes do (a partitioned node).
    os.kill(b.proc.pid, signal.SIGKILL)
    b.proc.wait()
    for d in _cgroup_dirs(sid):
        with contextlib.suppress(OSError):
            Path(d, "cgroup.kill").write_text("1")
    wait_for(lambda: not _procs_mentioning(sid), timeout=10)
    # Within the lease (and a sweep): terminated, with the node-lost outcome.
    for i in (sid, survivor):
        wait_for(lambda i=i: _status(gw, i).get("status") == "terminated", timeout=TTL * 5)
        lost = _status(gw, i)
        assert lost["termination_reason"] == "node_lost", lost
        assert "node_lost" in lost["outcome"]
    listed = {s["id"] for s in httpx.get(gw + NS, timeout=10).json()["sandboxes"]}
    assert not {sid, survivor} & listed
    # Creates go on (on a), and the lost sandbox's name is free again.
    again = create(gw, name=name)
    assert again.status_code == 200, again.text
    assert describe(gw, name)["node"] == "a"
    terminate(gw, name)
    # Back: the node reconciles. The sandbox that outlived it is one the fleet gave
    # up on: it is removed, not resurrected, and says why.
    assert _procs_mentioning(survivor)
    back = fleet.start_node("b", port)
    wait_for(lambda: _status(back.url, survivor).get("status") == "terminated", timeout=15)
    assert _status(back.url, survivor)["termination_reason"] == "node_lost"
    wait_for(lambda: not _procs_mentioning(survivor), timeout=10)
    for i in (sid, survivor):
        wait_for(lambda i=i: not (back.state / "sandboxes" / i).exists(), timeout=10)
        assert _status(gw, i)["termination_reason"] == "node_lost"
    # It takes placements again.
    made = [create(gw) for _ in range(2)]
    ids = [r.json()["sandbox_id"] for r in made]
    try:
        assert {describe(gw, i)["node"] for i in ids} == {"a", "b"}
    finally:
        for i in ids:
            terminate(gw, i)


def drain(fleet: Fleet, node: str, undo: bool = False) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "sandboxd", "host", "drain", node, "--cluster", fleet.etcd.url,
         *(["--undo"] if undo else [])],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


@contextlib.contextmanager
def only_on(fleet: Fleet, node: str) -> Iterator[None]:
    """Every other node drained while the block runs: creates land on ``node``."""
    others = [n for n in fleet.nodes if n != node]
    for n in others:
        drain(fleet, n)
    try:
        yield
    finally:
        for n in others:
            drain(fleet, n, undo=True)


def test_a_drained_node_takes_no_placements_and_keeps_its_sandboxes(fleet: Fleet) -> None:
    gw = fleet.gateway_url
    first = create(gw).json()["sandbox_id"]
    node = describe(gw, first)["node"]
    other = "b" if node == "a" else "a"
    assert "draining" in drain(fleet, node)
    try:
        made = [create(gw).json()["sandbox_id"] for _ in range(2)]
        assert [describe(gw, i)["node"] for i in made] == [other, other]
        # Its running sandbox stays, and answers.
        assert describe(gw, first)["status"] == "running"
        # Nothing else has room: the reason says the drained node is draining.
        drain(fleet, other)
        full = create(gw)
        assert (full.status_code, full.json()["code"]) == (409, "NO_CAPACITY")
        assert f"{node}: draining" in full.json()["error"]
        drain(fleet, other, undo=True)
        for i in made:
            terminate(gw, i)
    finally:
        drain(fleet, node, undo=True)
        terminate(gw, first)
    back = create(gw).json()["sandbox_id"]
    assert describe(gw, back)["node"] in ("a", "b")
    terminate(gw, back)


def test_a_computed_hop_mark_does_not_skip_placement(fleet: Fleet) -> None:
    """This fleet has no token: a mark derived from the token alone is anyone's to compute.

    A raw client sends a create straight to a drained node with such marks (as
    a front would mark a create it placed there); the node places it as a front,
    elsewhere, because only the fleet's own mark (from its secret in etcd) counts.
    """
    import hashlib
    import hmac

    from sandboxd.fleet.hop import HOP, hop_value

    computed = [
        hmac.new(b"", b"sandboxd-fleet-hop", hashlib.sha256).hexdigest(),  # the token's alone
        hop_value(None),  # the derivation, without the fleet's secret
    ]
    gw = fleet.gateway_url
    target = fleet.nodes["a"].url
    assert "draining" in drain(fleet, "a")
    try:
        for mark in computed:
            r = httpx.post(target + NS, json={}, headers={HOP: mark}, timeout=60)
            assert r.status_code == 200, r.text
            sid = r.json()["sandbox_id"]
            try:
                assert describe(gw, sid)["node"] == "b"
            finally:
                terminate(gw, sid)
        # The real mark (read from etcd, as the fronts do) is what a node obeys.
        assert hop_header(fleet)[HOP] not in computed
    finally:
        drain(fleet, "a", undo=True)


def _etcdctl(fleet: Fleet, *args: str, stdin: str | None = None) -> str:
    r = subprocess.run(
        [etcd_fixture.ETCDCTL, "--endpoints", ",".join(fleet.etcd.endpoints), *args],
        input=stdin, capture_output=True, text=True, timeout=10,
        env={**os.environ, "ETCDCTL_API": "3"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_a_node_drops_a_create_s_reservation_with_its_record(fleet: Fleet) -> None:
    """Room held for a create is counted once: by the reservation, then by the record.

    Acting as a front: a reservation on node a (no lease, no front to settle it),
    then the create forwarded to a with it. The node's first copy of the record
    deletes the reservation in the same transaction; before, both counted against
    its slots until the front settled, and bursts found room that was there refused.
    """
    from sandboxd.fleet import keys
    from sandboxd.fleet.placement import RESERVATION

    rid = os.urandom(8).hex()
    held = keys.reserved("a", rid)
    _etcdctl(fleet, "put", held, json.dumps({"memory_mb": 128, "namespace": "default"}))
    sid = None
    try:
        r = httpx.post(
            fleet.nodes["a"].url + NS,
            json={"resources": {"cpus": 1.0, "memory_mb": 128}, "wait": False},
            headers={**hop_header(fleet), RESERVATION: rid},
            timeout=60,
        )
        assert r.status_code in (200, 202), r.text
        sid = r.json()["sandbox_id"]
        record = keys.sandbox("default", sid)
        wait_for(lambda: _etcdctl(fleet, "get", "--print-value-only", record).strip(), timeout=15)
        # Published: the reservation went in the same transaction.
        assert _etcdctl(fleet, "get", "--print-value-only", held).strip() == ""
    finally:
        _etcdctl(fleet, "del", held)
        if sid is not None:
            terminate(fleet.gateway_url, sid)


def test_a_create_that_takes_a_warm_spare_drops_its_reservation_too() -> None:
    """As above, on a node with a warm spare: the create gets the spare's id, not the one
    the node chose for it, and the reservation still goes with the record's first copy."""
    from sandboxd.fleet import keys
    from sandboxd.fleet.hop import HOP, HOP_SECRET, hop_value
    from sandboxd.fleet.placement import RESERVATION

    reason = etcd_fixture.missing()
    if reason:
        skip_with_reason(reason)
    c = etcd_fixture.start_cluster(size=1)
    roots = make_state_root("sbw")
    root = next(roots)
    port = free_port()
    node = None
    ctl = Fleet(c, root, {}, "", None)  # type: ignore[arg-type]  # for _etcdctl: etcd only
    try:
        node = start_host(root / "w", port, warm=1, extra_args=[
            "--no-net", "--cluster", c.url, "--node", "w",
            "--advertise", f"http://127.0.0.1:{port}", "--lease-ttl", str(TTL),
        ])  # fmt: skip
        wait_for(lambda: "spare sandbox" in node.log() and "ready" in node.log(), timeout=60)
        secret = json.loads(_etcdctl(ctl, "get", "--print-value-only", HOP_SECRET))["secret"]
        rid = os.urandom(8).hex()
        held = keys.reserved("w", rid)
        _etcdctl(ctl, "put", held, json.dumps({"memory_mb": 128, "namespace": "default"}))
        r = httpx.post(
            node.url + NS,
            json={"resources": {"cpus": 1.0, "memory_mb": 128}},
            headers={HOP: hop_value(None, secret), RESERVATION: rid},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        sid = r.json()["sandbox_id"]
        assert f"created sandbox={sid} namespace=default path=spare" in node.log()
        record = keys.sandbox("default", sid)
        wait_for(lambda: _etcdctl(ctl, "get", "--print-value-only", record).strip(), timeout=15)
        assert _etcdctl(ctl, "get", "--print-value-only", held).strip() == ""
    finally:
        if node is not None:
            _end_all(node)
            stop_process(node.proc)
        etcd_fixture.stop_cluster(c)
        with contextlib.suppress(StopIteration):
            next(roots)


def test_sse_and_an_exposed_port_of_a_sandbox_on_another_node(fleet: Fleet) -> None:
    from tensorlake.sandbox import Sandbox

    from .test_host_dropin import SERVER

    gw = fleet.gateway_url
    with only_on(fleet, "b"):
        r = create(gw, exposed_ports=[8080], allow_unauthenticated_access=True)
    assert r.status_code == 200, r.text
    sid = r.json()["sandbox_id"]
    try:
        assert describe(gw, sid)["node"] == "b"
        via_a = fleet.nodes["a"].url  # a front that is not the sandbox's node
        hdr = {"Host": f"{sid}.local"}
        with httpx.Client(base_url=via_a, timeout=30) as c:
            p = c.post(
                "/api/v1/processes",
                headers=hdr,
                json={"command": "sh", "args": ["-c", "echo one; sleep 30; echo two"]},
            )
            assert p.status_code in (200, 201), p.text
            pid = p.json()["pid"]
            with c.stream("GET", f"/api/v1/processes/{pid}/output/follow", headers=hdr) as s:
                assert s.headers["content-type"].startswith("text/event-stream")
                for line in s.iter_lines():
                    if line.startswith("data:") and "one" in line:
                        break
            # "one" came through two hops while its process still runs: nothing buffered it.
            info = c.get(f"/api/v1/processes/{pid}", headers=hdr).json()
            assert info["status"] == "running", info
        sbx = Sandbox.connect(sid, api_url=gw, api_key=None)
        sbx.start_process("python3", args=["-c", SERVER, "8080"])
        port = gw.rsplit(":", 1)[1]

        def page() -> httpx.Response | None:
            with contextlib.suppress(httpx.HTTPError):
                host = {"Host": f"8080-{sid}.localhost:{port}"}
                return httpx.get(gw + "/", headers=host, timeout=10)
            return None

        wait_for(lambda: (got := page()) is not None and got.status_code == 200, timeout=15)
        assert page().text == "hello from inside"  # type: ignore[union-attr]
    finally:
        terminate(gw, sid)


def test_etcd_losing_one_member_then_quorum(fleet: Fleet) -> None:
    from tensorlake.sandbox import Sandbox

    gw = fleet.gateway_url
    sbx = Sandbox.create(api_url=gw, api_key=None, memory_mb=128)
    made: list[str] = []
    try:
        # One member of three down: everything works.
        fleet.etcd.kill(2)
        fleet.etcd.wait_healthy()  # the two left have a leader (an election, if it was one)
        r = create(gw)
        assert r.status_code == 200, r.text
        made.append(r.json()["sandbox_id"])
        assert sbx.run("echo", args=["one-down"]).stdout.strip() == "one-down"
        # Two down, quorum lost: writes are refused with a code, proxying goes on.
        fleet.etcd.kill(1)
        refused = create(gw)
        assert refused.status_code == 503, refused.text
        assert refused.json()["code"] == "FLEET_STORE_UNAVAILABLE"
        assert sbx.run("echo", args=["no-quorum"]).stdout.strip() == "no-quorum"
        # Reads go on too, from the member left (describe, list).
        assert describe(gw, sbx.sandbox_id)["status"] == "running"
        listed = httpx.get(gw + NS, timeout=30).json()["sandboxes"]
        assert sbx.sandbox_id in {s["id"] for s in listed}
        r = httpx.post(
            fleet.nodes["a"].url + NS,
            json={"name": "x", "resources": {"memory_mb": 128}},
            timeout=60,
        )
        assert (r.status_code, r.json()["code"]) == (503, "FLEET_STORE_UNAVAILABLE")
    finally:
        fleet.etcd.restart(1)
        fleet.etcd.restart(2)
        fleet.etcd.wait_healthy()
    # Quorum back: creates work again.
    wait_for(lambda: create(gw).status_code == 200 or None, timeout=30, interval=1)
    for s in httpx.get(gw + NS, timeout=10).json()["sandboxes"]:
        terminate(gw, s["id"])
    for i in made:
        assert describe(gw, i)["status"] == "terminated"


def test_a_gateway_with_a_token_lets_no_forged_hop_through(fleet: Fleet) -> None:
    from sandboxd.fleet.hop import HOP, hop_value

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandboxd", "gateway", "--cluster", fleet.etcd.url,
         "--port", str(port)],
        env={**os.environ, "SANDBOXD_HOST_TOKEN": "fleet-secret"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _status_code(url + NS, {}) is not None, timeout=15)
        # No token: refused, whatever hop header is forged (the tokenless one, a guess).
        for forged in ({}, {HOP: hop_value(None)}, {HOP: hop_value("guess")}):
            assert _status_code(url + NS, forged) == 401, forged
            r = httpx.post(url + NS, json={}, headers=forged, timeout=10)
            assert (r.status_code, r.json()["code"]) == (401, "UNAUTHORIZED")
        ok = {"Authorization": "Bearer fleet-secret"}
        assert _status_code(url + NS, ok) == 200
    finally:
        stop_process(proc)


def _status_code(url: str, headers: dict[str, str]) -> int | None:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, headers=headers, timeout=5).status_code
    return None


def test_a_rename_is_unique_across_the_fleet_and_frees_the_old_name(fleet: Fleet) -> None:
    gw, a = fleet.gateway_url, fleet.nodes["a"].url
    with only_on(fleet, "a"):
        on_a = create(gw, name="held-on-a").json()["sandbox_id"]
    with only_on(fleet, "b"):
        on_b = create(gw, name="old-on-b").json()["sandbox_id"]
    try:
        # Through node a (not the sandbox's node) and the gateway: a's name is refused.
        for url in (a, gw):
            r = httpx.patch(f"{url}{NS}/{on_b}", json={"name": "held-on-a"}, timeout=30)
            assert (r.status_code, r.json()["code"]) == (409, "NAME_TAKEN"), r.text
        r = httpx.patch(f"{a}{NS}/{on_b}", json={"name": "new-on-b"}, timeout=30)
        assert r.status_code == 200, r.text
        assert describe(gw, "new-on-b")["id"] == on_b
        # The old name is free again, fleet-wide (once node b let go of it).
        wait_for(lambda: create(a, name="old-on-b").status_code == 200, timeout=10)
        terminate(gw, "old-on-b")
        again = create(gw, name="new-on-b")
        assert (again.status_code, again.json()["code"]) == (409, "NAME_TAKEN")
    finally:
        terminate(gw, on_a)
        terminate(gw, on_b)


def test_a_host_that_cannot_join_says_why_and_exits(fleet: Fleet) -> None:
    from .test_host import host_argv

    dead = free_port()
    for cluster, why in (
        (f"etcd://127.0.0.1:{dead}", "cannot join the fleet"),
        (f"http://127.0.0.1:{dead}", "expected etcd://HOST:PORT"),
    ):
        argv = host_argv(fleet.root / "lonely", free_port(), 0, ["--no-net", "--cluster", cluster])
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        assert why in r.stderr, r.stderr
        # One line, not a traceback of ours (another part's child may still complain).
        assert "sandboxd/fleet/" not in r.stderr and "sandboxd/cli/" not in r.stderr, r.stderr


def test_etcd_over_tls_with_client_certificates() -> None:
    """A fleet's etcd that wants TLS and a client certificate: with them in, without them out."""
    reason = etcd_fixture.missing()
    if reason:
        skip_with_reason(reason)
    c = etcd_fixture.start_cluster(size=1, tls=True)
    t = c.tls
    assert t is not None
    url = "etcd://127.0.0.1:" + str(c.client_ports[0])
    ok = [
        "--etcd-ca",
        str(t.ca),
        "--etcd-cert",
        str(t.client_cert),
        "--etcd-key",
        str(t.client_key),
    ]

    def drain(*extra: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "sandboxd", "host", "drain", "n1", "--cluster", url, *extra]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    try:
        r = drain(*ok)
        assert r.returncode == 0, r.stderr
        got = subprocess.run(
            [etcd_fixture.ETCDCTL, "--endpoints", c.endpoints[0], *c.ctl_tls(), "get",
             "--prefix", "--keys-only", "/sandboxd/drain/"],
            capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=10,
        )  # fmt: skip
        assert "/sandboxd/drain/n1" in got.stdout
        # Plain text to a TLS member, and TLS without the client certificate: refused.
        for extra in ((), ("--etcd-ca", str(t.ca))):
            r = drain(*extra)
            assert r.returncode == 1, r.stdout
            assert "etcd cannot take this now" in r.stderr, r.stderr
        r = drain("--etcd-cert", str(t.client_cert))
        assert r.returncode != 0 and "--etcd-ca is needed" in r.stderr
    finally:
        etcd_fixture.stop_cluster(c)


def test_the_lost_sweep_spares_a_node_that_joined_again_since_its_read() -> None:
    """A front read a node's record as orphaned; the node joins before the front writes."""
    import asyncio

    from sandboxd.fleet import keys, lost
    from sandboxd.fleet.store import Etcd

    reason = etcd_fixture.missing()
    if reason:
        skip_with_reason(reason)
    c = etcd_fixture.start_cluster(size=1)
    record = {"id": "sbx-00000000000000aa", "namespace": "default", "status": "running"}

    async def scenario() -> tuple[int, str, str]:
        etcd = Etcd("etcd://127.0.0.1:" + str(c.client_ports[0]))
        try:
            for n in ("back", "gone"):
                key = keys.sandbox("default", f"sbx-00000000000000{n[0]}{n[0]}")
                await etcd.put(key, {"node": n, "record": {**record, "id": key[-20:]}})
            _, entries = await etcd.prefix(keys.ROOT)
            read = lost.orphans(entries)  # both orphaned at the read
            await etcd.put(keys.node("back"), {"node": "back"})  # ...and "back" joins
            ended = sum([await lost.end_lost(etcd, e, 0.0) for e in read])
            now = {
                e.value["node"]: e.value["record"]["status"]
                for e in (await etcd.prefix(keys.SANDBOXES))[1]
            }
            return ended, now["back"], now["gone"]
        finally:
            await etcd.close()

    try:
        assert asyncio.run(scenario()) == (1, "running", "terminated")
    finally:
        etcd_fixture.stop_cluster(c)


def test_a_front_reads_the_whole_fleet_only_when_a_node_left() -> None:
    """Each sweep looks at the node keys; reads the records only after a node left (or at
    start)."""
    import asyncio

    from sandboxd.fleet import keys
    from sandboxd.fleet.front import Front
    from sandboxd.fleet.store import Etcd

    reason = etcd_fixture.missing()
    if reason:
        skip_with_reason(reason)
    c = etcd_fixture.start_cluster(size=1)

    def node(name: str) -> dict[str, object]:
        url = "http://127.0.0.1:9"
        return {"node": name, "url": url, "slots": 4, "memory_mb": 4096, "images": ["default"]}

    async def scenario() -> list[object]:
        etcd = Etcd("etcd://127.0.0.1:" + str(c.client_ports[0]))
        front = Front(etcd, None, None)
        record = keys.sandbox("default", "sbx-00000000000000bb")
        try:
            for n in ("a", "b"):
                await etcd.put(keys.node(n), node(n))
            live = {"id": record[-20:], "status": "running", "memory_mb": 128}
            await etcd.put(record, {"node": "b", "record": live})
            await front.nodes.sync()  # (what the front's watch brings; read here at once)
            seen: list[object] = [await front.sweep(), await front.sweep()]  # the start, then none
            await etcd.put(keys.node("c"), node("c"))
            await front.nodes.sync()
            seen.append(await front.sweep())  # a node joined: nothing to end
            await etcd.delete(keys.node("b"))
            await front.nodes.sync()
            seen.append(await front.sweep())  # b left: its sandbox is lost
            seen.append(await front.sweep())
            got = await etcd.get(record)
            assert got is not None
            seen.append(got.value["record"]["termination_reason"])
            return seen
        finally:
            await etcd.close()

    try:
        assert asyncio.run(scenario()) == [True, False, False, True, False, "node_lost"]
    finally:
        etcd_fixture.stop_cluster(c)


def test_a_snapshot_taken_through_one_front_restores_through_another(fleet: Fleet) -> None:
    from tensorlake.sandbox import Sandbox

    gw, a = fleet.gateway_url, fleet.nodes["a"].url
    snaps = "/v1/namespaces/default/snapshots"
    with only_on(fleet, "b"):
        sid = create(gw).json()["sandbox_id"]
    made = [sid]
    try:
        sbx = Sandbox.connect(sid, api_url=gw, api_key=None)
        sbx.write_file("/root/kept.txt", b"from node b")
        r = httpx.post(f"{gw}{NS}/{sid}/snapshot", json={}, timeout=60)
        assert r.status_code in (200, 202), r.text
        snap = r.json()["snapshot_id"]

        def done() -> bool:
            got = httpx.get(f"{a}{snaps}/{snap}", timeout=10)
            assert got.status_code == 200, got.text
            return got.json()["status"] == "completed"

        wait_for(done, timeout=60, interval=0.2)
        # Restored through node a: placed where the snapshot's data is, its file there.
        r = create(a, snapshot_id=snap)
        assert r.status_code == 200, r.text
        restored = r.json()["sandbox_id"]
        made.append(restored)
        assert describe(gw, restored)["node"] == "b"
        again = Sandbox.connect(restored, api_url=a, api_key=None)
        assert again.read_file("/root/kept.txt").value == b"from node b"
        assert httpx.delete(f"{gw}{snaps}/{snap}", timeout=30).status_code in (200, 204)
        assert httpx.get(f"{gw}{snaps}/{snap}", timeout=10).status_code == 404
    finally:
        for i in made:
            terminate(gw, i)


def test_the_archive_is_the_fleets_through_every_front(fleet: Fleet) -> None:
    """Ended sandboxes of every node, paged as a lone host pages them, through any front."""
    import warnings

    from tensorlake.sandbox import SandboxClient
    from tensorlake.sandbox.exceptions import SandboxError

    gw = fleet.gateway_url
    ended = []
    for node in ("a", "b", "a"):
        with only_on(fleet, node):
            r = create(gw, resources={"cpus": 1.0, "memory_mb": 130})
        assert r.status_code == 200, r.text
        ended.append(r.json()["sandbox_id"])
        terminate(gw, ended[-1])
    live = create(gw).json()["sandbox_id"]
    try:
        for url in (gw, fleet.nodes["a"].url, fleet.nodes["b"].url):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                client = SandboxClient(api_url=url, api_key=None)
            seen: list[str] = []
            page = client.list_archived(limit=2)
            assert len(page.sandboxes) == 2 and page.next_cursor, url
            seen += [s.sandbox_id for s in page.sandboxes]
            rest = client.list_archived(limit=2, cursor=page.next_cursor)
            seen += [s.sandbox_id for s in rest.sandboxes]
            # Newest first, whichever node each ran on; the live one is not archived.
            assert seen[:3] == ended[::-1], (url, seen)
            assert live not in seen
            one = client.get_archived(ended[1])
            assert (one.status.value, one.resources.memory_mb) == ("terminated", 130)
            assert one.outcome == "Success(user_terminated)"
            with pytest.raises(SandboxError) as e:
                client.get_archived(live)
            assert "SANDBOX_NOT_ARCHIVED" in str(e.value)
        got = httpx.get(f"{gw}/v1/namespaces/default/archived-sandboxes/{ended[1]}", timeout=10)
        assert got.json()["node"] == "b"
        bad = httpx.get(f"{gw}/v1/namespaces/default/archived-sandboxes?cursor=x", timeout=10)
        assert (bad.status_code, bad.json()["code"]) == (400, "INVALID_CURSOR")
    finally:
        terminate(gw, live)


def _node_lease(fleet: Fleet, node: str) -> str:
    import json

    kvs = json.loads(_etcdctl(fleet, "get", f"/sandboxd/nodes/{node}", "-w", "json"))["kvs"]
    return format(int(kvs[0]["lease"]), "x")


def test_a_rolling_restart_loses_no_sandbox(fleet: Fleet) -> None:
    from tensorlake.sandbox import Sandbox

    gw = fleet.gateway_url
    ids: dict[str, str] = {}
    for n in ("a", "b"):
        with only_on(fleet, n):
            ids[n] = create(gw, name=f"roll-{n}").json()["sandbox_id"]
    try:
        for n in ("a", "b"):  # one node at a time
            h = fleet.nodes[n]
            lease = _node_lease(fleet, n)
            stop_process(h.proc)  # SIGTERM: a clean stop, as an upgrade does
            # Past the end of its own lease: the fleet keeps it (restarting), and
            # its sandbox, its name, and everything else.
            wait_for(lambda lease=lease: lease not in _etcdctl(fleet, "lease", "list"), timeout=15)
            assert describe(gw, ids[n])["status"] == "running"
            taken = create(gw, name=f"roll-{n}")
            assert (taken.status_code, taken.json()["code"]) == (409, "NAME_TAKEN")
            other = create(gw)  # placed on the node that is up
            assert other.status_code == 200, other.text
            assert describe(gw, other.json()["sandbox_id"])["node"] != n
            terminate(gw, other.json()["sandbox_id"])
            fleet.start_node(n, int(h.url.rsplit(":", 1)[1]))
        for n, sid in ids.items():  # both back, both sandboxes answer through the gateway
            sbx = Sandbox.connect(sid, api_url=gw, api_key=None)
            assert sbx.run("echo", args=[f"still-{n}"]).stdout.strip() == f"still-{n}"
    finally:
        for sid in ids.values():
            terminate(gw, sid)


def test_a_pool_made_through_the_gateway_is_claimed_through_any_front(fleet: Fleet) -> None:
    from tensorlake.sandbox import Sandbox

    gw = fleet.gateway_url
    pools = "/v1/namespaces/default/sandbox-pools"
    with only_on(fleet, "b"):
        r = httpx.post(
            gw + pools,
            json={"resources": {"cpus": 1.0, "memory_mb": 128}, "warm_containers": 1,
                  "max_containers": 2},
            timeout=30,
        )  # fmt: skip
    assert r.status_code == 200, r.text
    pool = r.json()["pool_id"]
    claimed = ""
    try:
        listed = httpx.get(gw + pools, timeout=30).json()["pools"]
        shares = [p["nodes"] for p in listed if p["id"] == pool]
        assert shares == [{"b": {"warm": 1, "max": 2}}], shares
        # Claimed through node a: the claim goes to the pool's node.
        c = httpx.post(f"{fleet.nodes['a'].url}{pools}/{pool}/sandboxes", json={}, timeout=60)
        assert c.status_code == 200, c.text
        claimed = c.json()["sandbox_id"]
        wait_for(lambda: _status(gw, claimed).get("node") == "b", timeout=10)
        sbx = Sandbox.connect(claimed, api_url=gw, api_key=None)
        assert sbx.run("echo", args=["from-the-pool"]).stdout.strip() == "from-the-pool"
        assert httpx.get(f"{gw}{pools}/{pool}", timeout=10).status_code == 200
    finally:
        if claimed:
            terminate(gw, claimed)
        assert httpx.delete(f"{gw}{pools}/{pool}", timeout=30).status_code == 200
    assert httpx.get(f"{gw}{pools}/{pool}", timeout=10).status_code == 404


def test_a_create_placed_on_a_node_that_just_died_lands_on_another(fleet: Fleet) -> None:
    gw = fleet.gateway_url
    with only_on(fleet, "b"):  # a is the emptier node: the next placement picks it
        on_b = [create(gw).json()["sandbox_id"] for _ in range(2)]
    a = fleet.nodes["a"]
    os.kill(a.proc.pid, signal.SIGKILL)  # no sandbox of its own: nothing else to clean
    a.proc.wait()
    try:
        # Before its lease runs out a is still in the fleet; the create goes to b.
        r = create(gw)
        assert r.status_code == 200, r.text
        on_b.append(r.json()["sandbox_id"])
        assert describe(gw, on_b[-1])["node"] == "b"
    finally:
        fleet.start_node("a", int(a.url.rsplit(":", 1)[1]))
        for sid in on_b:
            terminate(gw, sid)
