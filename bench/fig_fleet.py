"""A fleet of hosts (issue 19): the gateway's overhead, creates per second, a lost node.

A three-member etcd on loopback (Debian's ``etcd-server``), three
``sandboxd host --cluster`` nodes (``--warm 0 --no-net``, lease TTL 2 s) and a
``sandboxd gateway``, next to a lone ``sandboxd host`` (no ``--cluster``) on
the same image store. Four rows:

- ``fleet_create``: the official SDK's ``Sandbox.create()`` until
  ``run("echo")`` returned, through the gateway (placed on a node, every
  later call forwarded to it), against the same on the lone host,
  interleaved.
- ``fleet_creates_1`` and ``fleet_creates_3``: creates per second through the
  gateway, :data:`BURST` cold creates (``wait``: answered once running; no
  warm spares) :data:`AT_ONCE` at a time, with one node taking placements (the
  other two drained) and with all three; each against the same burst on the
  lone host, in the same run. All on one machine: three nodes share its cores,
  so the ratio shows the fleet's overhead more than its scaling.
- ``fleet_node_lost``: SIGKILL a node's host process with a sandbox on it,
  until the gateway reports that sandbox ``terminated`` with
  ``node_lost``; the reference is the same kill until etcd deleted the node's
  key (its lease ran out), read in the same poll: a front reports a sandbox
  of a node without a key as lost at once (its sweep rewrites the record
  within TTL/4).
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from common import PYTHON, Ref, Row, all_cpus, free_port, median, not_measured, stop_process
from ctx import Ctx

KEYS = ["fleet_create", "fleet_creates_1", "fleet_creates_3", "fleet_node_lost"]
NS = "/v1/namespaces/default/sandboxes"
IMAGES = Path(__file__).resolve().parent.parent / "build" / "images"
ETCD = shutil.which("etcd") or "/usr/bin/etcd"
TTL = 2  # the shortest --lease-ttl a node takes
BURST, AT_ONCE = 24, 6  # creates per burst, and how many in flight at once
NODES = ("n1", "n2", "n3")


def _wait(check: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError, ConnectionError, _http_error()):
            if check():  # type: ignore[operator]
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not within {timeout:.0f} s")


def _http_error() -> type[Exception]:
    import httpx

    return httpx.HTTPError


class Etcd:
    """Three etcd members on loopback, their data in ``root``."""

    def __init__(self, root: Path) -> None:
        ports = [free_port() for _ in range(6)]
        self.client, peer = ports[:3], ports[3:]
        cluster = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, p in enumerate(peer))
        self.procs: list[subprocess.Popen[bytes]] = []
        for i in range(3):
            url = f"http://127.0.0.1:{self.client[i]}"
            argv = [ETCD, "--name", f"m{i}", "--data-dir", str(root / f"m{i}")]
            argv += ["--listen-client-urls", url, "--advertise-client-urls", url]
            argv += ["--listen-peer-urls", f"http://127.0.0.1:{peer[i]}"]
            argv += ["--initial-advertise-peer-urls", f"http://127.0.0.1:{peer[i]}"]
            argv += ["--initial-cluster", cluster, "--initial-cluster-state", "new"]
            argv += ["--heartbeat-interval", "50", "--election-timeout", "500"]
            argv += ["--log-level", "error", "--logger", "zap"]
            with open(root / f"m{i}.log", "ab") as log:
                self.procs.append(
                    subprocess.Popen(argv, stdout=log, stderr=log, preexec_fn=all_cpus)
                )
        self.url = "etcd://" + ",".join(f"127.0.0.1:{p}" for p in self.client)
        _wait(lambda: self.has_key("/sandboxd/none") is False, "etcd health")

    def has_key(self, key: str) -> bool:
        """Through etcd's JSON gateway (v3): is ``key`` there now?"""
        import httpx

        body = {"key": base64.b64encode(key.encode()).decode(), "count_only": True}
        r = httpx.post(f"http://127.0.0.1:{self.client[0]}/v3/kv/range", json=body, timeout=2)
        r.raise_for_status()
        return int(r.json().get("count", 0)) > 0

    def put(self, key: str, value: bytes | None) -> None:
        """Through the JSON gateway: ``key`` set to ``value``, or deleted (None)."""
        import httpx

        k = base64.b64encode(key.encode()).decode()
        base = f"http://127.0.0.1:{self.client[0]}/v3/kv/"
        if value is None:
            r = httpx.post(base + "deleterange", json={"key": k}, timeout=5)
        else:
            body = {"key": k, "value": base64.b64encode(value).decode()}
            r = httpx.post(base + "put", json=body, timeout=5)
        r.raise_for_status()

    def close(self) -> None:
        for p in self.procs:
            stop_process(p)


class Proc:
    """A ``sandboxd`` process on a free port, answering ``/health``."""

    def __init__(self, argv: list[str], log: Path, port: int | None = None) -> None:
        import httpx

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [*argv, "--port", str(self.port)]
        self.log = log
        self.start()

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sandboxd {argv[0]} exited: {log.read_text()[-800:]}")
            return httpx.get(self.url + "/health", timeout=1).status_code == 200

        _wait(up, f"sandboxd {argv[0]} answering /health")

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "sandboxd", *self.argv], stdout=out, stderr=out, preexec_fn=all_cpus
            )

    def close(self) -> None:
        stop_process(self.proc)


