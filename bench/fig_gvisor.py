"""What gVisor costs (``sandboxd host --runtime gvisor``), next to the default runtime.

Each row is measured on a bubblewrap host and two gVisor hosts started side by
side (``--warm 0 --no-net``: a cold create, loopback only), with the official
SDK in this process: gVisor on its own network stack (netstack, the default)
and on the host's stack in the sandbox's netns (``SANDBOXD_HOST_GVISOR_NETWORK=host``).
The samples of the three hosts alternate, so they share the machine's minutes.

- ``gvisor_create_cold``: ``Sandbox.create()`` until ``run("echo")`` returned:
  mostly the sandbox's daemon starting (Python imports) under the runtime.
- ``gvisor_syscalls``: one syscall-heavy command, ``dd bs=1`` copying
  ``SYSCALL_BYTES`` bytes (two system calls a byte), timed around ``run()``.
- ``gvisor_file_up`` / ``gvisor_file_down``: ``write_file`` / ``read_file`` of
  ``FILE_MB`` MiB: every byte through the host's proxy and the sandbox's daemon
  (over the private link under netstack).
- ``gvisor_tunnel_rtt``: one byte there and back through ``create_tunnel`` to an
  echo server inside, on an open connection (median of ``ECHOES``).

gVisor runs on its ptrace platform here (the only one that works on this
machine; see docs/gvisor.md for systrap and KVM on real hosts).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    PYTHON,
    Ref,
    Row,
    all_cpus,
    free_port,
    median,
    not_measured,
    percentile,
    stop_process,
)
from ctx import Ctx
from fig_host import host_unavailable

NS = "/v1/namespaces/default/sandboxes"
KEYS = [
    "gvisor_create_cold",
    "gvisor_syscalls",
    "gvisor_file_up",
    "gvisor_file_down",
    "gvisor_tunnel_rtt",
]
IMAGES = Path(__file__).resolve().parent.parent / "build" / "images"
SYSCALL_BYTES = 20_000
DD = f"dd if=/dev/zero of=/dev/null bs=1 count={SYSCALL_BYTES} 2>/dev/null"
FILE_MB = 64
ECHOES = 30
ECHO_PORT = 7100
# An echo server on poll(2) (a server on epoll could not be memory-snapshotted).
ECHO = (
    "import socket, sys\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(8)\n"
    "while True:\n"
    "    c, _ = s.accept()\n"
    "    while (b := c.recv(65536)):\n"
    "        c.sendall(b)\n"
    "    c.close()\n"
)
# The three hosts of a run: (name, runtime, SANDBOXD_HOST_GVISOR_NETWORK or None).
HOSTS = [
    ("bwrap", "bwrap", None),
    ("netstack", "gvisor", "sandbox"),
    ("hostinet", "gvisor", "host"),
]


class Host:
    def __init__(self, runtime: str, env: dict[str, str] | None = None) -> None:
        self.state = Path(tempfile.mkdtemp(prefix="sbgb", dir="/tmp"))
        self.state.chmod(0o711)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = [PYTHON, "-m", "sandboxd", "host", "--port", str(port), "--warm", "0"]
        argv += ["--state-dir", str(self.state / "s"), "--log-level", "warning"]
        argv += ["--images", str(IMAGES), "--no-net", "--runtime", runtime]
        self.proc = subprocess.Popen(
            argv,
            env={**os.environ, **(env or {})},
            preexec_fn=all_cpus,
        )
        import httpx

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sandboxd host --runtime {runtime} exited")
            try:
                if httpx.get(self.url + NS, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"sandboxd host --runtime {runtime} did not start")

    def close(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.state, ignore_errors=True)


def _echo_rtt(sbx: Any) -> float:
    """Median ms of one byte there and back through the SDK's tunnel, on one connection."""
    import socket

    sbx.start_process("python3", args=["-c", ECHO, str(ECHO_PORT)])
    deadline = time.monotonic() + 60
    with sbx.create_tunnel(ECHO_PORT, local_port=0) as tunnel:
        while True:
            try:
                with socket.create_connection(("127.0.0.1", tunnel.local_port), 10) as c:
                    c.settimeout(10)
                    c.sendall(b"x")
                    if c.recv(1) != b"x":
                        raise OSError("no echo")
                    times = []
                    for _ in range(ECHOES):
                        t0 = time.perf_counter()
                        c.sendall(b"x")
                        if c.recv(1) != b"x":
                            raise RuntimeError("the echo through the tunnel went wrong")
                        times.append((time.perf_counter() - t0) * 1000)
                    return median(times)
            except OSError:
                # The server inside is still starting (Python under ptrace: about 2 s).
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def _sample(url: str) -> tuple[float, float, float, float, float]:
    """(create → first command, the syscall-heavy command, upload, download, echo), in ms."""
    from tensorlake.sandbox import Sandbox

    t0 = time.perf_counter()
    sbx: Any = Sandbox.create(api_url=url, api_key=None, memory_mb=512)
    try:
        sbx.run("echo", args=["x"])
        first = (time.perf_counter() - t0) * 1000
        t1 = time.perf_counter()
        r = sbx.run("sh", args=["-c", DD])
        heavy = (time.perf_counter() - t1) * 1000
        if r.exit_code != 0:
            raise RuntimeError(f"dd failed in the sandbox: {r.stderr}")
        body = os.urandom(FILE_MB << 20)
        t2 = time.perf_counter()
        sbx.write_file("/root/blob.bin", body)
        up = (time.perf_counter() - t2) * 1000
        t3 = time.perf_counter()
        back = sbx.read_file("/root/blob.bin").value
        down = (time.perf_counter() - t3) * 1000
        if back != body:
            raise RuntimeError("the file read back differs from the one written")
        rtt = _echo_rtt(sbx)
    finally:
        sbx.terminate()
    return first, heavy, up, down, rtt


