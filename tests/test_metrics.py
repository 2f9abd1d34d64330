"""``GET /metrics``: Prometheus text through prometheus_client, against a live daemon."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Daemon, skip_with_reason, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(d: Daemon) -> Samples:
    with d.http() as http:
        r = http.get("/metrics")
    assert r.status_code == 200, r.text
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def fresh(make_daemon) -> Daemon:  # type: ignore[no-untyped-def]
    """A daemon of its own, so every count starts at zero."""
    return make_daemon()  # type: ignore[no-any-return]


def test_text_format_and_every_family(fresh: Daemon) -> None:
    with fresh.http() as http:
        r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert {
        "sandboxd_processes",
        "sandboxd_process_spawns",
        "sandboxd_process_spawn_failures",
        "sandboxd_process_spawn_seconds",
        "sandboxd_process_exits",
        "sandboxd_oom_kills",
        "sandboxd_output_bytes_captured",
        "sandboxd_output_bytes_dropped",
        "sandboxd_active_followers",
        "sandboxd_active_websockets",
        "sandboxd_pty_sessions",
        "sandboxd_http_requests",
        "sandboxd_http_request_duration_seconds",
        "sandboxd_build_info",
        "process_resident_memory_bytes",
    } <= names
    assert "_created" not in r.text


def test_openmetrics_on_request(fresh: Daemon) -> None:
    with fresh.http() as http:
        r = http.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")


def test_metrics_need_the_token(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(token="metrics-token")
    assert httpx.get(f"{d.url}/metrics").status_code == 401
    bad = {"Authorization": "Bearer nope"}
    assert httpx.get(f"{d.url}/metrics", headers=bad).status_code == 401
    assert scrape(d)  # with the token
    assert (
        value(
            scrape(d), "sandboxd_http_requests_total", method="GET", route="/metrics", status="401"
        )
        == 2
    )


def test_spawns_latency_failures_and_exits(fresh: Daemon) -> None:
    sbx = fresh.sandbox()
    assert sbx.run("sh", args=["-c", "exit 0"]).exit_code == 0
    assert sbx.run("sh", args=["-c", "exit 3"]).exit_code == 3
    assert sbx.run("sh", args=["-c", "kill -TERM $$"]).reason == "signaled"
    assert sbx.run("sleep", args=["5"], timeout=0.3).reason == "timed_out"
    with pytest.raises(Exception, match="COMMAND_NOT_FOUND"):
        sbx.run("no-such-command-xyz")
    m = scrape(fresh)
    assert value(m, "sandboxd_process_spawns_total") == 4
    assert value(m, "sandboxd_process_spawn_seconds_count") == 4
    assert 0 < value(m, "sandboxd_process_spawn_seconds_sum") < 4
    assert value(m, "sandboxd_process_spawn_failures_total", code="COMMAND_NOT_FOUND") == 1
    assert value(m, "sandboxd_process_exits_total", reason="exited") == 2
    assert value(m, "sandboxd_process_exits_total", reason="signaled") == 1
    assert value(m, "sandboxd_process_exits_total", reason="timed_out") == 1
    assert value(m, "sandboxd_process_exits_total", reason="oom_killed") == 0
    assert value(m, "sandboxd_oom_kills_total") == 0


def test_processes_by_status(fresh: Daemon) -> None:
    sbx = fresh.sandbox()
    p = sbx.start_process("sleep", args=["30"])
    sbx.run("true")
    m = scrape(fresh)
    assert value(m, "sandboxd_processes", status="running") == 1
    assert value(m, "sandboxd_processes", status="exited") == 1
    sbx.kill_process(p.pid)
    m = scrape(fresh)
    assert value(m, "sandboxd_processes", status="running") == 0
    assert value(m, "sandboxd_processes", status="signaled") == 1


def test_output_bytes_captured_dropped_and_kept_after_eviction(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon("--output-cap", "4K", "--max-records", "2")
    sbx = d.sandbox()
    sbx.run("sh", args=["-c", "head -c 10000 /dev/zero | tr '\\0' x; head -c 300 /dev/zero >&2"])
    m = scrape(d)
    assert value(m, "sandboxd_output_bytes_captured_total", stream="stdout") == 10000
    assert value(m, "sandboxd_output_bytes_captured_total", stream="stderr") == 300
    dropped = value(m, "sandboxd_output_bytes_dropped_total", stream="stdout")
    assert 10000 - 4096 <= dropped <= 10000  # whole chunks are dropped
    # Evict that record: the counters must not go down.
    for _ in range(4):
        sbx.run("sh", args=["-c", "printf 12345"])
    with d.http() as http:
        assert len(http.get("/api/v1/processes").json()["processes"]) <= 2
    m = scrape(d)
    assert value(m, "sandboxd_output_bytes_captured_total", stream="stdout") == 10000 + 4 * 5
    assert value(m, "sandboxd_output_bytes_dropped_total", stream="stdout") == dropped


def test_http_requests_by_route_template_never_raw_path(fresh: Daemon) -> None:
    with fresh.http() as http:
        assert http.get("/api/v1/processes/424242").status_code == 404
        assert http.get("/api/v1/processes/some-name/stdout").status_code == 404
        assert http.get("/no/such/route/xyz").status_code == 404
        assert http.get("/api/v1/health").status_code == 200
        r = http.get("/metrics")
    m = scrape(fresh)
    assert (
        value(
            m,
            "sandboxd_http_requests_total",
            method="GET",
            route="/api/v1/processes/{p}",
            status="404",
        )
        == 1
    )
    assert (
        value(
            m,
            "sandboxd_http_requests_total",
            method="GET",
            route="/api/v1/processes/{p}/{stream}",
            status="404",
        )
        == 1
    )
    assert (
        value(m, "sandboxd_http_requests_total", method="GET", route="unmatched", status="404") == 1
    )
    # The fixture polled /health while the daemon came up: at least our one.
    health = value(
        m, "sandboxd_http_requests_total", method="GET", route="/api/v1/health", status="200"
    )
    assert health >= 1
    assert (
        value(
            m,
            "sandboxd_http_request_duration_seconds_count",
            method="GET",
            route="/api/v1/health",
        )
        == health
    )
    for raw in ("424242", "some-name", "/no/such", "xyz"):
        assert raw not in r.text


def _gauge_reaches(d: Daemon, name: str, kind: str, want: float) -> None:
    wait_for(lambda: value(scrape(d), name, kind=kind) == want, timeout=10)


def test_active_followers_follow_and_run(fresh: Daemon) -> None:
    sbx = fresh.sandbox()
    p = sbx.start_process("sleep", args=["30"])
    done = threading.Event()

    def follow() -> None:
        with (
            fresh.http() as http,
            http.stream("GET", f"/api/v1/processes/{p.pid}/output/follow") as r,
        ):
            for _ in r.iter_bytes():
                if done.is_set():
                    break

    def run() -> None:
        sbx.run("sh", args=["-c", "sleep 1.5"])

    threads = [threading.Thread(target=follow), threading.Thread(target=run)]
    for t in threads:
        t.start()
    try:
        _gauge_reaches(fresh, "sandboxd_active_followers", "follow", 1)
        _gauge_reaches(fresh, "sandboxd_active_followers", "run", 1)
        _gauge_reaches(fresh, "sandboxd_active_followers", "run", 0)  # the run ended by itself
    finally:
        done.set()
        sbx.kill_process(p.pid)  # ends the follow with eof
        for t in threads:
            t.join(10)
    _gauge_reaches(fresh, "sandboxd_active_followers", "follow", 0)


def test_pty_sessions_and_websockets(fresh: Daemon) -> None:
    with fresh.http() as http:
        r = http.post(
            "/api/v1/pty", json={"command": "sleep", "args": ["30"], "rows": 24, "cols": 80}
        )
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
        assert value(scrape(fresh), "sandboxd_pty_sessions") == 1
        assert http.delete(f"/api/v1/pty/{sid}").status_code == 204
    wait_for(lambda: value(scrape(fresh), "sandboxd_pty_sessions") == 0)


def test_oom_kills_counted(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon("--process-memory-limit", "64M")
    with d.http() as http:
        cgroups = http.get("/api/v1/info").json()["cgroups"]
    if "memory=" not in cgroups:
        skip_with_reason(f"no memory cgroup controller on this machine ({cgroups})")
    hog = ["-c", "x = bytearray(256 << 20); x[::4096] = b'x' * len(x[::4096])"]
    assert d.sandbox().run("python3", args=hog).reason == "oom_killed"
    m = scrape(d)
    assert value(m, "sandboxd_oom_kills_total") == 1
    assert value(m, "sandboxd_process_exits_total", reason="oom_killed") == 1
    assert value(m, "sandboxd_processes", status="oom_killed") == 1


def test_scrape_is_fast_with_many_records(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon()
    sbx = d.sandbox()
    for _ in range(50):
        sbx.start_process("true")
    t0 = time.monotonic()
    scrape(d)
    assert time.monotonic() - t0 < 1.0
