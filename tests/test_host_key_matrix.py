"""Keys on every route of ``sandboxd host`` (issue 16): no key, a revoked key, another namespace's.

The routes come from the host's own router (the app ``sandboxd host``
serves, built here the same way), so a route added later is in the matrix
the moment it exists, or this test fails naming it. The host runs in domain
mode with the admin token and namespace keys; team-a owns real things: a
running sandbox with a managed process, an open terminal and a web server on
an exposed port, a snapshot, a pool, a volume and an ended (archived)
sandbox. Each request names one of them and carries a body that would act if
let through.

* No key, made-up keys and team-a's *revoked* key: 401 on every route (the
  console's static files excepted: they hold no data), whether the key is a
  header or the console's websocket subprotocol.
* team-b's key: 404 (``*_NOT_FOUND``) for every one of team-a's ids, through
  team-a's namespaced paths, team-b's own, ``default`` and the flat paths of
  domain mode, the proxy by header and by name, and the exposed port: the
  same answer as for an id that does not exist, never a 403. Its lists show
  none of team-a's things.

Afterwards nothing of team-a's changed (status, name, access, processes,
terminals, files, snapshots, pools, volumes, archive), nothing was made in
any namespace, and team-a's own key still reaches all of it.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import free_port, wait_for
from .test_host import POOL_BODY, Host, assert_gone, make_state_root, start_host

DOMAIN = "example.test"
ADMIN = "admin-token-key-matrix"
MARKER = "/tmp/made-by-an-unauthorized-request"
WS = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


def host_routes() -> set[tuple[str, str]]:
    """(method, path template) of every route the host's app serves in domain mode."""
    from sandboxd.host.app import create_app
    from sandboxd.host.domain import PublicUrl
    from sandboxd.host.manager import Manager

    with tempfile.TemporaryDirectory() as d:
        app = create_app(
            Manager(Path(d), warm=0),
            token=ADMIN,
            public_url=PublicUrl.parse(f"http://sandbox.{DOMAIN}:1"),
        )
        return {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}


def keys_cli(state: Path, *args: str) -> str:
    argv = [sys.executable, "-m", "sandboxd", "host", "keys", *args, "--state-dir", str(state)]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


@dataclass
class World:
    """team-a's things on a domain-mode host, and the keys."""

    host: Host
    port: int
    key_a: str
    key_b: str
    revoked: str
    sid: str = ""
    ended: str = ""
    snap: str = ""
    pool: str = ""
    volume: str = "vol-a"
    pid: int = 0
    pty: str = ""
    pty_token: str = ""
    extra: list[str] = field(default_factory=list)

    @property
    def api_host(self) -> str:
        return f"sandbox.{DOMAIN}:{self.port}"

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.host.url,
            headers={"Authorization": f"Bearer {key}", "Host": self.api_host},
            timeout=60,
        )

    def state_of_a(self) -> dict[str, Any]:
        """What an unauthorized request could have changed, read as the admin."""
        a = "/v1/namespaces/team-a"
        by_id = {"X-Tensorlake-Sandbox-Id": self.sid}
        with self.client(ADMIN) as c:
            info = c.get(f"{a}/sandboxes/{self.sid}").json()
            procs = c.get("/api/v1/processes", headers=by_id).json()["processes"]
            ptys = c.get("/api/v1/pty", headers=by_id).json()["sessions"]
            marker = c.get("/api/v1/files", params={"path": MARKER}, headers=by_id)
            return {
                "sandbox": {
                    k: info.get(k)
                    for k in (
                        "status",
                        "name",
                        "resources",
                        "exposed_ports",
                        "allow_unauthenticated_access",
                        "file_systems",
                        "labels",
                    )
                },
                "processes": sorted((p["pid"], p["status"]) for p in procs),
                "ptys": sorted((s["session_id"], s["rows"], s["cols"]) for s in ptys),
                "marker": marker.status_code,
                "snapshots": sorted(
                    (s["id"], s["status"]) for s in c.get(f"{a}/snapshots").json()["snapshots"]
                ),
                "pools": c.get(f"{a}/sandbox-pools/{self.pool}").json(),
                "volumes": c.get(f"{a}/volumes").json(),
                "archived": sorted(
                    s["id"] for s in c.get(f"{a}/archived-sandboxes").json().get("sandboxes", [])
                ),
                "live": {
                    ns: sorted(
                        s["id"] for s in c.get(f"/v1/namespaces/{ns}/sandboxes").json()["sandboxes"]
                    )
                    for ns in ("team-a", "team-b", "default")
                },
                "pools_b": c.get("/v1/namespaces/team-b/sandbox-pools").json(),
                "volumes_b": c.get("/v1/namespaces/team-b/volumes").json(),
            }


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    for state_root in make_state_root("sbm"):
        port = free_port()
        public = f"http://sandbox.{DOMAIN}:{port}"
        h = start_host(
            state_root / "s",
            port,
            warm=0,
            token=ADMIN,
            extra_args=["--no-net", "--public-url", public],
        )
        key_a = keys_cli(h.state, "create", "--namespace", "team-a")
        key_b = keys_cli(h.state, "create", "--namespace", "team-b")
        revoked = keys_cli(h.state, "create", "--namespace", "team-a")
        w = World(h, port, key_a, key_b, revoked)
        try:
            _make_team_a_things(w)
            keys_cli(h.state, "revoke", revoked.split("_")[1])
            yield w
        finally:
            with w.client(ADMIN) as c:
                for ns in ("team-a", "team-b", "default"):
                    p = f"/v1/namespaces/{ns}"
                    for s in c.get(f"{p}/sandboxes").json().get("sandboxes", []):
                        c.delete(f"{p}/sandboxes/{s['id']}")
                    for pool in c.get(f"{p}/sandbox-pools").json().get("pools", []):
                        c.delete(f"{p}/sandbox-pools/{pool['id']}")
            h.stop()
            if w.sid:
                assert_gone(h, w.sid)


