"""Domain mode (issue 16): the official SDK as a program on another machine sees the host.

The client runs in a child process with its own ``/etc/hosts`` (``unshare -m``
and a bind mount of a temp file, in that process's mount namespace only), so
``api.example.test``, ``sandbox.example.test`` and the exposed ports' names
resolve to the host's address for it alone. Nothing but
``TENSORLAKE_API_URL=http://api.example.test:PORT`` and ``TENSORLAKE_API_KEY``
tells the SDK where the host is. That the SDK gets there at all shows its
Rust core honours /etc/hosts: the names resolve nowhere else (checked). (Its
resolver is its own, hickory-resolver, which reads /etc/hosts and
/etc/resolv.conf itself, not glibc's NSS: strace shows no nsswitch.conf read.)
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import free_port, skip_with_reason, wait_for
from .test_host import NS, Host, _cleanup, assert_gone, make_state_root, start_host

DOMAIN = "example.test"
ADMIN = "admin-s3cret-domain"


def make_key(state: Path, namespace: str) -> str:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sandboxd",
            "host",
            "keys",
            "create",
            "--namespace",
            namespace,
            "--state-dir",
            str(state),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return r.stdout.strip()


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    if shutil.which("unshare") is None:
        skip_with_reason("unshare (util-linux) is needed to give the client its own /etc/hosts")
    yield from make_state_root("sbd")


@pytest.fixture(scope="module")
def domain_host(state_root: Path) -> Iterator[Host]:
    port = free_port()
    public = f"http://sandbox.{DOMAIN}:{port}"
    h = start_host(
        state_root / "s", port, warm=1, token=ADMIN, extra_args=["--no-net", "--public-url", public]
    )
    yield h
    _cleanup_admin(h)
    h.stop()


def _cleanup_admin(h: Host) -> None:
    with httpx.Client(base_url=h.url, headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        for ns in ("default", "team-a"):
            for pool in c.get(f"/v1/namespaces/{ns}/sandbox-pools").json().get("pools", []):
                c.delete(f"/v1/namespaces/{ns}/sandbox-pools/{pool['id']}")
            r = c.get(f"/v1/namespaces/{ns}/sandboxes")
            for s in r.json().get("sandboxes", []):
                c.delete(f"/v1/namespaces/{ns}/sandboxes/{s['id']}")


def run_remote(tmp: Path, script: str, env: dict[str, str], timeout: float = 180) -> dict:
    """``script`` in a child whose /etc/hosts maps the deployment's names to 127.0.0.1.

    The hosts file is the child's to extend (an exposed port's name, once its
    id is known): it is a temp file bound over /etc/hosts in its namespace.
    """
    hosts = tmp / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 api.{DOMAIN} sandbox.{DOMAIN}\n")
    code = tmp / "client.py"
    code.write_text(script)
    r = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            'mount --bind "$1" /etc/hosts && exec "$2" "$3"',
            "sh",
            str(hosts),
            sys.executable,
            str(code),
        ],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp), "NO_PROXY": "*", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


CLIENT = textwrap.dedent(
    """
    import json, socket, time
    import httpx
    from tensorlake.sandbox import Sandbox, SandboxClient

    out = {"resolved": socket.gethostbyname("api.DOMAIN")}
    sbx = Sandbox.create(memory_mb=256, exposed_ports=[8080])
    out["sandbox_id"] = sbx.sandbox_id
    info = sbx.info()
    out["namespace"], out["sandbox_url"] = info.namespace, info.sandbox_url
    out["run"] = sbx.run("sh", args=["-c", "echo hi-$((6*7))"]).stdout.strip()
    # follow: SSE through the proxy
    p = sbx.start_process("sh", args=["-c", "echo one; sleep 0.2; echo two"])
    out["follow"] = [e.line for e in sbx.follow_stdout(p.pid)]
    sbx.write_file("/root/f.txt", b"domain bytes")
    out["file"] = sbx.read_file("/root/f.txt").value.decode()
    # a PTY (websocket through the proxy)
    seen = []
    pty = sbx.create_pty("sh", on_data=lambda b: seen.append(bytes(b)))
    pty.send_input("echo pty-$((6*7))\\n")
    end = time.monotonic() + 20
    while b"pty-42" not in b"".join(seen) and time.monotonic() < end:
        time.sleep(0.05)
    pty.disconnect()
    out["pty"] = b"pty-42" in b"".join(seen)
    # a tunnel (websocket) to a server on the sandbox's loopback
    sbx.run("sh", args=["-c", "echo tunnelled > /tmp/t.txt"])
    sbx.start_process("python3", args=["-m", "http.server", "8080", "-d", "/tmp"])
    probe = "import socket; socket.create_connection(('127.0.0.1', 8080), 1)"
    end = time.monotonic() + 20
    while sbx.run("python3", args=["-c", probe]).exit_code != 0 and time.monotonic() < end:
        time.sleep(0.1)
    with sbx.create_tunnel(8080, local_port=0) as t:
        out["tunnel"] = httpx.get(f"http://127.0.0.1:{t.local_port}/t.txt").text.strip()
    # the exposed port from a plain HTTP client, at <port>-<id>.sandbox.<domain>
    url = sbx.info().url_for_port(8080)
    out["port_url"] = url
    with open("/etc/hosts", "a") as f:  # this process's own hosts file
        f.write(f"127.0.0.1 {httpx.URL(url).host}\\n")
    key = {"Authorization": "Bearer " + KEY}
    out["port_no_key"] = httpx.get(url + "/t.txt").status_code
    out["port_key"] = httpx.get(url + "/t.txt", headers=key).text.strip()
    sbx.update(allow_unauthenticated_access=True)
    out["port_public"] = httpx.get(url + "/t.txt").text.strip()
    # list, logs (namespaced, on the API URL), snapshots and a restore
    out["listed"] = sbx.sandbox_id in [s.sandbox_id for s in Sandbox.list()]
    client = SandboxClient()
    out["logs"] = len(client.get_logs(sbx.sandbox_id).logs) > 0
    snap = sbx.checkpoint()
    out["snapshot"] = snap.status.value
    clone = Sandbox.create(snapshot_id=snap.snapshot_id)
    out["restored"] = clone.run("cat", args=["/root/f.txt"]).stdout
    clone.terminate()
    client.delete_snapshot(snap.snapshot_id)
    # a pool and a claim from it
    pool = client.create_pool(image="python", memory_mb=256, warm_containers=0, max_containers=2).pool_id
    claimed = Sandbox.create(pool_id=pool)
    out["claimed"] = claimed.run("echo", args=["claimed"]).stdout.strip()
    claimed.terminate()
    client.delete_pool(pool)
    sbx.terminate()
    print(json.dumps(out))
    """
)


# The rest of the SDK's lifecycle calls, at the flat paths of domain mode.
CLIENT_MORE = textwrap.dedent(
    """
    import json, time
    import httpx
    from tensorlake.sandbox import Sandbox, SandboxClient

    out = {}
    client = SandboxClient()
    sbx = Sandbox.get_or_create(name="domain-named", memory_mb=256)
    out["get_or_create"] = Sandbox.get_or_create(name="domain-named").sandbox_id == sbx.sandbox_id
    out["connect"] = Sandbox.connect(sbx.sandbox_id).run("echo", args=["by-id"]).stdout.strip()
    out["client_get"] = client.get("domain-named").sandbox_id == sbx.sandbox_id
    p = sbx.start_process("sleep", args=["300"])
    out["processes"] = p.pid in [x.pid for x in sbx.list_processes()]
    sbx.kill_process(p.pid)
    cat = sbx.start_process("cat", stdin_mode="pipe")
    sbx.write_stdin(cat.pid, b"piped\\n")
    sbx.close_stdin(cat.pid)
    end = time.monotonic() + 20
    while sbx.get_process(cat.pid).status.value == "running" and time.monotonic() < end:
        time.sleep(0.05)
    out["stdin"] = sbx.get_stdout(cat.pid).lines
    out["health"] = sbx.health().healthy
    out["ports"] = client.expose_ports(sbx.sandbox_id, [9000]).exposed_ports
    out["port_access"] = client.get_port_access(sbx.sandbox_id).exposed_ports
    out["unexposed"] = client.unexpose_ports(sbx.sandbox_id, [9000]).exposed_ports
    sbx.write_file("/root/d/x.txt", b"x")
    out["dir"] = [e.name for e in sbx.list_directory("/root/d").entries]
    sbx.delete_file("/root/d/x.txt")
    sbx.suspend()
    out["suspended"] = client.get(sbx.sandbox_id).status.value
    sbx.resume()
    out["resumed"] = sbx.run("echo", args=["back"]).stdout.strip()
    out["resized"] = sbx.update(memory_mb=320).resources.memory_mb
    out["renamed"] = sbx.update(name="domain-renamed").name
    snap = sbx.checkpoint()
    out["sandbox_snapshots"] = snap.snapshot_id in [s.snapshot_id for s in sbx.list_snapshots()]
    out["all_snapshots"] = snap.snapshot_id in [s.snapshot_id for s in client.list_snapshots()]
    out["get_snapshot"] = client.get_snapshot(snap.snapshot_id).status.value
    client.delete_snapshot(snap.snapshot_id)
    copies = sbx.copy(times=1)
    out["copies"] = len(copies.sandboxes)
    for c in copies.sandboxes:
        client.delete(c.sandbox_id)
    pool = client.create_pool(image="python", memory_mb=256, warm_containers=0, max_containers=1)
    client.update_pool(pool.pool_id, image="python", memory_mb=256, max_containers=3)
    out["pool_max"] = client.get_pool(pool.pool_id).max_containers
    out["pools"] = pool.pool_id in [q.pool_id for q in client.list_pools()]
    claimed = client.claim(pool.pool_id)
    out["claim"] = claimed.status.value
    client.delete(claimed.sandbox_id)
    client.delete_pool(pool.pool_id)
    # A volume (made with the host's own route, as the docs say) mounted live.
    key = {"Authorization": "Bearer " + KEY}
    r = httpx.post(sbx.info().sandbox_url + "/volumes", json={"name": "vol-d"}, headers=key)
    out["volume"] = r.status_code
    sbx.attach_file_system("vol-d", "/mnt/v")
    out["mounted"] = [f.mount_path for f in sbx.list_file_systems()]
    sbx.detach_file_system("/mnt/v")
    out["log_processes"] = len(sbx.list_log_processes().processes) > 0
    sbx.terminate()
    out["archived"] = client.get_archived(sbx.sandbox_id).status.value
    out["listed_archived"] = sbx.sandbox_id in [
        a.sandbox_id for a in client.list_archived(limit=50).sandboxes
    ]
    print(json.dumps(out))
    """
)


def printed_client_env(h: Host) -> dict[str, str]:
    """The ``export NAME=value`` lines ``sandboxd host`` printed at start."""
    lines = [ln.strip() for ln in h.log().splitlines() if ln.strip().startswith("export ")]
    return dict(ln.removeprefix("export ").split("=", 1) for ln in lines)


def test_names_do_not_resolve_outside_the_clients_namespace() -> None:
    """The control for everything below: only the child's /etc/hosts knows these names."""
    for name in (f"api.{DOMAIN}", f"sandbox.{DOMAIN}"):
        with pytest.raises(socket.gaierror):
            socket.getaddrinfo(name, 80)
    assert f"api.{DOMAIN}" not in Path("/etc/hosts").read_text()