def _host_argv(state: Path, extra: list[str]) -> list[str]:
    state.mkdir(parents=True)
    state.chmod(0o711)  # the sandboxes' uid reaches its root through it
    argv = ["host", "--warm", "0", "--no-net", "--no-build-default", "--log-level", "warning"]
    return [*argv, "--state-dir", str(state / "s"), "--images", str(IMAGES), *extra]


def _node(work: Path, name: str, etcd: Etcd) -> Proc:
    port = free_port()
    extra = ["--cluster", etcd.url, "--node", name, "--lease-ttl", str(TTL)]
    extra += ["--advertise", f"http://127.0.0.1:{port}", "--restart-grace", "0"]
    # A burst fits on one node (a create in flight may count twice until it answers:
    # its reservation and its record; placement.rooms).
    extra += ["--slots", str(2 * BURST)]
    return Proc(_host_argv(work / name, extra), work / f"{name}.log", port)


def _create(url: str) -> tuple[float, str]:
    """Create → first command through the SDK, in ms, and the sandbox's id."""
    from tensorlake.sandbox import Sandbox

    t0 = time.perf_counter()
    sbx = Sandbox.create(api_url=url, api_key=None, memory_mb=128)
    r = sbx.run("echo", args=["x"])
    took = (time.perf_counter() - t0) * 1000
    if r.exit_code != 0 or r.stdout.strip() != "x":
        raise RuntimeError(f"echo gave {r.exit_code}: {r.stdout!r} {r.stderr!r}")
    return took, sbx.sandbox_id


def _terminate(url: str, sid: str) -> None:
    import httpx

    httpx.delete(f"{url}{NS}/{sid}", timeout=30)


def _burst(url: str) -> float:
    """BURST creates, AT_ONCE at a time, each answered once running: creates per second.

    Every sandbox made is terminated after (not timed), also when some failed.
    """
    import concurrent.futures

    import httpx

    body = {"resources": {"cpus": 1.0, "memory_mb": 128}}
    with httpx.Client(timeout=120) as c, concurrent.futures.ThreadPoolExecutor(AT_ONCE) as pool:
        t0 = time.perf_counter()
        answers = list(pool.map(lambda _: c.post(url + NS, json=body), range(BURST)))
        took = time.perf_counter() - t0
        made = [r.json()["sandbox_id"] for r in answers if r.status_code == 200]
        list(pool.map(lambda sid: _terminate(url, sid), made))
    failed = [r.text[:300] for r in answers if r.status_code != 200]
    if failed:
        raise RuntimeError(f"{len(failed)} of {BURST} creates failed: {failed[0]}")
    return BURST / took


def _drained(etcd: Etcd, nodes: tuple[str, ...]) -> None:
    """Only the nodes not in ``nodes`` take placements (``sandboxd host drain``'s key)."""
    for n in NODES:
        etcd.put(f"/sandboxd/drain/{n}", b'{"since":0}' if n in nodes else None)