def _make_team_a_things(w: World) -> None:
    with w.client(w.key_a) as a:
        body = {"resources": {"cpus": 1.0, "memory_mb": 256}, "exposed_ports": [8080]}
        r = a.post("/sandboxes", json=body)
        assert r.status_code == 200, r.text
        w.sid = r.json()["sandbox_id"]
        by_id = {"X-Tensorlake-Sandbox-Id": w.sid}
        server = {"command": "python3", "args": ["-m", "http.server", "8080", "-d", "/etc"]}
        r = a.post("/api/v1/processes", json=server, headers=by_id)
        assert r.status_code == 201, r.text
        w.pid = r.json()["pid"]
        r = a.post("/api/v1/pty", json={"command": "cat", "rows": 11, "cols": 33}, headers=by_id)
        assert r.status_code == 201, r.text
        w.pty, w.pty_token = r.json()["session_id"], r.json()["token"]
        port_host = {"Host": f"8080-{w.sid}.sandbox.{DOMAIN}:{w.port}"}
        wait_for(lambda: a.get("/hostname", headers=port_host).status_code == 200, timeout=20)
        r = a.post(f"/sandboxes/{w.sid}/snapshot")
        assert r.status_code in (200, 201, 202), r.text
        w.snap = r.json()["snapshot_id"]
        wait_for(
            lambda: a.get(f"/snapshots/{w.snap}").json()["status"] in ("completed", "failed"),
            timeout=60,
        )
        assert a.get(f"/snapshots/{w.snap}").json()["status"] == "completed"
        r = a.post("/sandbox-pools", json=POOL_BODY)
        assert r.status_code in (200, 201), r.text
        w.pool = r.json()["pool_id"]
        r = a.post("/volumes", json={"name": w.volume})
        assert r.status_code == 201, r.text
        r = a.post("/sandboxes", json={"resources": {"cpus": 1.0, "memory_mb": 256}})
        w.ended = r.json()["sandbox_id"]
        assert a.delete(f"/sandboxes/{w.ended}").status_code == 200


@dataclass(frozen=True)
class Attack:
    route: tuple[str, str]  # the router's (method, template)
    method: str
    path: str
    kwargs: dict[str, Any]
    names_a_thing: bool  # it names one of team-a's ids (another key must get 404)


PARAM = re.compile(r"\{(\w+)(?::[^}]*)?\}")


def _body(method: str, template: str, w: World) -> dict[str, Any]:
    """A body that would act on the route if the request were let through."""
    if template.endswith("/file_systems"):
        mount = {"mount_path": "/mnt/stolen"}
        return {"json": mount if method == "DELETE" else {**mount, "file_system_id": w.volume}}
    if method == "PATCH":
        return {"json": {"name": "stolen", "allow_unauthenticated_access": True}}
    if method == "PUT":
        return {"json": {**POOL_BODY, "warm_containers": 1}}
    if method == "POST" and template.endswith("/sandboxes") and "{pool}" not in template:
        return {"json": {"snapshot_id": w.snap, "resources": {"cpus": 1.0, "memory_mb": 256}}}
    if method == "POST" and template.endswith("/volumes"):
        return {"json": {"name": "stolen"}}
    if method == "POST" and template.endswith("/sandbox-pools"):
        return {"json": POOL_BODY}
    if method == "POST" and template.endswith("/copy"):
        return {"json": {"times": 1}}
    return {}