def test_the_sdk_on_another_machine_uses_the_host_through_its_domain(
    domain_host: Host, tmp_path: Path
) -> None:
    key = make_key(domain_host.state, "team-a")
    port = int(domain_host.url.rsplit(":", 1)[1])
    # Exactly what the host printed at start: the URL line is used as it is.
    printed = printed_client_env(domain_host)
    assert printed["TENSORLAKE_API_URL"] == f"http://api.{DOMAIN}:{port}"
    assert "sandboxd host keys create --namespace NS" in printed["TENSORLAKE_API_KEY"]
    api = printed["TENSORLAKE_API_URL"]
    script = CLIENT.replace("DOMAIN", DOMAIN).replace("KEY", repr(key))
    out = run_remote(tmp_path, script, {"TENSORLAKE_API_URL": api, "TENSORLAKE_API_KEY": key})
    assert out["resolved"] == "127.0.0.1"
    assert out["namespace"] == "team-a"  # the key's namespace: the flat paths carry none
    assert out["sandbox_url"] == f"http://sandbox.{DOMAIN}:{port}"
    assert out["run"] == "hi-42"
    assert out["follow"] == ["one", "two"]
    assert out["file"] == "domain bytes"
    assert out["pty"] is True
    assert out["tunnel"] == "tunnelled"
    assert out["port_url"] == f"http://8080-{out['sandbox_id']}.sandbox.{DOMAIN}:{port}"
    assert out["port_no_key"] == 401
    assert out["port_key"] == "tunnelled"
    assert out["port_public"] == "tunnelled"
    assert out["listed"] and out["logs"]
    assert out["snapshot"] == "completed"
    assert out["restored"] == "domain bytes"
    assert out["claimed"] == "claimed"
    assert_gone(domain_host, out["sandbox_id"])
    # The calls went to the flat paths on sandbox.<domain> (the request log says so).
    assert "POST /sandboxes 200" in domain_host.log()