def measure(ctx: Ctx) -> list[Row]:
    why = None
    if os.geteuid() != 0:
        why = "needs root"
    elif not os.path.exists(ETCD):
        why = "etcd is not installed (apt-get install etcd-server; make host-deps)"
    elif not (IMAGES / "default" / "image.json").exists():
        why = f"no default image in {IMAGES} (make image)"
    if why:
        print(f"fleet figure skipped: {why}", flush=True)
        return [not_measured(k, k, "", "", why) for k in KEYS]
    work = Path(tempfile.mkdtemp(prefix="sbfl", dir="/tmp"))
    work.chmod(0o711)  # the sandboxes' uid reaches the hosts' state dirs through it
    try:
        return _measure(ctx, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(ctx: Ctx, work: Path) -> list[Row]:
    import httpx

    t0 = time.perf_counter()
    etcd = Etcd(work)
    procs: list[Proc] = []
    try:
        lone = Proc(_host_argv(work / "lone", []), work / "lone.log")
        procs.append(lone)
        nodes = {n: _node(work, n, etcd) for n in NODES}
        procs += nodes.values()
        gw = Proc(["gateway", "--cluster", etcd.url, "--lease-ttl", str(TTL)], work / "gw.log")
        procs.append(gw)
        _wait(lambda: all(etcd.has_key(f"/sandboxd/nodes/{n}") for n in nodes), "nodes joined")
        took = time.perf_counter() - t0
        ctx.log(f"fleet figure: etcd, three nodes, a gateway and a lone host up in {took:.0f} s")
        via_gw: list[float] = []
        alone: list[float] = []
        for i in range(ctx.n(7, 3)):
            for side in ("gw", "lone") if i % 2 == 0 else ("lone", "gw"):
                url = gw.url if side == "gw" else lone.url
                took, sid = _create(url)
                (via_gw if side == "gw" else alone).append(took)
                _terminate(url, sid)
        # Creates per second: one node, three nodes, the lone host, in turns.
        rates: dict[str, list[float]] = {"one": [], "three": [], "lone": []}
        for _ in range(ctx.n(2, 1)):
            for side in ("one", "lone", "three", "lone"):
                if side == "lone":
                    rates[side].append(_burst(lone.url))
                    continue
                _drained(etcd, NODES[1:] if side == "one" else ())
                # The last burst's ends published (each node's mirror): its slots are free.
                _wait(lambda: not httpx.get(gw.url + NS, timeout=10).json()["sandboxes"], "ends")
                rates[side].append(_burst(gw.url))
        _drained(etcd, ())
        ctx.log(f"fleet figure: creates per second {rates}")
        # Node loss: a sandbox on n2, then n2's host SIGKILLed; polled every 10 ms.
        seen: list[float] = []
        lease: list[float] = []
        for _ in range(ctx.n(3, 1)):
            _, sid = _create(gw.url)
            where = httpx.get(f"{gw.url}{NS}/{sid}", timeout=10).json()["node"]
            node = nodes[where]
            k0 = time.perf_counter()
            os.kill(node.proc.pid, signal.SIGKILL)
            node.proc.wait()
            key_gone = reported = None
            while reported is None and time.perf_counter() - k0 < TTL * 10:
                now = time.perf_counter()
                if key_gone is None and not etcd.has_key(f"/sandboxd/nodes/{where}"):
                    key_gone = now - k0
                got = httpx.get(f"{gw.url}{NS}/{sid}", timeout=5).json()
                if got.get("termination_reason") == "node_lost":
                    reported = now - k0
                    key_gone = key_gone if key_gone is not None else reported
                time.sleep(0.01)
            if reported is None or key_gone is None:
                raise RuntimeError(f"node {where} was not reported lost within {TTL * 10} s")
            seen.append(reported)
            lease.append(key_gone)
            node.start()  # back: it removes the sandbox the fleet gave up on
            _wait(lambda where=where: etcd.has_key(f"/sandboxd/nodes/{where}"), "node back")
            _wait(
                lambda node=node, sid=sid: (
                    httpx.get(f"{node.url}{NS}/{sid}", timeout=2).json()["status"] == "terminated"
                ),
                "the lost sandbox removed",
            )
    finally:
        for p in procs:
            p.close()
        etcd.close()
    g50, l50 = median(via_gw), median(alone)
    one, three, lone_rate = median(rates["one"]), median(rates["three"]), median(rates["lone"])
    burst_note = (
        f"{BURST} creates through the gateway, {AT_ONCE} at a time, each answered once "
        "running (cold: no warm spares, --no-net, 128 MiB); the reference is the same burst "
        "on the lone host, in turns with it. One machine (its cores shared by every node): "
        "three nodes cannot create faster than the machine does, so this shows the fleet's "
        "cost per create, not scale-out"
    )
    s50, k50 = median(seen), median(lease)
    return [
        Row(
            "fleet_create",
            "create → first command through a fleet's gateway (a node on loopback)",
            "ms",
            g50,
            refs=[Ref("the same on a lone host", l50, "ms", g50 / l50)],
            note=(
                "official SDK, Sandbox.create() until run('echo') returned; the gateway reads "
                "the fleet and reserves room in etcd (three members), forwards the create, then "
                "every call of the SDK; interleaved with the lone host, same image store"
            ),
            samples=len(via_gw),
            detail={"gateway_ms": via_gw, "lone_ms": alone},
        ),
        Row(
            "fleet_creates_1",
            "creates per second through a fleet's gateway, one node taking placements",
            "creates/s",
            one,
            refs=[Ref("the same burst on a lone host", lone_rate, "creates/s", one / lone_rate)],
            note=burst_note + "; the other two nodes drained",
            samples=len(rates["one"]),
            detail={"rates": rates},
        ),
        Row(
            "fleet_creates_3",
            "creates per second through a fleet's gateway, three nodes",
            "creates/s",
            three,
            refs=[Ref("the same burst on a lone host", lone_rate, "creates/s", three / lone_rate)],
            note=burst_note + "; placed on the emptiest node each",
            samples=len(rates["three"]),
            detail={"rates": rates},
        ),
        Row(
            "fleet_node_lost",
            f"SIGKILL of a node → its sandbox reported node_lost (lease TTL {TTL} s)",
            "s",
            s50,
            refs=[Ref("etcd's lease expiry alone (node key gone)", k50, "s", s50 / k50)],
            note=(
                "polled every 10 ms through the gateway; the reference, read in the same poll, "
                "is when etcd deleted the node's key (the TTL less the time since the node's "
                "last renewal, every TTL/3). A front answers node_lost as soon as the key is "
                "gone (its sweep rewrites the record within TTL/4): a ratio of 1 means nothing "
                "of sandboxd's own is added. The default TTL is 10 s"
            ),
            samples=len(seen),
            detail={"reported_s": seen, "lease_s": lease},
        ),
    ]


def profile(ctx: Ctx, key: str) -> bool:
    del ctx, key
    return False  # no goal to miss
