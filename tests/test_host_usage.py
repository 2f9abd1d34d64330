"""Per-sandbox usage against a real host: ``GET .../usage``, ``/metrics`` and ``sbx describe``.

A host with sandbox networking (the router and fake internet of
``test_host_network.py``'s ``lab`` fixture, so a sandbox has a veth whose
counters move), sampling every 0.3 s. A process in the sandbox burns CPU,
allocates memory, writes to its disk and sends bytes; each figure is waited on
until it moved by at least that much. ``/metrics`` is read with
prometheus_client's parser: the series exist while the sandbox lives and are
gone once it ended. Root in the sandbox cannot reset what is measured.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .cli_helpers import cli
from .conftest import wait_for
from .test_host import NS, Host, start_host
from .test_host_network import INET_ADDRS, SERVE_PORT, Lab, _terminate_all, lab  # noqa: F401

KEYS = {
    "cpu_usec",
    "memory_bytes",
    "memory_peak_bytes",
    "memory_limit_bytes",
    "disk_used_bytes",
    "disk_limit_bytes",
    "net_rx_bytes",
    "net_tx_bytes",
}
MiB = 1 << 20


@pytest.fixture(scope="module")
def host(lab: Lab) -> Iterator[Host]:  # noqa: F811
    args = ["--net-router", lab.router, "--net-subnet", "10.93.0.0/24"]
    h = start_host(
        lab.root / "u", warm=0, extra_args=args, env={"SANDBOXD_HOST_USAGE_INTERVAL_S": "0.3"}
    )
    assert "network: routed veth" in h.log(), h.log()
    yield h
    _terminate_all(h)
    h.stop()


def usage(c: httpx.Client, sid: str) -> dict[str, Any]:
    r = c.get(f"{NS}/{sid}/usage")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def current(c: httpx.Client, sid: str) -> dict[str, Any]:
    cur: dict[str, Any] = usage(c, sid)["current"]
    return cur


def metrics(url: str) -> dict[tuple[str, str], float]:
    """(sample name, sandbox id) → value of the per-sandbox series."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "sandbox_id" in s.labels:
                assert s.labels["namespace"] == "default"
                out[(s.name, s.labels["sandbox_id"])] = s.value
    return out


def test_usage_moves_with_cpu_memory_disk_and_network(host: Host) -> None:
    from tensorlake.sandbox import Sandbox

    sbx = Sandbox.create(api_url=host.url, api_key=None, memory_mb=512, disk_mb=1024)
    sid = sbx.sandbox_id
    try:
        with host.http() as c:
            body = usage(c, sid)
            assert set(body) == {"sandbox_id", "current", "samples"} and body["sandbox_id"] == sid
            before = body["current"]
            assert set(before) == KEYS
            assert all(isinstance(before[k], int) for k in KEYS), before
            # The cgroup's limit: memory_mb and the sandbox daemon's reserve.
            assert 512 * MiB <= before["memory_limit_bytes"] <= 1024 * MiB
            assert 900 * MiB <= before["disk_limit_bytes"] <= 1024 * MiB
            assert (
                before["memory_bytes"] > 0 and before["memory_peak_bytes"] >= before["memory_bytes"]
            )

            # CPU: one second of it, measured by the process itself.
            burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1: pass"
            assert sbx.run("python3", args=["-c", burn]).exit_code == 0
            wait_for(
                lambda: current(c, sid)["cpu_usec"] - before["cpu_usec"] >= 900_000, timeout=10
            )

            # Memory: 200 MiB held by a process that stays.
            hold = "b = bytearray(200 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
            hold += "import time\ntime.sleep(600)"
            p = sbx.start_process("python3", args=["-c", hold])
            grew = lambda: current(c, sid)["memory_bytes"] - before["memory_bytes"] >= 180 * MiB  # noqa: E731
            wait_for(grew, timeout=20)
            sbx.kill_process(p.pid)
            wait_for(lambda: not grew(), timeout=20)
            after = current(c, sid)
            assert after["memory_peak_bytes"] - before["memory_bytes"] >= 180 * MiB, after

            # Disk: 64 MiB written to the sandbox's own disk.
            write = "dd if=/dev/urandom of=/root/blob bs=1M count=64 conv=fsync 2>/dev/null"
            assert sbx.run("sh", args=["-c", write]).exit_code == 0
            assert current(c, sid)["disk_used_bytes"] - before["disk_used_bytes"] >= 60 * MiB

            # Network: 4 MB of UDP out, and a TCP exchange with the fake internet's server.
            send = (
                "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                f"for _ in range(4000): s.sendto(b'x' * 1000, ('{INET_ADDRS[0]}', 9))\n"
                f"t = socket.create_connection(('{INET_ADDRS[0]}', {SERVE_PORT}), timeout=5)\n"
                "print(t.recv(64))"
            )
            r = sbx.run("python3", args=["-c", send])
            assert r.exit_code == 0, r.stderr
            wait_for(lambda: current(c, sid)["net_tx_bytes"] - before["net_tx_bytes"] >= 4_000_000, timeout=10)  # fmt: skip
            assert current(c, sid)["net_rx_bytes"] > before["net_rx_bytes"]

            # The series: samples from the host's task, oldest first, the same keys.
            def sampled() -> bool:
                return len(usage(c, sid)["samples"]) >= 3

            wait_for(sampled, timeout=10)
            samples = usage(c, sid)["samples"]
            assert all(set(s) == KEYS | {"at"} for s in samples)
            ats = [s["at"] for s in samples]
            assert ats == sorted(ats) and len(set(ats)) == len(ats)
            assert samples[-1]["cpu_usec"] >= before["cpu_usec"] + 900_000

            # /metrics: labelled by sandbox and namespace while it lives.
            def exported() -> bool:
                m = metrics(host.url)
                return m.get(("sandboxd_host_sandbox_network_transmit_bytes_total", sid), 0) >= 4e6

            wait_for(exported, timeout=10)
            m = metrics(host.url)
            assert m[("sandboxd_host_sandbox_cpu_seconds_total", sid)] >= 0.9
            assert m[("sandboxd_host_sandbox_memory_peak_bytes", sid)] >= 180 * MiB
            assert m[("sandboxd_host_sandbox_memory_limit_bytes", sid)] >= 512 * MiB
            assert m[("sandboxd_host_sandbox_disk_used_bytes", sid)] >= 60 * MiB

            # sbx describe shows the figures.
            out = cli(None, "sbx", "describe", sid, env={"SANDBOXD_URL": host.url}, timeout=60)
            assert out.returncode == 0, out.stderr
            assert "usage.memory_peak_bytes" in out.stdout and "usage.cpu_usec" in out.stdout
            js = cli(None, "sbx", "describe", sid, "--json", env={"SANDBOXD_URL": host.url})
            assert set(json.loads(js.stdout)["usage"]) == KEYS
    finally:
        sbx.terminate()

    with host.http() as c:
        r = c.get(f"{NS}/{sid}/usage")
        assert r.status_code == 409 and r.json()["code"] == "SANDBOX_ENDED", r.text
        r = c.get(f"{NS}/sbx-0000000000000000/usage")
        assert r.status_code == 404 and r.json()["code"] == "SANDBOX_NOT_FOUND", r.text
    # Its series end with it: no per-sandbox series outlives a sandbox.
    assert not [k for k in metrics(host.url) if k[1] == sid]