def test_the_rest_of_the_sdk_lifecycle_calls_work_in_domain_mode(
    domain_host: Host, tmp_path: Path
) -> None:
    key = make_key(domain_host.state, "team-a")
    env = {"TENSORLAKE_API_URL": printed_client_env(domain_host)["TENSORLAKE_API_URL"]}
    script = CLIENT_MORE.replace("KEY", repr(key))
    out = run_remote(tmp_path, script, {**env, "TENSORLAKE_API_KEY": key})
    assert out == {
        "get_or_create": True,
        "connect": "by-id",
        "client_get": True,
        "processes": True,
        "stdin": ["piped"],
        "health": True,
        "ports": [9000],
        "port_access": [9000],
        "unexposed": [],
        "dir": ["x.txt"],
        "suspended": "suspended",
        "resumed": "back",
        "resized": 320,
        "renamed": "domain-renamed",
        "sandbox_snapshots": True,
        "all_snapshots": True,
        "get_snapshot": "completed",
        "copies": 1,
        "pool_max": 3,
        "pools": True,
        "claim": "running",
        "volume": 201,
        "mounted": ["/mnt/v"],
        "log_processes": True,
        "archived": "terminated",
        "listed_archived": True,
    }
    # The flat paths, as the SDK sends them in domain mode (the request log, which
    # leaves out successful GETs, says so).
    calls = {
        " ".join(ln.split("sandboxd.http: ", 1)[1].split()[:2])
        for ln in domain_host.log().splitlines()
        if "sandboxd.http: " in ln
    }
    for call in ("PUT /sandbox-pools/", "POST /volumes", "POST /sandboxes/sbx-"):
        assert any(c.startswith(call) for c in calls), (call, sorted(calls))


