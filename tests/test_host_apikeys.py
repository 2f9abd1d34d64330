"""API keys per namespace (issue 16): made, listed and revoked by the CLI while the host runs.

Played as a raw HTTP client holding team-b's key against team-a's sandbox,
snapshot, pool, logs, archive, proxy route and exposed port: every one answers
404, as for an id that does not exist (never 403: no answer says what another
namespace holds), and nothing of team-a's changes. No key, a wrong key and a
revoked key get 401. The host's ``--token`` stays the admin of every namespace.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import wait_for
from .test_host import POOL_BODY, Host, assert_gone, make_state_root, start_host

ADMIN = "admin-token-apikeys"
A = "/v1/namespaces/team-a"
B = "/v1/namespaces/team-b"


def keys_cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandboxd", "host", "keys", *args, "--state-dir", str(state)],
        capture_output=True,
        text=True,
    )


def make_key(state: Path, namespace: str) -> str:
    r = keys_cli(state, "create", "--namespace", namespace)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    yield from make_state_root("sbk")


@pytest.fixture(scope="module")
def host(state_root: Path) -> Iterator[Host]:
    h = start_host(state_root / "s", warm=0, token=ADMIN)
    yield h
    with httpx.Client(base_url=h.url, headers=bearer(ADMIN)) as c:
        for ns in ("team-a", "team-b", "default"):
            for s in c.get(f"/v1/namespaces/{ns}/sandboxes").json().get("sandboxes", []):
                c.delete(f"/v1/namespaces/{ns}/sandboxes/{s['id']}")
    h.stop()


def test_keys_are_stored_hashed_0600_and_listed_without_the_secret(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = make_key(state, "team-a")
    assert key.startswith("sbk_") and len(key) > 40
    path = state / "apikeys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    secret = key.rsplit("_", 1)[1]
    assert secret not in text and key not in text
    listed = json.loads(keys_cli(state, "list", "--json").stdout)["keys"]
    assert [k["namespace"] for k in listed] == ["team-a"]
    assert key.split("_")[1] == listed[0]["id"]
    assert secret not in json.dumps(listed)
    # Made at the same time, none lost (the file is edited under a lock).
    argv = [sys.executable, "-m", "sandboxd", "host", "keys", "create", "--state-dir", str(state)]
    procs = [
        subprocess.Popen([*argv, "--namespace", f"ns-{i}"], stdout=subprocess.PIPE)
        for i in range(6)
    ]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    for p in procs:
        assert p.stdout is not None
        p.stdout.close()
    listed = json.loads(keys_cli(state, "list", "--json").stdout)["keys"]
    assert sorted(k["namespace"] for k in listed) == sorted(
        ["team-a", *(f"ns-{i}" for i in range(6))]
    )
    r = keys_cli(state, "create", "--namespace", "../etc")
    assert r.returncode == 1 and "not a valid name" in r.stderr
    r = keys_cli(state, "revoke", "nosuchid")
    assert r.returncode == 1 and "no key 'nosuchid'" in r.stderr


def test_another_namespaces_key_finds_nothing_and_changes_nothing(host: Host) -> None:
    state = host.state
    # Made while the host runs: it reads the key file without a restart.
    key_a, key_b = make_key(state, "team-a"), make_key(state, "team-b")
    a = httpx.Client(base_url=host.url, headers=bearer(key_a), timeout=60)
    b = httpx.Client(base_url=host.url, headers=bearer(key_b), timeout=60)
    admin = httpx.Client(base_url=host.url, headers=bearer(ADMIN), timeout=60)
    try:
        body = {"resources": {"cpus": 1.0, "memory_mb": 256}, "exposed_ports": [8080]}
        r = a.post(f"{A}/sandboxes", json=body)
        assert r.status_code == 200, r.text
        sid = r.json()["sandbox_id"]
        server = "python3 -m http.server 8080 -d /etc"
        r = a.post(
            "/api/v1/processes",
            json={"command": "sh", "args": ["-c", server]},
            headers={"Host": f"{sid}.local"},
        )
        assert r.status_code in (200, 201), r.text
        port_host = {"Host": f"8080-{sid}.localhost"}
        wait_for(lambda: a.get("/", headers=port_host).status_code == 200, timeout=20)
        snap = a.post(f"{A}/sandboxes/{sid}/snapshot").json()["snapshot_id"]
        pool = a.post(f"{A}/sandbox-pools", json=POOL_BODY).json()["pool_id"]
        done = a.post(f"{A}/sandboxes", json={"resources": {"cpus": 1.0, "memory_mb": 256}})
        ended = done.json()["sandbox_id"]
        assert a.delete(f"{A}/sandboxes/{ended}").status_code == 200

        def state_of_a() -> tuple[object, ...]:
            return (
                admin.get(f"{A}/sandboxes/{sid}").json()["status"],
                [s["id"] for s in admin.get(f"{A}/snapshots").json()["snapshots"]],
                [p["id"] for p in admin.get(f"{A}/sandbox-pools").json()["pools"]],
                len(admin.get(f"{A}/sandboxes").json()["sandboxes"]),
                len(admin.get(f"{B}/sandboxes").json()["sandboxes"]),
            )

        before = state_of_a()
        assert before[0] == "running" and before[1] == [snap] and before[2] == [pool]
        attacks: list[tuple[str, str, dict[str, object]]] = []
        for ns in (A, B, ""):  # team-a's paths, team-b's own paths, the flat paths
            attacks += [
                ("GET", f"{ns}/sandboxes/{sid}", {}),
                ("DELETE", f"{ns}/sandboxes/{sid}", {}),
                ("PATCH", f"{ns}/sandboxes/{sid}", {"json": {"name": "stolen"}}),
                ("POST", f"{ns}/sandboxes/{sid}/suspend", {}),
                ("POST", f"{ns}/sandboxes/{sid}/resume", {}),
                ("GET", f"{ns}/sandboxes/{sid}/logs", {}),
                ("GET", f"{ns}/sandboxes/{sid}/processes", {}),
                ("POST", f"{ns}/sandboxes/{sid}/snapshot", {}),
                ("GET", f"{ns}/sandboxes/{sid}/snapshots", {}),
                ("POST", f"{ns}/sandboxes/{sid}/copy", {}),
                ("GET", f"{ns}/snapshots/{snap}", {}),
                ("DELETE", f"{ns}/snapshots/{snap}", {}),
                ("POST", f"{ns}/sandboxes", {"json": {"snapshot_id": snap}}),
                ("GET", f"{ns}/sandbox-pools/{pool}", {}),
                ("PUT", f"{ns}/sandbox-pools/{pool}", {"json": {"image": "python"}}),
                ("DELETE", f"{ns}/sandbox-pools/{pool}", {}),
                ("POST", f"{ns}/sandbox-pools/{pool}/sandboxes", {}),
                ("GET", f"{ns}/archived-sandboxes/{ended}", {}),
            ]
        attacks += [
            ("GET", "/api/v1/health", {"headers": {"Host": f"{sid}.local"}}),
            ("GET", "/api/v1/health", {"headers": {"X-Tensorlake-Sandbox-Id": sid}}),
            (
                "POST",
                "/api/v1/processes/run",
                {"headers": {"Host": f"{sid}.local"}, "json": {"command": "true"}},
            ),
            ("GET", "/", {"headers": port_host}),
        ]
        for method, path, kw in attacks:
            r = b.request(method, path, **kw)  # type: ignore[arg-type]
            assert r.status_code == 404, (method, path, r.status_code, r.text)
            assert r.json()["code"].endswith("NOT_FOUND"), (method, path, r.text)
        # No key, a made-up key: 401 on every one of them, before anything runs.
        for key in (None, "sbk_00000000_" + "x" * 43, ADMIN + "x"):
            headers = bearer(key) if key else {}
            for method, path, kw in attacks:
                kw = {**kw, "headers": {**kw.get("headers", {}), **headers}}  # type: ignore[dict-item]
                r = httpx.request(method, host.url + path, **kw)  # type: ignore[arg-type]
                assert r.status_code == 401, (key, method, path, r.status_code, r.text)
        # team-b sees an empty world, and the admin-only /metrics is not for it.
        assert b.get(f"{B}/sandboxes").json()["sandboxes"] == []
        assert b.get(f"{B}/snapshots").json()["snapshots"] == []
        assert b.get("/sandboxes").json()["sandboxes"] == []
        assert b.get(f"{A}/sandboxes").status_code == 404
        assert b.get("/metrics").status_code == 403
        assert state_of_a() == before
        # team-a and the admin still reach all of it.
        assert a.get("/", headers=port_host).status_code == 200
        assert admin.get("/", headers=port_host).status_code == 200
        assert a.get("/api/v1/health", headers={"X-Tensorlake-Sandbox-Id": sid}).status_code == 200
        assert a.get(f"/sandboxes/{sid}").json()["namespace"] == "team-a"  # flat: the key's
        assert a.get(f"/v1/namespaces/default/sandboxes/{sid}").status_code == 200
        # Revoked: 401 at once, without a restart.
        key_id = key_b.split("_")[1]
        assert keys_cli(state, "revoke", key_id).returncode == 0
        r = b.get(f"{B}/sandboxes")
        assert (r.status_code, r.json()["code"]) == (401, "UNAUTHORIZED")
        # An exposed port with allow_unauthenticated_access: reachable without a key.
        assert httpx.get(host.url + "/", headers=port_host).status_code == 401
        r = a.patch(f"{A}/sandboxes/{sid}", json={"allow_unauthenticated_access": True})
        assert r.status_code == 200, r.text
        assert httpx.get(host.url + "/", headers=port_host).status_code == 200
    finally:
        a.delete(f"{A}/sandboxes/{sid}")
        a.delete(f"{A}/sandbox-pools/{pool}")
        a.close()
        b.close()
        admin.close()
    assert_gone(host, sid)


def test_revoking_the_last_key_does_not_open_the_host(tmp_path: Path) -> None:
    """Keys mode, once used, stays closed: no key left means nobody gets in, not everybody."""
    from sandboxd.host.apikeys import Authority, KeyFile

    keys = KeyFile(tmp_path)
    auth = Authority(None, keys, always_required=False)
    assert not auth.required()  # never used: a loopback host stays open, as before
    stored, secret = keys.create("team-a")
    assert auth.required() and auth.resolve(secret) is not None
    keys.revoke(stored.id)
    assert keys.keys() == ()
    assert auth.required()  # the last key gone: still closed
    assert auth.resolve(secret) is None
