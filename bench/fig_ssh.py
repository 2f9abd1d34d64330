"""SSH (issue 15): asyncssh in the daemon against OpenSSH's sshd, and the host's gateway.

The same OpenSSH client (Debian's ``ssh``), the same ed25519 key, loopback:

- ``ssh_connect_rt``: ``ssh HOST true``, a new connection each time (key
  exchange, public-key login, one session, exit status), to the daemon's own
  SSH server (``/api/v1/ssh/enable``), against Debian's ``sshd`` started on a
  loopback port with a minimal config, interleaved.
- ``ssh_stream``: 64 MiB through ``ssh HOST cat`` and back, MB/s each way,
  same two servers.
- ``ssh_gateway_rt``: ``ssh -p PORT SANDBOX@127.0.0.1 true`` through
  ``sandboxd host --ssh-port`` into a real sandbox (two SSH connections: the
  user's to the gateway, the gateway's to the sandbox's daemon through its
  tunnel), against the daemon's server reached directly.

The daemon's RSS before the first enable and after a session, and sshd's
(listener plus one connection's processes), go in the notes: what a sandbox
pays for SSH that is on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from common import PYTHON, Ref, Row, free_port, median, not_measured, percentile, stop_process
from ctx import Ctx

KEYS = ["ssh_connect_rt", "ssh_stream", "ssh_gateway_rt"]
SSHD = "/usr/sbin/sshd"
IMAGES = Path(__file__).resolve().parent.parent / "build" / "images"
NS = "/v1/namespaces/default/sandboxes"
QUIET = [
    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
]  # fmt: skip
STREAM_BYTES = 64 << 20


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _ssh(key: Path, port: int, user: str, cmd: str, stdin: bytes = b"") -> bytes:
    r = subprocess.run(
        ["ssh", "-i", str(key), "-p", str(port), *QUIET, f"{user}@127.0.0.1", cmd],
        input=stdin,
        capture_output=True,
        timeout=120,
    )
    if r.returncode != 0:
        raise RuntimeError(f"ssh {user}@:{port} {cmd!r}: {r.returncode} {r.stderr[-300:]!r}")
    return r.stdout


def _connect_ms(key: Path, port: int, user: str) -> float:
    t0 = time.perf_counter()
    _ssh(key, port, user, "true")
    return (time.perf_counter() - t0) * 1000


def _stream_mbps(key: Path, port: int, user: str, blob: bytes) -> float:
    t0 = time.perf_counter()
    out = _ssh(key, port, user, "cat", stdin=blob)
    took = time.perf_counter() - t0
    if out != blob:
        raise RuntimeError("the stream came back different")
    return len(blob) / took / 1e6


class Sshd:
    """Debian's sshd on a loopback port: one host key, one authorized key, nothing else."""

    def __init__(self, work: Path, pubkey: Path) -> None:
        work.mkdir()
        hostkey = work / "host_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)], check=True)
        shutil.copy(pubkey, work / "authorized_keys")
        self.port = free_port()
        config = work / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {hostkey}\n"
            f"AuthorizedKeysFile {work}/authorized_keys\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\n"
            f"PidFile {work}/sshd.pid\nStrictModes no\nSubsystem sftp internal-sftp\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation dir
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=open(work / "sshd.log", "wb"),  # noqa: SIM115 - closed with the process
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                import socket

                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            time.sleep(0.05)
        raise RuntimeError("sshd did not come up: " + (work / "sshd.log").read_text()[-300:])

    def close(self) -> None:
        stop_process(self.proc)


class Daemon:
    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "sandboxd", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=work,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/api/v1/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError("the daemon did not come up")

    def enable(self, pubkey: Path) -> int:
        r = httpx.post(
            self.url + "/api/v1/ssh/enable",
            json={"proxy_pubkey": pubkey.read_text(), "backend_user": "root"},
            timeout=10,
        )
        r.raise_for_status()
        return int(r.json()["port"])

    def close(self) -> None:
        stop_process(self.proc)


