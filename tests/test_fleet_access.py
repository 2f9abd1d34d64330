"""Namespace keys and domain mode across a fleet: one key for every node and gateway.

A real fleet (three-member etcd, hosts ``a`` and ``b``, a gateway: the
module's own ``run_fleet()``), with the fleet's admin token, and a second
gateway in domain mode (``--public-url http://sandbox.example.test:PORT``, as
the nodes have it). Keys are made with ``sandboxd host keys create --cluster``
(in etcd, hashed) and used by the official SDK and by raw clients on every
front: a key works through the gateway and through each node, another
namespace's sandboxes, snapshots and pools answer 404 exactly like ids that do
not exist (list, get, the ``/api/v1/*`` proxy, exposed ports), also on the node
that holds them, and a revoked key is refused by every front. Domain mode: the
SDK, with only ``TENSORLAKE_API_URL=http://api.example.test:PORT`` and its key
(its own /etc/hosts, tests/test_host_domain.py's way), drives a sandbox that
runs on a node behind the domain gateway.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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

from sandboxd.fleet.hop import HOP, hop_value

from .conftest import free_port, skip_with_reason, stop_process, wait_for
from .test_fleet import TTL, Fleet, run_fleet
from .test_host_domain import run_remote

ADMIN = "fleet-admin-s3cret"
DOMAIN = "example.test"
NAMESPACES = ("default", "team-a", "team-b", "team-c", "team-d")
MISSING = "sbx-0000000000000000"  # an id no sandbox has


@dataclass
class AccessFleet:
    fleet: Fleet
    domain_port: int
    domain_gateway: subprocess.Popen[bytes]

    @property
    def fronts(self) -> dict[str, str]:
        """Every front of the fleet: the gateway and each node."""
        return {
            "gateway": self.fleet.gateway_url,
            **{n: h.url for n, h in self.fleet.nodes.items()},
        }

    @property
    def domain_url(self) -> str:
        return f"http://127.0.0.1:{self.domain_port}"


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """For the processes started meanwhile (run_fleet's nodes and gateway inherit it)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def access() -> Iterator[AccessFleet]:
    if shutil.which("unshare") is None:
        skip_with_reason("unshare (util-linux) is needed to give the client its own /etc/hosts")
    port = free_port()
    public = f"http://sandbox.{DOMAIN}:{port}"
    fleets = run_fleet(Fleet, "sba", ("a", "b"))
    # The fleet's token for every node and the gateway; the nodes in domain mode too.
    with _environment(SANDBOXD_HOST_TOKEN=ADMIN, SANDBOXD_HOST_PUBLIC_URL=public):
        f = next(fleets)
        log = open(f.root / "domain-gateway.log", "ab")  # noqa: SIM115 (the child keeps it)
        gw = subprocess.Popen(
            [sys.executable, "-m", "sandboxd", "gateway", "--cluster", f.etcd.url,
             "--port", str(port), "--lease-ttl", str(TTL), "--public-url", public],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
    a = AccessFleet(f, port, gw)
    try:
        wait_for(lambda: _status(a.domain_url + "/health") == 200, timeout=15)
        yield a
    finally:
        with contextlib.suppress(Exception):
            _end_everything(a)
        stop_process(gw)
        fleets.close()  # run_fleet's own ending: nodes, gateway, etcd


def _status(url: str, **kw: Any) -> int:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=5, **kw).status_code
    return 0


def _end_everything(a: AccessFleet) -> None:
    with httpx.Client(base_url=a.fleet.gateway_url, headers=bearer(ADMIN), timeout=60) as c:
        for ns in NAMESPACES:
            for p in c.get(f"/v1/namespaces/{ns}/sandbox-pools").json().get("pools", []):
                for s in p.get("containers", []):
                    c.delete(f"/v1/namespaces/{ns}/sandboxes/{s['id']}")
                c.delete(f"/v1/namespaces/{ns}/sandbox-pools/{p['id']}")
            for s in c.get(f"/v1/namespaces/{ns}/sandboxes").json().get("sandboxes", []):
                c.delete(f"/v1/namespaces/{ns}/sandboxes/{s['id']}")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keys_cli(a: AccessFleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandboxd", "host", "keys", *args, "--cluster", a.fleet.etcd.url],
        capture_output=True,
        text=True,
        timeout=60,
    )


def fleet_key(a: AccessFleet, namespace: str) -> str:
    r = keys_cli(a, "create", "--namespace", namespace)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _etcd(a: AccessFleet, prefix: str) -> str:
    from . import etcd_fixture

    r = subprocess.run(
        [etcd_fixture.ETCDCTL, "--endpoints", ",".join(a.fleet.etcd.endpoints), "get",
         "--prefix", prefix],
        capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=10,
    )  # fmt: skip
    return r.stdout


def _sdk_create(url: str, key: str, **kw: Any) -> Any:
    from tensorlake.sandbox import Sandbox

    return Sandbox.create(api_url=url, api_key=key, memory_mb=128, **kw)


def _node_of(a: AccessFleet, sid: str, ns: str = "team-a") -> str:
    r = httpx.get(f"{a.fleet.gateway_url}/v1/namespaces/{ns}/sandboxes/{sid}",
                  headers=bearer(ADMIN), timeout=10)  # fmt: skip
    assert r.status_code == 200, r.text
    return str(r.json()["node"])


def test_a_key_made_with_cluster_is_in_etcd_hashed_and_works_on_every_front(
    access: AccessFleet,
) -> None:
    from tensorlake.sandbox import Sandbox

    key = fleet_key(access, "team-a")
    key_id = key.split("_")[1]
    # etcd holds the record (the hash), never the key; no node's state dir has it.
    stored = _etcd(access, "/sandboxd/apikeys/")
    assert key_id in stored and key.rsplit("_", 1)[1] not in stored and key not in stored
    for h in access.fleet.nodes.values():
        assert not (h.state / "apikeys.json").exists()
    listed = json.loads(keys_cli(access, "list", "--json").stdout)["keys"]
    assert {"id": key_id, "namespace": "team-a"} in [
        {"id": k["id"], "namespace": k["namespace"]} for k in listed
    ]
    sbx = _sdk_create(access.fleet.gateway_url, key)
    try:
        # The SDK's "default" namespace is the key's own.
        assert sbx.info().namespace == "team-a"
        for name, url in access.fronts.items():
            near = Sandbox.connect(sbx.sandbox_id, api_url=url, api_key=key)
            r = near.run("sh", args=["-c", "echo via-$0", name])
            assert (r.exit_code, r.stdout.strip()) == (0, f"via-{name}"), name
        # A create through each node is placed, and answers, with the same key.
        for name in access.fleet.nodes:
            other = _sdk_create(access.fronts[name], key)
            try:
                assert other.run("echo", args=["made"]).stdout.strip() == "made"
            finally:
                other.terminate()
    finally:
        sbx.terminate()
    # No key, or a key that is not the fleet's: 401 on every front.
    for url in access.fronts.values():
        assert _status(url + "/v1/namespaces/team-a/sandboxes") == 401
        assert _status(url + "/v1/namespaces/team-a/sandboxes", headers=bearer(key + "x")) == 401


def _answers(url: str, key: str, path: str, **kw: Any) -> tuple[int, str]:
    r = httpx.request(kw.pop("method", "GET"), url + path, headers={**bearer(key),
                      **kw.pop("headers", {})}, timeout=30, **kw)  # fmt: skip
    try:
        return r.status_code, str(r.json().get("code"))
    except ValueError:
        return r.status_code, r.text[:80]


def test_another_namespaces_sandboxes_snapshots_and_pools_are_missing_ids_on_every_front(
    access: AccessFleet,
) -> None:
    from tensorlake.sandbox import SandboxClient

    key_a, key_b = fleet_key(access, "team-a"), fleet_key(access, "team-b")
    sbx = _sdk_create(access.fleet.gateway_url, key_a, exposed_ports=[8080])
    with warnings.catch_warnings():  # SandboxClient is deprecated, and still what pools use
        warnings.simplefilter("ignore", DeprecationWarning)
        client_a = SandboxClient(api_url=access.fleet.gateway_url, api_key=key_a)
    pool = client_a.create_pool(image="default", memory_mb=128, warm_containers=0).pool_id
    snap = sbx.checkpoint()
    ended = _sdk_create(access.fleet.gateway_url, key_a)  # A's archive (the fleet's) has it
    ended.terminate()
    try:
        assert snap.status.value == "completed"
        sid = sbx.sandbox_id
        assert client_a.get_archived(ended.sandbox_id).status.value == "terminated"
        for name, url in access.fronts.items():
            where = f"{name} ({url})"
            # Lists: A's things are not in B's (default = the key's own namespace).
            for path, field, ident in (
                ("/v1/namespaces/default/sandboxes", "sandboxes", sid),
                ("/v1/namespaces/team-b/sandboxes", "sandboxes", sid),
                ("/v1/namespaces/default/snapshots", "snapshots", snap.snapshot_id),
                ("/v1/namespaces/default/sandbox-pools", "pools", pool),
                ("/v1/namespaces/default/archived-sandboxes", "sandboxes", ended.sandbox_id),
            ):
                r = httpx.get(url + path, headers=bearer(key_b), timeout=30)
                assert r.status_code == 200, (where, path, r.text)
                assert isinstance(r.json()[field], list), (where, path, r.text)
                assert ident not in r.text, (where, path)
            # A's namespace named outright: as a namespace that does not exist.
            assert _answers(url, key_b, "/v1/namespaces/team-a/sandboxes") == (
                404,
                "NAMESPACE_NOT_FOUND",
            ), where
            # Every id of A's: the same answer as an id nobody has.
            for path, ident, missing in (
                ("/v1/namespaces/default/sandboxes/", sid, MISSING),
                ("/v1/namespaces/default/snapshots/", snap.snapshot_id, "snap-0000000000000000"),
                ("/v1/namespaces/default/sandbox-pools/", pool, "pool-0000000000000000"),
                ("/v1/namespaces/default/archived-sandboxes/", ended.sandbox_id, MISSING),
            ):
                got = _answers(url, key_b, path + ident)
                assert got == _answers(url, key_b, path + missing), (where, path, got)
                assert got[0] == 404, (where, path, got)
            # Changing them: the same 404s, and nothing of A's changes.
            for method, path in (
                ("DELETE", f"/v1/namespaces/default/sandboxes/{sid}"),
                ("POST", f"/v1/namespaces/default/sandboxes/{sid}/suspend"),
                ("DELETE", f"/v1/namespaces/default/snapshots/{snap.snapshot_id}"),
                ("DELETE", f"/v1/namespaces/default/sandbox-pools/{pool}"),
                ("POST", f"/v1/namespaces/default/sandbox-pools/{pool}/sandboxes"),
                ("GET", f"/v1/namespaces/default/sandboxes/{sid}/logs"),
                ("PATCH", f"/v1/namespaces/default/sandboxes/{sid}"),
            ):
                body = {"json": {"name": "taken-over"}} if method in ("POST", "PATCH") else {}
                got = _answers(url, key_b, path, method=method, **body)
                assert got[0] == 404, (where, method, path, got)
            # The proxy: A's sandbox by header is a sandbox that does not exist.
            by_header = _answers(url, key_b, "/api/v1/processes",
                                 headers={"X-Tensorlake-Sandbox-Id": sid})  # fmt: skip
            nobody = _answers(url, key_b, "/api/v1/processes",
                              headers={"X-Tensorlake-Sandbox-Id": MISSING})  # fmt: skip
            assert by_header == nobody and by_header[0] == 404, (where, by_header, nobody)
            # Its exposed port, named in Host: 404 too (as for a missing sandbox).
            port_host = {"Host": f"8080-{sid}.localhost"}
            assert _answers(url, key_b, "/", headers=port_host)[0] == 404, where
        # Still A's, all of it, and A reaches it.
        assert sbx.run("echo", args=["still"]).stdout.strip() == "still"
        assert sbx.info().status.value == "running"
        assert client_a.get_snapshot(snap.snapshot_id).status.value == "completed"
        assert client_a.get_pool(pool).pool_id == pool
    finally:
        sbx.terminate()
        client_a.delete_snapshot(snap.snapshot_id)
        client_a.delete_pool(pool)


def test_b_key_on_the_node_that_holds_a_sandbox_finds_nothing(access: AccessFleet) -> None:
    """A raw client, B's key, straight to the node that runs A's sandbox; a forged hop too."""
    key_a, key_b = fleet_key(access, "team-a"), fleet_key(access, "team-b")
    sbx = _sdk_create(access.fleet.gateway_url, key_a)
    try:
        node = access.fleet.nodes[_node_of(access, sbx.sandbox_id)].url
        sid = sbx.sandbox_id
        forged = {HOP: hop_value(None)}  # the hop of a fleet without a token: not this one
        for extra in ({}, forged):
            for path in (
                f"/v1/namespaces/team-a/sandboxes/{sid}",
                f"/v1/namespaces/default/sandboxes/{sid}",
                f"/v1/namespaces/team-b/sandboxes/{sid}",
                f"/sandboxes/{sid}",
            ):
                got = _answers(node, key_b, path, headers=extra)
                assert got[0] == 404, (path, extra, got)
            got = _answers(node, key_b, "/api/v1/processes",
                           headers={"X-Tensorlake-Sandbox-Id": sid, **extra})  # fmt: skip
            assert got == (404, "SANDBOX_NOT_FOUND"), (extra, got)
            r = httpx.get(f"{node}/v1/namespaces/default/sandboxes", headers={**bearer(key_b),
                          **extra}, timeout=30)  # fmt: skip
            assert r.status_code == 200 and sid not in r.text, r.text
        assert sbx.run("echo", args=["untouched"]).stdout.strip() == "untouched"
    finally:
        sbx.terminate()


def test_a_revoked_key_is_refused_by_every_front(access: AccessFleet) -> None:
    key = fleet_key(access, "team-c")
    path = "/v1/namespaces/default/sandboxes"
    for url in [*access.fronts.values(), access.domain_url]:
        wait_for(lambda u=url: _status(u + path, headers=bearer(key)) == 200, timeout=10)
    r = keys_cli(access, "revoke", key.split("_")[1])
    assert r.returncode == 0, r.stderr
    assert key.split("_")[1] not in _etcd(access, "/sandboxd/apikeys/")
    for url in [*access.fronts.values(), access.domain_url]:
        wait_for(lambda u=url: _status(u + path, headers=bearer(key)) == 401, timeout=20)
    # Revoked for good: an unknown id is an error that says so.
    again = keys_cli(access, "revoke", key.split("_")[1])
    assert again.returncode == 1 and "no key" in again.stderr, again.stderr


CLIENT = textwrap.dedent(
    """
    import json, time
    import httpx
    from tensorlake.sandbox import Sandbox, SandboxClient

    out = {}
    sbx = Sandbox.create(memory_mb=128, exposed_ports=[8080])
    out["sandbox_id"] = sbx.sandbox_id
    info = sbx.info()
    out["namespace"], out["sandbox_url"] = info.namespace, info.sandbox_url
    out["run"] = sbx.run("sh", args=["-c", "echo hi-$((6*7))"]).stdout.strip()
    p = sbx.start_process("sh", args=["-c", "echo one; sleep 0.2; echo two"])
    out["follow"] = [e.line for e in sbx.follow_stdout(p.pid)]
    sbx.write_file("/root/f.txt", b"fleet domain bytes")
    out["file"] = sbx.read_file("/root/f.txt").value.decode()
    seen = []
    pty = sbx.create_pty("sh", on_data=lambda b: seen.append(bytes(b)))
    pty.send_input("echo pty-$((6*7))\\n")
    end = time.monotonic() + 20
    while b"pty-42" not in b"".join(seen) and time.monotonic() < end:
        time.sleep(0.05)
    pty.disconnect()
    out["pty"] = b"pty-42" in b"".join(seen)
    sbx.run("sh", args=["-c", "echo exposed > /tmp/t.txt"])
    sbx.start_process("python3", args=["-m", "http.server", "8080", "-d", "/tmp"])
    probe = "import socket; socket.create_connection(('127.0.0.1', 8080), 1)"
    end = time.monotonic() + 20
    while sbx.run("python3", args=["-c", probe]).exit_code != 0 and time.monotonic() < end:
        time.sleep(0.1)
    url = sbx.info().url_for_port(8080)
    out["port_url"] = url
    with open("/etc/hosts", "a") as f:
        f.write(f"127.0.0.1 {httpx.URL(url).host}\\n")
    out["port_no_key"] = httpx.get(url + "/t.txt").status_code
    out["port_key"] = httpx.get(url + "/t.txt", headers={"Authorization": "Bearer " + KEY}).text
    out["listed"] = sbx.sandbox_id in [s.sandbox_id for s in Sandbox.list()]
    client = SandboxClient()
    out["logs"] = len(client.get_logs(sbx.sandbox_id).logs) > 0
    snap = sbx.checkpoint()
    out["snapshot"] = snap.status.value
    client.delete_snapshot(snap.snapshot_id)
    pool = client.create_pool(image="default", memory_mb=128, warm_containers=0).pool_id
    claimed = Sandbox.create(pool_id=pool)
    out["claimed"] = claimed.run("echo", args=["claimed"]).stdout.strip()
    claimed.terminate()
    client.delete_pool(pool)
    print(json.dumps(out))
    """
)


def test_the_sdk_in_domain_mode_drives_a_sandbox_on_a_node_behind_the_gateway(
    access: AccessFleet, tmp_path: Path
) -> None:
    key = fleet_key(access, "team-d")
    port = access.domain_port
    script = CLIENT.replace("KEY", repr(key))
    api = f"http://api.{DOMAIN}:{port}"
    out = run_remote(tmp_path, script, {"TENSORLAKE_API_URL": api, "TENSORLAKE_API_KEY": key})
    sid = out["sandbox_id"]
    try:
        assert out["namespace"] == "team-d"
        assert out["sandbox_url"] == f"http://sandbox.{DOMAIN}:{port}"
        assert (out["run"], out["follow"], out["file"]) == ("hi-42", ["one", "two"],
                                                             "fleet domain bytes")  # fmt: skip
        assert out["pty"] is True
        assert out["port_url"] == f"http://8080-{sid}.sandbox.{DOMAIN}:{port}"
        assert out["port_no_key"] == 401
        assert out["port_key"].strip() == "exposed"
        assert out["listed"] and out["logs"]
        assert out["snapshot"] == "completed"
        assert out["claimed"] == "claimed"
        # It ran on a node (the gateway has none), and the calls were the flat ones.
        r = httpx.get(f"{access.fleet.gateway_url}/v1/namespaces/team-d/sandboxes/{sid}",
                      headers=bearer(ADMIN), timeout=10)  # fmt: skip
        assert r.json()["node"] in access.fleet.nodes
    finally:
        httpx.delete(f"{access.fleet.gateway_url}/v1/namespaces/team-d/sandboxes/{sid}",
                     headers=bearer(ADMIN), timeout=30)  # fmt: skip


def test_the_domain_gateway_routes_by_host_name_and_header_to_any_node(
    access: AccessFleet,
) -> None:
    port = access.domain_port
    key = fleet_key(access, "team-d")
    public = {"Host": f"sandbox.{DOMAIN}:{port}"}
    with httpx.Client(base_url=access.domain_url, headers=bearer(key), timeout=60) as c:
        made = []
        try:
            # Two flat creates spread over both nodes; the answers name the public URL.
            for _ in range(2):
                r = c.post("/sandboxes", json={"resources": {"cpus": 1.0, "memory_mb": 128}},
                           headers=public)  # fmt: skip
                assert r.status_code == 200, r.text
                assert r.json()["sandbox_url"] == f"http://sandbox.{DOMAIN}:{port}"
                made.append(r.json()["sandbox_id"])
            nodes = {c.get(f"/sandboxes/{s}", headers=public).json()["node"] for s in made}
            assert nodes == {"a", "b"}
            listed = {s["id"] for s in c.get("/sandboxes", headers=public).json()["sandboxes"]}
            assert set(made) <= listed
            for sid in made:
                by_name = c.get("/api/v1/processes",
                                headers={"Host": f"{sid}.sandbox.{DOMAIN}:{port}"})  # fmt: skip
                by_header = c.get("/api/v1/processes",
                                  headers={**public, "X-Tensorlake-Sandbox-Id": sid})  # fmt: skip
                assert (by_name.status_code, by_header.status_code) == (200, 200), by_name.text
            # A node in domain mode answers the flat routes for the whole fleet too.
            node = access.fleet.nodes["a"].url
            listed = httpx.get(node + "/sandboxes", headers={**bearer(key), **public}).json()
            assert set(made) <= {s["id"] for s in listed["sandboxes"]}
            # Without a key: refused before anything is looked up.
            r = httpx.get(access.domain_url + "/sandboxes", headers=public)
            assert (r.status_code, r.json()["code"]) == (401, "UNAUTHORIZED")
        finally:
            for sid in made:
                c.delete(f"/sandboxes/{sid}", headers=public)


def test_a_revoke_reaches_a_front_by_the_watch_not_the_periodic_read(
    access: AccessFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process, on the fleet's etcd: with the periodic full read put off for an hour."""
    import asyncio

    from sandboxd.fleet import apikeys
    from sandboxd.fleet.store import Etcd

    monkeypatch.setattr(apikeys, "RESYNC_S", 3600.0)

    async def scenario() -> tuple[bool, bool, int]:
        etcd = Etcd(access.fleet.etcd.url)
        seen = apikeys.FleetKeys(etcd)
        try:
            await seen.start()
            stored, key = await apikeys.create(etcd, "team-w")
            for _ in range(200):  # until the watch brought it (no sleep-and-hope)
                if seen.lookup(key) is not None:
                    break
                await asyncio.sleep(0.05)
            known = seen.lookup(key) is not None
            await apikeys.revoke(etcd, stored.id)
            for _ in range(200):
                if seen.lookup(key) is None:
                    break
                await asyncio.sleep(0.05)
            return known, seen.lookup(key) is None, seen.reads
        finally:
            await seen.stop()
            await etcd.close()

    known, refused, reads = asyncio.run(scenario())
    assert known and refused
    # One read at start, one more per change the watch delivered: no periodic read ran.
    assert reads <= 3, reads


def test_the_console_on_the_gateway_drives_sandboxes_on_every_node(
    access: AccessFleet, browser: Any, tmp_path: Path
) -> None:
    """The web console served by the gateway: a list of every node's sandboxes, a
    terminal and the terminate button on each, through the gateway to its node."""
    from types import SimpleNamespace

    from playwright.sync_api import expect

    from .test_host_console import Console, _terminal_lines, _type

    gw = access.fleet.gateway_url
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    ui = Console(context.new_page(), SimpleNamespace(url=gw), tmp_path)  # type: ignore[arg-type]
    made = [_sdk_create(gw, ADMIN, name=f"on-a-node-{i}") for i in range(2)]
    try:
        nodes = {s.sandbox_id: _node_of(access, s.sandbox_id, "default") for s in made}
        assert set(nodes.values()) == {"a", "b"}, nodes  # one on each (the emptiest first)
        ui.login(ADMIN)
        for sbx in made:
            row = ui.page.locator(f'#sandbox-rows tr[data-id="{sbx.sandbox_id}"]')
            expect(row).to_contain_text("running")
            expect(row.locator("td.node")).to_have_text(nodes[sbx.sandbox_id])
        expect(ui.page.locator("#node-column")).to_be_visible()
        ui.shot("gateway-sandboxes")
        for sbx in made:  # a terminal through the gateway, on each node
            ui.go(f"#/sandbox/{sbx.sandbox_id}/terminal")
            expect(ui.page.locator("#terminal-state")).to_contain_text("session")
            _type(ui, "echo $((6*7)) $(hostname)")
            wait_for(lambda: any(ln.startswith("42 ") for ln in _terminal_lines(ui)), 30)
        ui.go(f"#/sandbox/{made[0].sandbox_id}")
        expect(ui.page.locator("#facts")).to_contain_text("running")
        expect(ui.page.locator("#facts")).to_contain_text(f"node{nodes[made[0].sandbox_id]}")
        ui.page.click("#terminate")
        ui.page.click("#terminate")  # "Confirm terminate"
        expect(ui.page.locator("#facts")).to_contain_text("terminated")
        assert made[0].status.value == "terminated"
        assert made[1].status.value == "running"
        assert ui.errors == [], ui.errors
    finally:
        context.close()
        for sbx in made:
            with contextlib.suppress(Exception):
                sbx.terminate()


def test_keys_cli_says_in_one_line_what_is_wrong_with_a_cluster() -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sandboxd", "host", "keys", *args],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    dead = f"etcd://127.0.0.1:{free_port()}"  # nothing listens there
    for args, says in (
        (("create", "--namespace", "team-a", "--cluster", dead), "etcd cannot take this now"),
        (("create", "--namespace", "Not A Name", "--cluster", dead), "not a valid name"),
        (("list", "--cluster", "http://127.0.0.1:2379"), "expected etcd://"),
        (("revoke", "1f2e3d4c", "--cluster", dead, "--etcd-cert", "/x"), "--etcd-ca is needed"),
    ):
        r = cli(*args)
        assert r.returncode != 0 and says in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and r.stdout == "", (args, r.stderr)


def test_keys_cli_speaks_tls_to_etcd_with_the_fleets_flags() -> None:
    """A one-member etcd that wants TLS and a client certificate: the same --etcd-* files."""
    from . import etcd_fixture

    reason = etcd_fixture.missing()
    if reason:
        skip_with_reason(reason)
    cluster = etcd_fixture.start_cluster(size=1, tls=True)
    try:
        t = cluster.tls
        assert t is not None
        files = ["--etcd-ca", str(t.ca), "--etcd-cert", str(t.client_cert),
                 "--etcd-key", str(t.client_key)]  # fmt: skip

        def cli(*args: str, tls: bool = True) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "sandboxd", "host", "keys", *args,
                 "--cluster", cluster.url, *(files if tls else [])],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip

        made = cli("create", "--namespace", "team-t")
        assert made.returncode == 0, made.stderr
        key_id = made.stdout.strip().split("_")[1]
        listed = json.loads(cli("list", "--json").stdout)["keys"]
        assert [k["id"] for k in listed] == [key_id]
        # Without the files etcd refuses us, and the command says so.
        plain = cli("list", tls=False)
        assert plain.returncode == 1 and "etcd cannot take this now" in plain.stderr
        assert cli("revoke", key_id).returncode == 0
        assert json.loads(cli("list", "--json").stdout)["keys"] == []
    finally:
        etcd_fixture.stop_cluster(cluster)
