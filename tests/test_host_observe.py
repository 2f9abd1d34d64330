"""Host observability end to end: ``/metrics``, ``/health``, request and event lines.

A real ``sandboxd host`` (subprocess on loopback), the official SDK as the
client, ``/metrics`` read with prometheus_client's own text parser, and the
host's log file read for the lines an operator greps.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import wait_for
from .test_host import NS, Host, make_state_root, start_host
from .test_host_lifecycle_holes import KILL_DAEMON

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    yield from make_state_root("sbo")


@pytest.fixture(scope="module")
def host(state_root: Path) -> Iterator[Host]:
    h = start_host(state_root / "s", warm=1)
    yield h
    with httpx.Client(base_url=h.url) as c:
        for s in c.get(NS).json()["sandboxes"]:
            c.delete(f"{NS}/{s['id']}")
    h.stop()


def scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    r = httpx.get(url + "/metrics", headers=headers or {}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of every series of ``name`` whose labels include ``labels`` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def event_line(log: str, word: str, sandbox_id: str) -> str | None:
    for line in log.splitlines():
        if re.search(rf"sandboxd\.events: {word} sandbox={re.escape(sandbox_id)}\b", line):
            return line
    return None


def test_counters_and_event_lines_follow_a_sandbox_lifecycle(host: Host) -> None:
    from tensorlake.sandbox import Sandbox

    before = scrape(host.url)
    assert value(before, "sandboxd_build_info") == 1
    sbx = Sandbox.create(name="watched", api_url=host.url, api_key=None, memory_mb=256)
    sid = sbx.sandbox_id
    assert sbx.run("echo", args=["hi"]).stdout.strip() == "hi"
    sbx.suspend()
    sbx.resume()
    snap = sbx.checkpoint()
    assert snap is not None and snap.status.value == "completed"
    sbx.terminate()
    after = scrape(host.url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # One create, through a warm spare or a cold start, that ended running.
    assert moved("sandboxd_host_creates_total", outcome="running") == 1
    assert moved("sandboxd_host_create_duration_seconds_count") == 1
    for event in ("started", "suspend", "frozen", "resume", "snapshot", "terminate"):
        assert moved("sandboxd_host_status_changes_total", event=event) >= 1, event
    assert moved("sandboxd_host_snapshots_total", type="filesystem", outcome="completed") == 1
    assert (
        moved("sandboxd_host_sandboxes_ended_total", status="terminated", reason="user_terminated")
        == 1
    )
    assert moved("sandboxd_host_proxy_requests_total", route_class="processes", status="200") >= 1
    assert value(after, "sandboxd_host_sandboxes", namespace="default", status="terminated") >= 1
    # Requests by route template, never by raw path (bounded labels).
    assert (
        moved(
            "sandboxd_http_requests_total",
            method="POST",
            route="/v1/namespaces/{ns}/sandboxes/{id}/suspend",
        )
        == 1
    )
    assert not any(sid in str(labels) for (_, labels) in after)

    # One event line per change, in order, with what an operator needs.
    wait_for(lambda: event_line(host.log(), "terminated", sid) is not None, timeout=5)
    log = host.log()
    lines = [
        event_line(log, w, sid)
        for w in ("created", "running", "suspending", "suspended", "resumed", "terminated")
    ]
    assert all(lines), "\n".join(line for line in log.splitlines() if sid in line)
    positions = [log.index(line) for line in lines if line]
    assert positions == sorted(positions)
    created, running, _, suspended, resumed, terminated = (str(line) for line in lines)
    assert "name=watched" in suspended and "from=suspending" in suspended
    assert "from=pending" in running and "from=suspended" in resumed
    assert "reason=user_terminated" in terminated
    assert re.search(r"path=(spare|cold)", created)
    # The SDK sends a traceparent on every call: the lines carry its trace id.
    assert re.search(r"trace_id=[0-9a-f]{32}", created), created
    assert re.search(r"trace_id=[0-9a-f]{32}", terminated), terminated


def test_creates_are_counted_by_path_spare_and_pool_claim(host: Host) -> None:
    from tensorlake.sandbox import Sandbox

    from .test_host_lifecycle import _client

    # The spare gauge says when a default create can take one.
    wait_for(lambda: value(scrape(host.url), "sandboxd_host_warm_spares") >= 1, timeout=20)
    client = _client(host)
    pool_id = client.create_pool(
        image="python", cpus=1.0, memory_mb=256, max_containers=1, warm_containers=1
    ).pool_id
    made: list[Sandbox] = []
    try:

        def pool_warm() -> bool:
            return any(c.state == "Idle" for c in client.get_pool(pool_id).containers or [])

        wait_for(pool_warm, timeout=20)
        before = scrape(host.url)
        made.append(Sandbox.create(api_url=host.url, api_key=None))
        made.append(Sandbox.create(pool_id=pool_id, api_url=host.url, api_key=None))
        after = scrape(host.url)
        for path in ("spare", "pool"):
            got = value(after, "sandboxd_host_creates_total", path=path, outcome="running")
            was = value(before, "sandboxd_host_creates_total", path=path, outcome="running")
            assert got - was == 1, path
            assert value(after, "sandboxd_host_create_duration_seconds_count", path=path) >= 1
        log = host.log()
        assert "path=spare" in str(event_line(log, "created", made[0].sandbox_id))
        assert "path=pool" in str(event_line(log, "created", made[1].sandbox_id))
    finally:
        for sbx in made:
            sbx.terminate()
        client.delete_pool(pool_id)


def test_a_failure_has_its_event_line_with_the_cause(host: Host) -> None:
    from tensorlake.sandbox import Sandbox
    from tensorlake.sandbox.exceptions import SandboxError

    before = scrape(host.url)
    sbx = Sandbox.create(api_url=host.url, api_key=None, memory_mb=256)
    sid = sbx.sandbox_id
    try:
        with pytest.raises(SandboxError):  # the request that kills the daemon loses it
            sbx.run("python3", args=["-c", KILL_DAEMON])
        wait_for(lambda: event_line(host.log(), "failed", sid) is not None, timeout=15)
    finally:
        sbx.terminate()
    line = str(event_line(host.log(), "failed", sid))
    assert "reason=daemon_died" in line and "cause=" in line and "WARNING" in line, line
    after = scrape(host.url)
    assert (
        value(after, "sandboxd_host_sandboxes_ended_total", status="failed", reason="daemon_died")
        - value(
            before, "sandboxd_host_sandboxes_ended_total", status="failed", reason="daemon_died"
        )
        == 1
    )


def test_a_timeout_has_its_event_line_and_a_stop_its_own_lines(state_root: Path) -> None:
    from tensorlake.sandbox import Sandbox

    h = start_host(state_root / "to", warm=0)
    try:
        sbx = Sandbox.create(api_url=h.url, api_key=None, memory_mb=256, timeout_secs=1)
        sid = sbx.sandbox_id
        wait_for(lambda: event_line(h.log(), "terminated", sid) is not None, timeout=30)
        assert "reason=timeout" in str(event_line(h.log(), "terminated", sid))
        samples = scrape(h.url)
        assert value(samples, "sandboxd_host_sandboxes_ended_total", reason="timeout") == 1
        # No spare on this host: the create was a cold start, timed as one.
        assert value(samples, "sandboxd_host_creates_total", path="cold", outcome="running") == 1
        assert value(samples, "sandboxd_host_create_duration_seconds_count", path="cold") == 1
    finally:
        h.stop()
    stopping = [line for line in h.log().splitlines() if "sandboxd host stopping" in line]
    assert len(stopping) == 1 and "on SIGTERM" in stopping[0], h.log()[-2000:]
    assert h.log().rstrip().endswith("sandboxd host stopped"), h.log()[-2000:]


def test_a_traceparent_reaches_the_request_log(host: Host) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = httpx.post(
        host.url + NS,
        json={"memory_mb": "lots"},
        headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
    )
    assert r.status_code == 400 and r.json()["code"], r.text
    wait_for(lambda: trace_id in host.log(), timeout=5)
    line = next(line for line in host.log().splitlines() if trace_id in line)
    assert f"POST {NS} 400" in line and "sandboxd.http" in line, line
    # A malformed traceparent is ignored, never an error.
    r = httpx.get(host.url + "/health", headers={"traceparent": "zz"})
    assert r.status_code == 200


def test_health_reports_readiness(host: Host) -> None:
    r = httpx.get(host.url + "/health")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok"
    for check in ("images", "runtime", "cgroups", "store"):
        assert body["checks"][check]["ok"] is True, body
        assert body["checks"][check]["detail"], body


def test_health_says_not_ready_and_why_when_the_image_store_has_no_default_image(
    state_root: Path,
) -> None:
    """Readiness is checked, not assumed: a host that could make no sandbox says so."""
    empty = state_root / "no-images"
    empty.mkdir()
    args = ["--no-net", "--images", str(empty), "--no-build-default"]
    h = start_host(state_root / "nr", warm=0, extra_args=args)
    try:
        r = httpx.get(h.url + "/health")
        assert r.status_code == 503, r.text
        body = r.json()
        assert (body["status"], body["code"]) == ("not_ready", "NOT_READY")
        assert "images" in body["error"]
        assert body["checks"]["images"]["ok"] is False
        assert f"sandboxd image --images {empty} build" in body["checks"]["images"]["detail"]
        # What is fine is still reported as fine.
        assert body["checks"]["runtime"]["ok"] is True and body["checks"]["store"]["ok"] is True
    finally:
        h.stop()


def test_health_and_metrics_need_the_token_on_a_token_host(state_root: Path) -> None:
    h = start_host(state_root / "t", warm=0, token="s3cret")
    try:
        for path in ("/health", "/metrics"):
            r = httpx.get(h.url + path)
            assert (r.status_code, r.json()["code"]) == (401, "UNAUTHORIZED"), path
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(h.url + "/health", headers=auth).status_code == 200
        samples = scrape(h.url, auth)
        assert value(samples, "sandboxd_http_requests_total", route="/health", status="401") == 1
        assert value(samples, "sandboxd_host_warm_spares") == 0
    finally:
        h.stop()
    assert "s3cret" not in h.log()