class Host:
    def __init__(self, state: Path, pubkey: Path) -> None:
        self.port, self.ssh_port = free_port(), free_port()
        subprocess.run(
            [PYTHON, "-m", "sandboxd", "host", "ssh-keys", "add", "--state-dir", str(state),
             "--namespace", "default", str(pubkey)],
            check=True, capture_output=True,
        )  # fmt: skip
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "sandboxd", "host", "--port", str(self.port), "--state-dir", str(state),
             "--images", str(IMAGES), "--warm", "0", "--no-net", "--ssh-port", str(self.ssh_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + NS, timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError("the host did not come up")

    def create(self) -> str:
        r = httpx.post(self.url + NS, json={}, timeout=60)
        r.raise_for_status()
        return str(r.json()["sandbox_id"])

    def close(self) -> None:
        with contextlib.suppress(httpx.HTTPError):
            for s in httpx.get(self.url + NS, timeout=10).json()["sandboxes"]:
                httpx.delete(f"{self.url}{NS}/{s['id']}", timeout=30)
        stop_process(self.proc)


def measure(ctx: Ctx) -> list[Row]:
    why = None
    if os.geteuid() != 0:
        why = "needs root"
    elif not os.access(SSHD, os.X_OK) or shutil.which("ssh") is None:
        why = "no OpenSSH sshd/ssh (bench/setup.sh installs openssh-server)"
    if why:
        return [not_measured(k, k, "", "", why) for k in KEYS]
    work = Path(tempfile.mkdtemp(prefix="sbssh", dir="/tmp"))
    os.chmod(work, 0o711)
    try:
        return _measure(ctx, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(ctx: Ctx, work: Path) -> list[Row]:
    key = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    pub = key.with_suffix(".pub")
    daemon = Daemon(work)
    sshd = Sshd(work / "sshd", pub)
    try:
        rss_before = _rss_kb(daemon.proc.pid)
        dport = daemon.enable(pub)
        ours: list[float] = []
        theirs: list[float] = []
        n = ctx.n(20, 5)
        for i in range(n):
            for side in ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours"):
                if side == "ours":
                    ours.append(_connect_ms(key, dport, "root"))
                else:
                    theirs.append(_connect_ms(key, sshd.port, "root"))
        rss_after = _rss_kb(daemon.proc.pid)
        sshd_rss = _rss_kb(sshd.proc.pid)
        blob = os.urandom(STREAM_BYTES)
        s_ours: list[float] = []
        s_theirs: list[float] = []
        for i in range(ctx.n(3, 1)):
            for side in ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours"):
                if side == "ours":
                    s_ours.append(_stream_mbps(key, dport, "root", blob))
                else:
                    s_theirs.append(_stream_mbps(key, sshd.port, "root", blob))
    finally:
        sshd.close()
        daemon.close()
    rows = [
        Row(
            "ssh_connect_rt",
            "SSH: `ssh HOST true`, a new connection each time (daemon's server, loopback)",
            "ms",
            median(ours),
            p99=percentile(ours, 99),
            refs=[Ref("OpenSSH sshd 9.2 (Debian)", median(theirs), "ms", median(ours) / median(theirs))],
            note=(
                "same client and ed25519 key, interleaved; daemon RSS "
                f"{rss_before / 1024:.1f} MB before the first enable, {rss_after / 1024:.1f} MB after "
                f"{n} sessions (asyncssh and cryptography imported on enable); sshd's listener "
                f"{sshd_rss / 1024:.1f} MB, plus a forked process pair per connection"
            ),
            samples=len(ours),
            detail={"ours_ms": ours, "sshd_ms": theirs, "rss_kb": [rss_before, rss_after]},
        ),
        Row(
            "ssh_stream",
            "SSH: 64 MiB through `ssh HOST cat` and back (daemon's server, loopback)",
            "MB/s",
            median(s_ours),
            refs=[Ref("OpenSSH sshd 9.2 (Debian)", median(s_theirs), "MB/s", median(s_ours) / median(s_theirs))],
            note="MB/s each way (the bytes go out and come back); byte-exact check on every run",
            samples=len(s_ours),
            detail={"ours_mbps": s_ours, "sshd_mbps": s_theirs},
        ),
    ]
    if not (IMAGES / "default" / "image.json").exists():
        rows.append(not_measured("ssh_gateway_rt", "ssh_gateway_rt", "ms", "", "no default image (make image)"))
        return rows
    host = Host(work / "host", pub)
    try:
        sid = host.create()
        gw: list[float] = []
        for _ in range(ctx.n(20, 5)):
            gw.append(_connect_ms(key, host.ssh_port, sid))
        g_stream = _stream_mbps(key, host.ssh_port, sid, blob[: 16 << 20])
    finally:
        host.close()
    rows.append(
        Row(
            "ssh_gateway_rt",
            "SSH through `sandboxd host --ssh-port` into a sandbox: `ssh SANDBOX@HOST true`",
            "ms",
            median(gw),
            p99=percentile(gw, 99),
            refs=[Ref("the daemon's server reached directly", median(ours), "ms", median(gw) / median(ours))],
            note=(
                "two SSH connections per login (user → gateway, gateway → the sandbox's daemon "
                f"through its tunnel); 16 MiB `cat` through the gateway: {g_stream:.0f} MB/s each way"
            ),
            samples=len(gw),
            detail={"gateway_ms": gw, "gateway_stream_mbps": g_stream},
        )
    )
    return rows


def profile(ctx: Ctx, key: str) -> bool:
    return False  # no goal: costs to know, with their references beside them