def _proxy_attacks(w: World, route: tuple[str, str]) -> Iterator[Attack]:
    """``/api/v1/*``: team-a's sandbox by header and by name, with acting requests."""
    ws_pty = f"/api/v1/pty/{w.pty}/ws?token={w.pty_token}"
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/api/v1/processes", {}),
        ("POST", "/api/v1/processes", {"json": {"command": "touch", "args": [MARKER]}}),
        ("POST", "/api/v1/processes/run", {"json": {"command": "touch", "args": [MARKER]}}),
        ("POST", f"/api/v1/processes/{w.pid}/signal", {"json": {"signal": 9}}),
        ("DELETE", f"/api/v1/processes/{w.pid}", {}),
        ("PUT", "/api/v1/files", {"params": {"path": MARKER}, "content": b"x"}),
        ("GET", "/api/v1/files", {"params": {"path": "/etc/hostname"}}),
        ("POST", f"/api/v1/pty/{w.pty}/resize", {"json": {"rows": 5, "cols": 5}}),
        ("DELETE", f"/api/v1/pty/{w.pty}", {}),
        ("GET", ws_pty, {"headers": WS}),
        ("GET", "/api/v1/tunnels/tcp?port=8080", {"headers": WS}),
    ]
    by_name = {"Host": f"{w.sid}.sandbox.{DOMAIN}:{w.port}"}
    by_header = {"X-Tensorlake-Sandbox-Id": w.sid}
    for method, path, kw in requests:
        for addressed in (by_name, by_header):
            headers = {**kw.get("headers", {}), **addressed}
            yield Attack(route, method, path, {**kw, "headers": headers}, True)


def attacks_for(w: World, namespaces: tuple[str, ...]) -> tuple[list[Attack], set[tuple[str, str]]]:
    """Requests for every route of the router; ``{ns}`` is filled with each of ``namespaces``."""
    routes = host_routes()
    values = {
        "id": w.sid,
        "snap": w.snap,
        "pool": w.pool,
        "tail": "v1/file-systems",  # /artifact-storage/{tail}; /api/v1/{tail} is below
    }
    out: list[Attack] = []
    covered: set[tuple[str, str]] = set()
    for route in sorted(routes):
        method, template = route
        if template == "/api/v1/{tail}":
            out += _proxy_attacks(w, route)
            covered.add(route)
            continue
        if template.startswith("/console"):
            # The console's static files are public (no data in them): the
            # websocket carrying its key is attacked below, with the proxy.
            covered.add(route)
            continue
        names = PARAM.findall(template)
        unknown = set(names) - {"ns", "name", *values}
        assert not unknown, f"{method} {template}: add its parameters {unknown} to this matrix"
        local = dict(values)
        if "archived-sandboxes" in template:
            local["id"] = w.ended
        if "volumes" in template:
            local["name"] = w.volume
        methods = ["GET"] if method == "*" else [method]
        for ns in namespaces if "ns" in names else ("",):
            path = template
            for k, v in {**local, "ns": ns}.items():
                path = re.sub(r"\{" + k + r"(?::[^}]*)?\}", v, path)
            for m in methods:
                kw = _body(m, template, w)
                named = any(n in names for n in ("id", "snap", "pool", "name"))
                # A create that restores team-a's snapshot names it too.
                named = named or "snapshot_id" in kw.get("json", {})
                out.append(Attack(route, m, path, kw, named))
        covered.add(route)
    # The exposed port (ingress, before the router) and the console's websocket.
    port_host = {"Host": f"8080-{w.sid}.sandbox.{DOMAIN}:{w.port}"}
    out.append(Attack(("*", "<port>-<id>"), "GET", "/hostname", {"headers": port_host}, True))
    assert covered == routes, f"routes not in the matrix: {routes - covered}"
    return out, routes


def console_ws(w: World, key: str) -> Attack:
    """The console's terminal: the key and the sandbox as websocket subprotocols."""
    encoded = base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
    protocols = f"sandboxd.console.v1, sandboxd.key.{encoded}, sandboxd.sandbox.{w.sid}"
    headers = {**WS, "Sec-WebSocket-Protocol": protocols}
    path = f"/api/v1/pty/{w.pty}/ws?token={w.pty_token}"
    return Attack(("GET", "console websocket"), "GET", path, {"headers": headers}, True)


