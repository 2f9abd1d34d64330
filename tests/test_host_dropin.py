"""Issue 15: ``sandboxd host`` as a drop-in for Tensorlake's control plane, through the SDK.

One host (``--no-net``, a token) for the module; every call is the official
SDK's (0.5.163) unless a test says otherwise. Entrypoints, a pool's timeout,
live port exposure, the archive, logs after termination, and one test per
specific refusal.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import wait_for
from .test_host import NS, Host, make_state_root, start_host

TOKEN = "dropin-token-0123456789"
SERVER = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello from inside"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    for root in make_state_root("sbd"):
        h = start_host(root / "s", warm=1, token=TOKEN)
        try:
            yield h
        finally:
            _cleanup_with_token(h)
            h.stop()


def _cleanup_with_token(h: Host) -> None:
    with (
        contextlib.suppress(httpx.HTTPError),
        httpx.Client(base_url=h.url, timeout=30, headers=_auth()) as c,
    ):
        for s in c.get(NS).json()["sandboxes"]:
            c.delete(f"{NS}/{s['id']}")
        for p in c.get("/v1/namespaces/default/sandbox-pools").json()["pools"]:
            c.delete(f"/v1/namespaces/default/sandbox-pools/{p['id']}")


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def _sdk(h: Host) -> dict[str, Any]:
    return {"api_url": h.url, "api_key": TOKEN}


def _client(h: Host) -> Any:
    from tensorlake.sandbox import SandboxClient

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return SandboxClient(api_url=h.url, api_key=TOKEN)


# -- 1. entrypoint ----------------------------------------------------------------


def test_an_entrypoint_is_an_ordinary_process_visible_followable_killable(host: Host) -> None:
    from tensorlake.sandbox import Sandbox

    argv = ["sh", "-c", "echo entry-ready; exec sleep 600"]
    sbx = Sandbox.create(entrypoint=argv, memory_mb=256, **_sdk(host))
    try:
        assert sbx.info().entrypoint == argv
        procs = [p for p in sbx.list_processes() if p.command == "sh" and p.args == argv[1:]]
        assert len(procs) == 1, list(sbx.list_processes())
        pid = procs[0].pid
        wait_for(lambda: "entry-ready" in sbx.get_stdout(pid).lines, timeout=10)
        sbx.kill_process(pid)
        followed = [e.line for e in sbx.follow_output(pid) if e.line]
        assert "entry-ready" in followed, followed
        # The entrypoint is gone; the sandbox is not.
        assert sbx.status.value == "running"
        assert sbx.run("echo", args=["still here"]).stdout.strip() == "still here"
    finally:
        sbx.terminate()


def test_an_entrypoint_that_cannot_start_is_reported_and_the_sandbox_runs(host: Host) -> None:
    from tensorlake.sandbox import Sandbox

    sbx = Sandbox.create(entrypoint=["no-such-command-xyz", "--flag"], **_sdk(host))
    try:
        info = sbx.info()
        assert info.status.value == "running"
        assert info.error_details["code"] == "ENTRYPOINT_FAILED", info.error_details
        assert "no-such-command-xyz" in info.error_details["message"], info.error_details
        assert sbx.run("echo", args=["ok"]).stdout.strip() == "ok"
        logs = sbx.get_logs(levels=["error"]).logs
        assert any("could not start" in entry.body for entry in logs), logs
    finally:
        sbx.terminate()


# -- 2. a pool's entrypoint and timeout, the image as asked -----------------------


def test_a_pool_sandbox_runs_its_entrypoint_and_is_suspended_when_its_time_is_up(
    host: Host,
) -> None:
    from tensorlake.sandbox import Sandbox

    client = _client(host)
    argv = ["sh", "-c", "echo warm-entry; exec sleep 600"]
    pool_id = client.create_pool(
        image="python", memory_mb=256, timeout_secs=2, entrypoint=argv, warm_containers=1
    ).pool_id
    sbx = None
    try:
        pool = client.get_pool(pool_id)
        assert (pool.image, pool.entrypoint) == ("python", argv)
        wait_for(
            lambda: any(c.state == "Idle" for c in client.get_pool(pool_id).containers or []),
            timeout=20,
        )
        sbx = Sandbox.create(pool_id=pool_id, **_sdk(host))
        info = sbx.info()
        assert (info.image, info.entrypoint, info.pool_id) == ("python", argv, pool_id)
        # Started while warm, before the claim: already there and already talking.
        (entry,) = [p for p in sbx.list_processes() if p.args == argv[1:]]
        assert entry.started_at < info.created_at  # started while warm, before the claim
        # Its first line may still be on its way (it was started a moment ago).
        wait_for(lambda: "warm-entry" in sbx.get_stdout(entry.pid).lines, timeout=10)
        listed = {s.sandbox_id: s for s in Sandbox.list(**_sdk(host))}
        assert listed[sbx.sandbox_id].image == "python"

        def suspended() -> bool:
            return client.get(sbx.sandbox_id).status.value == "suspended"

        wait_for(suspended, timeout=15)
        got = client.get(sbx.sandbox_id)
        assert (got.outcome, got.termination_reason) == (None, None), got
        # It comes back, its entrypoint with it (frozen, not restarted).
        sbx.resume()
        assert entry.pid in [p.pid for p in sbx.list_processes() if p.status.value == "running"]
    finally:
        if sbx is not None:
            sbx.terminate()
        client.delete_pool(pool_id)


# -- 5. ports, live ------------------------------------------------------------------


def test_exposing_ports_is_live_and_so_is_unauthenticated_access(host: Host) -> None:
    from tensorlake.sandbox import Sandbox

    client = _client(host)
    sbx = Sandbox.create(memory_mb=256, **_sdk(host))
    try:
        sbx.start_process("python3", args=["-c", SERVER, "8080"])
        port = host.url.rsplit(":", 1)[1]
        name = f"8080-{sbx.sandbox_id}.localhost:{port}"

        def get(auth: bool) -> httpx.Response:
            headers = {"Host": name, **(_auth() if auth else {})}
            return httpx.get(host.url + "/", headers=headers, timeout=10)

        assert get(auth=True).json()["code"] == "PORT_NOT_EXPOSED"
        client.expose_ports(sbx.sandbox_id, [8080])
        access = client.get_port_access(sbx.sandbox_id)
        assert (access.exposed_ports, access.allow_unauthenticated_access) == ([8080], False)
        wait_for(lambda: get(auth=True).status_code == 200, timeout=10)
        assert get(auth=True).text == "hello from inside"
        assert get(auth=False).status_code == 401  # the host's token guards it
        client.expose_ports(sbx.sandbox_id, [8080], allow_unauthenticated_access=True)
        assert get(auth=False).text == "hello from inside"
        client.unexpose_ports(sbx.sandbox_id, [8080])
        access = client.get_port_access(sbx.sandbox_id)
        assert (access.exposed_ports, access.allow_unauthenticated_access) == ([], False)
        r = get(auth=True)
        assert (r.status_code, r.json()["code"]) == (403, "PORT_NOT_EXPOSED")
    finally:
        sbx.terminate()


# -- 4. the archive ------------------------------------------------------------------


def test_terminated_sandboxes_are_archived_and_paged(host: Host) -> None:
    from tensorlake.sandbox import Sandbox
    from tensorlake.sandbox.exceptions import SandboxError, SandboxNotFoundError

    client = _client(host)
    ids = []
    for i in range(3):
        sbx = Sandbox.create(image="python", memory_mb=128 + i, **_sdk(host))
        ids.append(sbx.sandbox_id)
        sbx.terminate()
    seen: list[str] = []
    page = client.list_archived(limit=2)
    assert len(page.sandboxes) == 2 and page.next_cursor and page.prev_cursor is None
    seen += [s.sandbox_id for s in page.sandboxes]
    second = client.list_archived(limit=2, cursor=page.next_cursor)
    seen += [s.sandbox_id for s in second.sandboxes]
    # Newest first: the three just ended lead, in reverse order of their end.
    assert seen[:3] == ids[::-1], seen
    back = client.list_archived(limit=2, cursor=second.prev_cursor, direction="backward")
    assert [s.sandbox_id for s in back.sandboxes] == seen[:2]
    one = client.get_archived(ids[1])
    assert (one.image, one.resources.memory_mb, one.status.value) == ("python", 129, "terminated")
    assert one.outcome == "Success(user_terminated)" and one.archived_at and one.terminated_at
    with pytest.raises(SandboxNotFoundError):
        client.get_archived("sbx-00000000deadbeef")
    live = Sandbox.create(memory_mb=128, **_sdk(host))
    try:
        with pytest.raises(SandboxError) as e:
            client.get_archived(live.sandbox_id)
        assert "SANDBOX_NOT_ARCHIVED" in str(e.value) and "get()" in str(e.value)
    finally:
        live.terminate()


# -- 3. logs -------------------------------------------------------------------------


def test_logs_are_paged_filtered_and_still_there_after_termination(host: Host) -> None:
    from tensorlake.sandbox import Sandbox

    sbx = Sandbox.create(memory_mb=256, **_sdk(host))
    sid = sbx.sandbox_id
    r = sbx.run("sh", args=["-c", "echo out-line-1; echo out-line-2; echo err-line >&2"])
    assert r.exit_code == 0
    sbx.terminate()
    client = _client(host)
    logs = client.get_logs(sid).logs
    bodies = [entry.body for entry in logs]
    assert {"out-line-1", "out-line-2", "err-line"} <= set(bodies), bodies
    assert bodies[0].startswith("sandbox created") and "terminated" in bodies[-1], bodies
    errors = client.get_logs(sid, levels=["error"]).logs
    assert [entry.body for entry in errors] == ["err-line"]
    procs = client.list_log_processes(sid).processes
    (shell,) = [p for p in procs if p.process_command.startswith("sh -c")]
    assert shell.log_count == 3
    only = client.get_logs(sid, process_ids=[shell.process_id]).logs
    assert sorted(entry.body for entry in only) == ["err-line", "out-line-1", "out-line-2"]
    # Paged: head=2 then the rest from nextToken, nothing lost or repeated.
    first = client.get_logs(sid, head=2)
    assert len(first.logs) == 2 and first.next_token
    rest = client.get_logs(sid, next_token=first.next_token, head=100)
    assert [e.uuid for e in first.logs + rest.logs] == [e.uuid for e in logs]
    assert rest.next_token is None
    assert [e.body for e in client.get_logs(sid, tail=1).logs] == [bodies[-1]]
    assert [e.body for e in client.get_logs(sid, body="line-2").logs] == ["out-line-2"]


# -- 8. refusals that say what they are ----------------------------------------------


def test_a_memory_size_the_host_never_has_is_refused_at_create(host: Host) -> None:
    from tensorlake.sandbox import Sandbox
    from tensorlake.sandbox.exceptions import RemoteAPIError

    with pytest.raises(RemoteAPIError) as e:
        Sandbox.create(memory_mb=4_000_000, **_sdk(host))
    assert e.value.status_code == 400
    assert "MEMORY_TOO_LARGE" in str(e.value) and "at most" in str(e.value)


def test_a_disk_size_the_host_never_has_is_refused_at_create(host: Host) -> None:
    from tensorlake.sandbox import Sandbox
    from tensorlake.sandbox.exceptions import RemoteAPIError

    with pytest.raises(RemoteAPIError) as e:
        Sandbox.create(disk_mb=1 << 20, **_sdk(host))
    assert e.value.status_code == 400
    assert "DISK_TOO_LARGE" in str(e.value) and "at most" in str(e.value)


def test_a_network_policy_on_a_no_net_host_is_refused_not_stored(host: Host) -> None:
    from tensorlake.sandbox import Sandbox
    from tensorlake.sandbox.exceptions import RemoteAPIError
    from tensorlake.sandbox.models import NetworkConfig

    with pytest.raises(RemoteAPIError) as e:
        Sandbox.create(allow_internet_access=False, **_sdk(host))
    assert e.value.status_code == 400
    assert "NETWORK_UNAVAILABLE" in str(e.value) and "--no-net" in str(e.value)
    with pytest.raises(RemoteAPIError) as e:
        no_lan = NetworkConfig(allow_internet_access=True, deny_out=["10.0.0.0/8"])
        _client(host).create_pool(image="python", memory_mb=128, network=no_lan)
    assert "NETWORK_UNAVAILABLE" in str(e.value)
    sbx = Sandbox.create(memory_mb=128, **_sdk(host))
    try:
        with pytest.raises(RemoteAPIError) as e:
            sbx.update(network=NetworkConfig(allow_internet_access=True, allow_out=["1.1.1.1"]))
        assert "NETWORK_UNAVAILABLE" in str(e.value)
        assert sbx.info().network_policy is None
    finally:
        sbx.terminate()


def test_suspending_an_unnamed_sandbox_says_how_to_name_it(host: Host) -> None:
    from tensorlake.sandbox import Sandbox
    from tensorlake.sandbox.exceptions import RemoteAPIError

    sbx = Sandbox.create(memory_mb=128, **_sdk(host))
    try:
        with pytest.raises(RemoteAPIError) as e:
            sbx.suspend()
        assert "SUSPEND_NEEDS_NAME" in str(e.value) and "update(name=" in str(e.value)
    finally:
        sbx.terminate()


def test_a_terminated_sandboxs_daemon_calls_say_terminated_not_lost(host: Host) -> None:
    from tensorlake.sandbox import Sandbox
    from tensorlake.sandbox.exceptions import RemoteAPIError

    sbx = Sandbox.create(memory_mb=128, **_sdk(host))
    sbx.terminate()
    with pytest.raises(RemoteAPIError) as e:
        sbx.run("true")
    assert "SANDBOX_TERMINATED" in str(e.value) and "get_logs()" in str(e.value)


def test_logs_and_archive_routes_exist_for_every_sandbox_the_sdk_can_name(host: Host) -> None:
    """Before issue 15 these were bare 404s, which the SDK reads as a lost sandbox."""
    from tensorlake.sandbox import Sandbox
    from tensorlake.sandbox.exceptions import SandboxNotFoundError

    client = _client(host)
    sbx = Sandbox.create(memory_mb=128, **_sdk(host))
    try:
        assert client.get_logs(sbx.sandbox_id).logs[0].body.startswith("sandbox created")
        assert client.list_log_processes(sbx.sandbox_id).processes is not None
        assert client.list_archived(limit=1).sandboxes is not None
    finally:
        sbx.terminate()
    with pytest.raises(SandboxNotFoundError):
        client.get_logs("sbx-00000000deadbeef")


def test_a_call_this_host_does_not_implement_is_501_not_a_lost_sandbox(host: Host) -> None:
    """A path of the lifecycle API with no route here: a specific refusal, never a bare 404."""
    from tensorlake.sandbox import Sandbox
    from tensorlake.sandbox.exceptions import RemoteAPIError, SandboxNotFoundError

    sbx = Sandbox.create(memory_mb=128, **_sdk(host))
    try:
        with httpx.Client(base_url=host.url, timeout=10, headers=_auth()) as c:
            r = c.post(f"{NS}/{sbx.sandbox_id}/no-such-call", json={})
        assert (r.status_code, r.json()["code"]) == (501, "ROUTE_UNSUPPORTED"), r.text
        assert "SDK calls and their status" in r.json()["error"]
        # Through the SDK: whatever it raises, it does not say the sandbox is gone.
        with contextlib.suppress(RemoteAPIError):
            try:
                sbx.detach_file_system("/mnt/none")
            except SandboxNotFoundError:
                pytest.fail("an unimplemented call was read as a lost sandbox")
        assert sbx.status.value == "running"
    finally:
        sbx.terminate()