def test_root_in_the_sandbox_cannot_reset_what_is_measured(host: Host) -> None:
    from tensorlake.sandbox import Sandbox

    sbx = Sandbox.create(api_url=host.url, api_key=None, memory_mb=512)
    try:
        hog = "b = bytearray(150 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1"
        assert sbx.run("python3", args=["-c", hog]).exit_code == 0
        with host.http() as c:
            peak = current(c, sbx.sandbox_id)["memory_peak_bytes"]
            cpu = current(c, sbx.sandbox_id)["cpu_usec"]
            assert peak >= 150 * MiB
            # v1 resets the peak on a write, v2 takes a reset too: both are the host's files.
            attack = (
                "for f in /sys/fs/cgroup/memory/memory.max_usage_in_bytes "
                "/sys/fs/cgroup/unified/memory.peak /sys/fs/cgroup/memory.peak; do "
                "[ -e $f ] && { echo 0 > $f && echo WROTE $f; }; done; "
                "echo 0 > /sys/fs/cgroup/unified/cpu.stat && echo WROTE cpu; true"
            )
            r = sbx.run("sh", args=["-c", attack], user="root")
            assert "WROTE" not in r.stdout, r.stdout
            assert current(c, sbx.sandbox_id)["memory_peak_bytes"] >= peak
            assert current(c, sbx.sandbox_id)["cpu_usec"] >= cpu
    finally:
        sbx.terminate()


def test_a_gvisor_sandbox_is_measured_too_and_loopback_only_has_no_network_figures(
    lab: Lab,  # noqa: F811
) -> None:
    """runsc runs in the sandbox's cgroups: CPU and memory of its Sentry are the sandbox's."""
    from tensorlake.sandbox import Sandbox

    from sandboxd.host.runtime import gvisor

    assert gvisor.runsc_path() is not None, "runsc is not installed (make host-deps)"
    h = start_host(
        lab.root / "g",
        warm=0,
        extra_args=["--no-net", "--runtime", "gvisor"],
        env={"SANDBOXD_HOST_USAGE_INTERVAL_S": "0.3"},
    )
    try:
        sbx = Sandbox.create(api_url=h.url, api_key=None, memory_mb=512)
        try:
            with h.http() as c:
                before = current(c, sbx.sandbox_id)
                assert before["net_rx_bytes"] is None and before["net_tx_bytes"] is None
                assert before["memory_bytes"] > 0 and before["memory_limit_bytes"] >= 512 * MiB
                burn = (
                    "import time\nt = time.process_time()\nwhile time.process_time() - t < 1: pass"
                )
                assert sbx.run("python3", args=["-c", burn]).exit_code == 0
                cpu = current(c, sbx.sandbox_id)["cpu_usec"] - before["cpu_usec"]
                # The Sentry's clock for its guest is not the host's: most of it shows.
                assert cpu >= 500_000, cpu
                wait_for(lambda: len(usage(c, sbx.sandbox_id)["samples"]) >= 2, timeout=10)
                assert (
                    "sandboxd_host_sandbox_cpu_seconds_total",
                    sbx.sandbox_id,
                ) in metrics(h.url)
        finally:
            sbx.terminate()
    finally:
        _terminate_all(h)
        h.stop()