def measure(ctx: Ctx) -> list[Row]:
    from sandboxd.host.runtime import gvisor

    why = host_unavailable() or gvisor.available(Path("/tmp"))
    if why:
        return [not_measured(k, k, "ms", "", why) for k in KEYS]
    n = ctx.n(5, 2)
    hosts: dict[str, Host] = {}
    results: dict[str, list[tuple[float, ...]]] = {name: [] for name, _, _ in HOSTS}
    try:
        for name, runtime, net in HOSTS:
            hosts[name] = Host(runtime, {gvisor.NETWORK_ENV: net} if net else None)
        for i in range(n):  # interleaved: each host's samples in the same minutes
            for name, _, _ in HOSTS:
                results[name].append(_sample(hosts[name].url))
            ctx.log(f"gvisor figure: round {i + 1}/{n} done")
    finally:
        for h in hosts.values():
            h.close()
    platform = gvisor.DEFAULT_PLATFORM
    rows = []
    specs = (
        (
            "gvisor_create_cold",
            f"gVisor ({platform}): create → first command, no spare",
            "sandboxd host --runtime gvisor --warm 0; the daemon's Python start-up runs "
            "under the Sentry; with --warm (the default 1) a spare hides it",
        ),
        (
            "gvisor_syscalls",
            f"gVisor ({platform}): a syscall-heavy command ({2 * SYSCALL_BYTES} syscalls)",
            f"`{DD}` timed around the SDK's run(); most of it is the ptrace platform's "
            "cost per system call",
        ),
        (
            "gvisor_file_up",
            f"gVisor ({platform}): write_file of {FILE_MB} MiB",
            "through the host's proxy to the sandbox's daemon",
        ),
        (
            "gvisor_file_down",
            f"gVisor ({platform}): read_file of {FILE_MB} MiB",
            "through the host's proxy from the sandbox's daemon",
        ),
        (
            "gvisor_tunnel_rtt",
            f"gVisor ({platform}): one byte there and back through create_tunnel",
            f"median of {ECHOES} on one open connection to an echo server inside",
        ),
    )
    for i, (key, figure, note) in enumerate(specs):
        gv = [s[i] for s in results["netstack"]]
        hi = [s[i] for s in results["hostinet"]]
        bw = [s[i] for s in results["bwrap"]]
        p50 = median(gv)
        refs = [
            Ref(f"gVisor, {gvisor.NETWORK_ENV}=host", median(hi), "ms", _ratio(p50, median(hi))),
            Ref("bubblewrap (default runtime)", median(bw), "ms", _ratio(p50, median(bw))),
        ]
        rows.append(
            Row(
                key,
                figure + " (netstack, the default)",
                "ms",
                p50,
                p99=percentile(gv, 99),
                refs=refs,
                note=note,
                samples=len(gv),
                detail={"netstack_ms": gv, "hostinet_ms": hi, "bwrap_ms": bw},
            )
        )
    return rows


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def profile(ctx: Ctx, key: str) -> bool:
    return False  # no goal: a cost to know, not a target
