"""A real three-member etcd cluster (Debian's ``etcd-server``) on loopback ports, for tests.

Each member has its own data dir, client port and peer port (free ports picked
by binding port 0), and is ended by its pid. ``kill(i)`` / ``restart(i)`` take
one member down and back, for the quorum tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


def missing() -> str | None:
    """Why the etcd tests cannot run here, or None."""
    if not os.path.exists(ETCD):
        return "etcd is not installed (apt-get install etcd-server etcd-client; `make host-deps`)"
    return None


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls(d: Path) -> TlsFiles:
    """A test CA, a member certificate for 127.0.0.1 and a client certificate (openssl)."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    for who, ext in (
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (d / f"{who}.ext").write_text(ext + "\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}",
            "-keyout", f"{who}.key", "-out", f"{who}.csr")  # fmt: skip
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{who}.ext", "-out", f"{who}.pem")  # fmt: skip
    return TlsFiles(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
                    d / "client.key")  # fmt: skip


@dataclass
class EtcdCluster:
    root: Path
    size: int = 3
    tls: TlsFiles | None = None
    client_ports: list[int] = field(default_factory=list)
    peer_ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes] | None] = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        scheme = "https" if self.tls else "http"
        return [f"{scheme}://127.0.0.1:{p}" for p in self.client_ports]

    @property
    def url(self) -> str:
        """The ``--cluster`` value: ``etcd://127.0.0.1:P0,127.0.0.1:P1,...``."""
        return "etcd://" + ",".join(f"127.0.0.1:{p}" for p in self.client_ports)

    def _argv(self, i: int, state: str) -> list[str]:
        peers = ",".join(f"m{j}=http://127.0.0.1:{p}" for j, p in enumerate(self.peer_ports))
        tls = self.tls
        client_tls = (
            ["--cert-file", str(tls.server_cert), "--key-file", str(tls.server_key),
             "--trusted-ca-file", str(tls.ca), "--client-cert-auth"]
            if tls else []
        )  # fmt: skip
        return [
            ETCD,
            "--name", f"m{i}",
            "--data-dir", str(self.root / f"m{i}"),
            "--listen-client-urls", self.endpoints[i],
            "--advertise-client-urls", self.endpoints[i],
            *client_tls,
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
            "--initial-cluster", peers,
            "--initial-cluster-state", state,
            "--initial-cluster-token", self.root.name,
            # Short elections: a lost member is noticed in well under a second.
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--log-level", "error",
            "--logger", "zap",
        ]  # fmt: skip

    def start(self) -> None:
        ports = free_ports(2 * self.size)
        self.client_ports, self.peer_ports = ports[: self.size], ports[self.size :]
        self.procs = [None] * self.size
        for i in range(self.size):
            self._spawn(i, "new")
        self.wait_healthy()

    def _spawn(self, i: int, state: str) -> None:
        log = open(self.root / f"m{i}.log", "ab")  # noqa: SIM115 (the child keeps it)
        self.procs[i] = subprocess.Popen(
            self._argv(i, state), stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        log.close()

    def health(self, endpoints: list[str] | None = None) -> bool:
        r = subprocess.run(
            [
                ETCDCTL,
                "--endpoints",
                ",".join(endpoints or self.endpoints),
                *self.ctl_tls(),
                "endpoint",
                "health",
            ],
            capture_output=True,
            env={**os.environ, "ETCDCTL_API": "3"},
            timeout=15,
        )
        return r.returncode == 0

    def ctl_tls(self) -> list[str]:
        t = self.tls
        if t is None:
            return []
        return ["--cacert", str(t.ca), "--cert", str(t.client_cert), "--key", str(t.client_key)]

    def wait_healthy(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        live = [e for e, p in zip(self.endpoints, self.procs, strict=True) if p is not None]
        while time.monotonic() < end:
            if self.health(live):
                return
            time.sleep(0.2)
        logs = "".join(
            (self.root / f"m{i}.log").read_text(errors="replace")[-800:] for i in range(self.size)
        )
        raise RuntimeError(f"etcd cluster did not become healthy: {logs}")

    def kill(self, i: int) -> None:
        p = self.procs[i]
        if p is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
            self.procs[i] = None

    def restart(self, i: int) -> None:
        if self.procs[i] is None:
            self._spawn(i, "existing")

    def stop(self) -> None:
        for i in range(len(self.procs)):
            self.kill(i)


def start_cluster(size: int = 3, tls: bool = False) -> EtcdCluster:
    root = Path(tempfile.mkdtemp(prefix="sandboxd-etcd-"))
    c = EtcdCluster(root, size)
    try:
        if tls:
            (root / "tls").mkdir()
            c.tls = make_tls(root / "tls")
        c.start()
    except BaseException:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise
    return c


def stop_cluster(c: EtcdCluster) -> None:
    c.stop()
    shutil.rmtree(c.root, ignore_errors=True)