_RAW = httpx.Client(timeout=30)  # no credentials of its own; one, for speed


def _send(w: World, auth: str | None, attack: Attack) -> httpx.Response:
    headers = {"Host": w.api_host, **attack.kwargs.get("headers", {})}
    if auth is not None:
        headers["Authorization"] = auth
    kwargs = {**attack.kwargs, "headers": headers}
    return _RAW.request(attack.method, w.host.url + attack.path, **kwargs)


def test_no_key_a_made_up_key_or_a_revoked_key_gets_401_everywhere(world: World) -> None:
    w = world
    before = w.state_of_a()
    attacks, routes = attacks_for(w, ("team-a", "team-b", "default"))
    assert len(routes) >= 80 and len(attacks) > len(routes)
    bad: list[str | None] = [
        None,
        "",
        f"Bearer {w.revoked}",  # team-a's key, revoked while the host ran
        f"Bearer {w.key_a}x",
        f"Bearer {ADMIN}x",
        f"Bearer {ADMIN[:-1]}",
        ADMIN,  # without "Bearer "
        f"Basic {w.key_a}",
    ]
    for auth in bad:
        for attack in attacks:
            r = _send(w, auth, attack)
            where = (auth, attack.method, attack.path, r.status_code, r.text[:200])
            assert r.status_code == 401, where
            if attack.method != "HEAD":
                assert r.json()["code"] == "UNAUTHORIZED", where
    for key in (w.revoked, "sbk_00000000_" + "x" * 43):
        r = _send(w, None, console_ws(w, key))
        assert (r.status_code, r.json()["code"]) == (401, "UNAUTHORIZED"), r.text
    assert w.state_of_a() == before, "an unauthorized request had an effect"
    # The matrix aims at real things: team-a's own key reaches them.
    with w.client(w.key_a) as a:
        assert a.get(f"/sandboxes/{w.sid}").json()["status"] == "running"
        port_host = {"Host": f"8080-{w.sid}.sandbox.{DOMAIN}:{w.port}"}
        assert a.get("/hostname", headers=port_host).status_code == 200
        assert a.get(f"/v1/namespaces/team-a/volumes/{w.volume}").status_code == 200
        assert a.get(f"/archived-sandboxes/{w.ended}").status_code == 200
    assert w.key_a not in w.host.log() and w.revoked not in w.host.log()


def test_another_namespaces_key_gets_404_for_every_id_and_changes_nothing(world: World) -> None:
    w = world
    before = w.state_of_a()
    a_ids = {w.sid, w.ended, w.snap, w.pool}
    attacks, _ = attacks_for(w, ("team-a", "team-b", "default"))
    attacks.append(console_ws(w, w.key_b))
    acting = 0
    for attack in attacks:
        _, template = attack.route
        auth = None if attack.route[1] == "console websocket" else f"Bearer {w.key_b}"
        own = not attack.names_a_thing and "/team-a" not in attack.path
        if own and attack.method in ("POST", "PUT", "DELETE"):
            continue  # a create in team-b's own namespace is team-b's right, not an attack
        r = _send(w, auth, attack)
        where = (attack.method, attack.path, r.status_code, r.text[:200])
        if attack.names_a_thing or "/team-a" in attack.path:
            acting += 1
            assert r.status_code == 404, where
            if attack.method != "HEAD":
                assert r.json()["code"].endswith("NOT_FOUND"), where
        elif template == "/metrics":
            assert r.status_code == 403, where
            assert attack.method == "HEAD" or r.json()["code"] == "ADMIN_ONLY", where
        elif template.startswith("/artifact-storage"):
            # What a namespace's SDK user gets from create_file_system: the way
            # forward (make a volume), not "ask for the admin token".
            assert r.status_code == 501, where
            assert attack.method == "HEAD" or r.json()["code"] == "ARTIFACT_STORAGE_UNSUPPORTED"
        else:  # team-b's own lists (and /health): none of team-a's things in them
            assert r.status_code == 200, where
            assert not any(i in r.text for i in a_ids) and w.volume not in r.text, where
    assert acting > 100
    assert w.state_of_a() == before, "another namespace's key had an effect"
    with w.client(w.key_a) as a:
        assert a.get(f"/sandboxes/{w.sid}").json().get("name") != "stolen"