def test_the_proxy_routes_by_host_name_and_by_header(domain_host: Host) -> None:
    port = int(domain_host.url.rsplit(":", 1)[1])
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=domain_host.url, headers=admin, timeout=60) as c:
        # A flat create as the admin lands in "default" and answers the public URL.
        r = c.post(
            "/sandboxes",
            json={"resources": {"cpus": 1.0, "memory_mb": 256}},
            headers={"Host": f"sandbox.{DOMAIN}:{port}"},
        )
        assert r.status_code == 200, r.text
        sid = r.json()["sandbox_id"]
        assert r.json()["sandbox_url"] == f"http://sandbox.{DOMAIN}:{port}"
        assert c.get(f"/v1/namespaces/default/sandboxes/{sid}").status_code == 200
        by_name = c.get("/api/v1/health", headers={"Host": f"{sid}.sandbox.{DOMAIN}:{port}"})
        by_header = c.get(
            "/api/v1/health",
            headers={"Host": f"sandbox.{DOMAIN}:{port}", "X-Tensorlake-Sandbox-Id": sid},
        )
        assert (by_name.status_code, by_header.status_code) == (200, 200), by_name.text
        # A flat call this host lacks is 501, never a 404 the SDK would read as "not found".
        r = c.get(f"/sandboxes/{sid}/no-such-call", headers={"Host": f"sandbox.{DOMAIN}"})
        assert (r.status_code, r.json()["code"]) == (501, "ROUTE_UNSUPPORTED")
        # Localhost mode on the same host: 127.0.0.1 in the reply, as before.
        local = c.get(f"/v1/namespaces/default/sandboxes/{sid}").json()
        assert local["sandbox_url"] == f"http://127.0.0.1:{port}"
        # Without a key, domain mode refuses everything (a key is always required).
        r = httpx.get(domain_host.url + "/sandboxes", headers={"Host": f"sandbox.{DOMAIN}"})
        assert (r.status_code, r.json()["code"]) == (401, "UNAUTHORIZED")
        c.delete(f"/sandboxes/{sid}", headers={"Host": f"sandbox.{DOMAIN}"})
    assert_gone(domain_host, sid)


def test_localhost_mode_is_unchanged_without_a_public_url(state_root: Path) -> None:
    """No --public-url, no token, no keys: open on loopback names, 127.0.0.1 URLs."""
    from tensorlake.sandbox import Sandbox

    h = start_host(state_root / "plain", warm=0)
    try:
        # The start-up lines: this machine's loopback URL, and no key to set.
        assert printed_client_env(h) == {"TENSORLAKE_API_URL": h.url}
        assert "unset TENSORLAKE_API_KEY" in h.log()
        assert "any other TENSORLAKE_API_URL sends the SDK's calls and key to" in h.log()
        sbx = Sandbox.create(api_url=h.url, api_key=None, memory_mb=256)
        try:
            assert sbx.info().sandbox_url == h.url
            assert sbx.run("echo", args=["local"]).stdout.strip() == "local"
        finally:
            sbx.terminate()
        r = httpx.get(h.url + NS, headers={"Host": f"sandbox.{DOMAIN}"})
        assert (r.status_code, r.json()["code"]) == (403, "HOST_NOT_ALLOWED")
        # `systemctl reload` (SIGHUP) without TLS: logged, the host stays up.
        h.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "no --tls-cert to reload" in h.log(), timeout=10)
        assert h.proc.poll() is None and httpx.get(h.url + NS).status_code == 200
    finally:
        _cleanup(h)
        h.stop()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https://example.com", "must be sandbox.<domain>"),
        ("https://sandbox.example.com/path", "no path"),
        ("ftp://sandbox.example.com", "give http(s)://"),
    ],
)
def test_a_public_url_the_sdk_could_not_reach_is_refused_in_one_line(
    tmp_path: Path, url: str, says: str
) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sandboxd",
            "host",
            "--public-url",
            url,
            "--state-dir",
            str(tmp_path / "s"),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0 and says in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_public_url_names() -> None:
    from sandboxd.host.domain import PublicUrl

    p = PublicUrl.parse("https://api.Example.com:443/")
    assert (p.sandbox_url, p.api_url) == ("https://sandbox.example.com", "https://api.example.com")
    p = PublicUrl.parse("http://sandbox.example.test:8900")
    assert p.api_url == "http://api.example.test:8900"
    assert p.sandbox_id_of_host("sbx-00ab.sandbox.example.test:8900") == "sbx-00ab"
    assert p.sandbox_id_of_host("8080-sbx-00ab.sandbox.example.test") is None
    assert p.sandbox_id_of_host("sbx-00ab.sandbox.example.test.evil.com") is None
    assert p.serves("api.example.test:8900") and not p.serves("127.0.0.1:8900")
