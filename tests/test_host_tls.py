"""TLS on the host's listener (issue 16), checked by clients that verify against a test CA.

A CA made here signs the host's certificate for ``sandbox.example.test``,
``*.sandbox.example.test`` and ``api.example.test``. Clients connect to
127.0.0.1 and verify the certificate against those names (SNI, hostname
check on): httpx for the lifecycle API, the proxy, SSE and an exposed port;
``websockets`` for a PTY; Python's ``ssl`` to read which certificate a fresh
handshake gets. A renewed certificate is used by new connections after a
SIGHUP or a change on disk, while sandboxes and open connections carry on.
The SDK's Rust core trusts only its bundled roots: a test pins that it
refuses this CA (``UnknownIssuer``), so a future SDK that changes it is noticed.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .conftest import free_port, stop_process, wait_for
from .test_host import Host, assert_gone, host_argv, make_state_root
from .test_host_domain import run_remote

DOMAIN = "example.test"
SANDBOX = f"sandbox.{DOMAIN}"
ADMIN = "admin-token-tls"
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # Debian's
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@dataclass
class Pki:
    dir: Path
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    def issue(self, cert_path: Path, key_path: Path, serial: int) -> None:
        """A leaf for the deployment's names (and 127.0.0.1), written like an ACME client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        names = [x509.DNSName(n) for n in (SANDBOX, f"*.{SANDBOX}", f"api.{DOMAIN}")]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SANDBOX)]))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_pki(directory: Path) -> Pki:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sandboxd test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    pki = Pki(directory, key, cert)
    pki.ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pki


def served_serial(port: int, pki: Pki, name: str = SANDBOX) -> int:
    """The serial of the certificate a new handshake gets (verified for ``name``)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        pki.client_context().wrap_socket(raw, server_hostname=name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@dataclass
class TlsHost:
    host: Host
    port: int
    pki: Pki
    cert: Path
    key: Path

    def client(self, name: str = SANDBOX) -> httpx.Client:
        """Verifying against the test CA for ``name``, connected to 127.0.0.1."""
        return httpx.Client(
            base_url=f"https://127.0.0.1:{self.port}",
            verify=self.pki.client_context(),
            headers={**AUTH, "Host": f"{name}:{self.port}"},
            timeout=60,
        )

    def ext(self, name: str = SANDBOX) -> dict[str, object]:
        return {"sni_hostname": name}


def start_tls_host(state: Path, pki: Pki, port: int | None = None, poll_s: str = "3600") -> TlsHost:
    port = port or free_port()
    cert, key = pki.dir / "cert.pem", pki.dir / "key.pem"
    if not cert.exists():
        pki.issue(cert, key, serial=100)
    argv = host_argv(
        state,
        port,
        0,
        [
            "--no-net",
            *("--public-url", f"https://{SANDBOX}:{port}"),
            *("--tls-cert", str(cert), "--tls-key", str(key)),
        ],
    )
    log_path = state.with_name(state.name + ".log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "SANDBOXD_HOST_TOKEN": ADMIN, "SANDBOXD_HOST_TLS_POLL_S": poll_s},
        )
    h = Host(f"https://127.0.0.1:{port}", state, proc, log_path)
    th = TlsHost(h, port, pki, cert, key)

    def up() -> bool:
        assert proc.poll() is None, h.log()
        with contextlib.suppress(httpx.HTTPError, OSError), th.client() as c:
            return c.get("/sandboxes", extensions=th.ext()).status_code == 200
        return False

    wait_for(up, timeout=20)
    return th


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    yield from make_state_root("sbt")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


def _create(th: TlsHost, **extra: object) -> str:
    with th.client() as c:
        body = {"resources": {"cpus": 1.0, "memory_mb": 256}, **extra}
        r = c.post("/sandboxes", json=body, extensions=th.ext())
        assert r.status_code == 200, r.text
        assert r.json()["sandbox_url"] == f"https://{SANDBOX}:{th.port}"
        return str(r.json()["sandbox_id"])


def _pty_ws(th: TlsHost, sid: str):  # type: ignore[no-untyped-def]
    """A PTY session's websocket over verified TLS, through the proxy (Host: <id>.sandbox...)."""
    from websockets.sync.client import connect

    name = f"{sid}.{SANDBOX}"
    with th.client(name) as c:
        r = c.post("/api/v1/pty", json={"command": "sh"}, extensions=th.ext(name))
        assert r.status_code == 201, r.text
        session = r.json()
    sock = socket.create_connection(("127.0.0.1", th.port))
    return connect(
        f"wss://{name}:{th.port}/api/v1/pty/{session['session_id']}/ws?token={session['token']}",
        sock=sock,
        ssl=th.pki.client_context(),
        additional_headers=AUTH,
    )


def _pty_says(ws, command: str, expect: bytes) -> bool:  # type: ignore[no-untyped-def]
    ws.send(b"\x02")  # READY: output may flow (docs/terminals-and-tunnels.md)
    ws.send(b"\x00" + command.encode())
    seen = b""
    end = time.monotonic() + 20
    while expect not in seen and time.monotonic() < end:
        with contextlib.suppress(TimeoutError):
            msg = ws.recv(timeout=1)
            if isinstance(msg, bytes) and msg[:1] == b"\x00":
                seen += msg[1:]
    return expect in seen


def test_every_route_over_verified_tls(state_root: Path, pki: Pki) -> None:
    th = start_tls_host(state_root / "a", pki)
    sid = ""
    try:
        sid = _create(th, exposed_ports=[8080])
        by_header = {"X-Tensorlake-Sandbox-Id": sid}
        with th.client() as c:
            assert c.get(f"/sandboxes/{sid}", extensions=th.ext()).json()["status"] == "running"
            # The proxy: a run, and an SSE follow streamed over TLS.
            r = c.post(
                "/api/v1/processes/run",
                json={"command": "sh", "args": ["-c", "echo tls-$((6*7))"]},
                headers=by_header,
                extensions=th.ext(),
            )
            assert r.status_code == 200 and "tls-42" in r.text, r.text
            r = c.post(
                "/api/v1/processes",
                json={"command": "sh", "args": ["-c", "echo one; sleep 0.3; echo two"]},
                headers=by_header,
                extensions=th.ext(),
            )
            pid = r.json()["pid"]
            path = f"/api/v1/processes/{pid}/output/follow"
            with c.stream("GET", path, headers=by_header, extensions=th.ext()) as s:
                assert s.headers["content-type"].startswith("text/event-stream")
                text = "".join(s.iter_text())
            assert "one" in text and "two" in text, text
            # An exposed port, at its own name under the wildcard certificate.
            c.post(
                "/api/v1/processes",
                json={"command": "python3", "args": ["-m", "http.server", "8080", "-d", "/etc"]},
                headers=by_header,
                extensions=th.ext(),
            )
            # Files both ways, and the rest of the API's reads (the admin token).
            r = c.put(
                "/api/v1/files",
                params={"path": "/root/tls.txt"},
                content=b"over tls",
                headers=by_header,
                extensions=th.ext(),
            )
            assert r.status_code == 204, r.text
            r = c.get(
                "/api/v1/files",
                params={"path": "/root/tls.txt"},
                headers=by_header,
                extensions=th.ext(),
            )
            assert r.content == b"over tls"
            for path in (
                "/snapshots",
                "/sandbox-pools",
                "/archived-sandboxes",
                "/volumes",
                f"/sandboxes/{sid}/processes",
                "/health",
                "/metrics",
            ):
                assert c.get(path, extensions=th.ext()).status_code == 200, path
        # The log routes stay on the API URL's name (api.<domain>), namespaced.
        api = f"api.{DOMAIN}"
        with th.client(api) as c:
            r = c.get(f"/v1/namespaces/default/sandboxes/{sid}/logs", extensions=th.ext(api))
            assert r.status_code == 200 and r.json()["logs"], r.text
        port_name = f"8080-{sid}.{SANDBOX}"
        with th.client(port_name) as p:
            wait_for(lambda: p.get("/", extensions=th.ext(port_name)).status_code == 200, 20)
        # A PTY websocket over TLS.
        with _pty_ws(th, sid) as ws:
            assert _pty_says(ws, "echo pty-$((6*7))\n", b"pty-42")
        # A tunnel websocket over TLS (by header this time) to the same server.
        from websockets.sync.client import connect

        with connect(
            f"wss://{SANDBOX}:{th.port}/api/v1/tunnels/tcp?port=8080",
            sock=socket.create_connection(("127.0.0.1", th.port)),
            ssl=pki.client_context(),
            additional_headers={**AUTH, **by_header},
        ) as tunnel:
            tunnel.send(b"GET /hostname HTTP/1.0\r\n\r\n")
            got = b""
            with contextlib.suppress(Exception):  # the server closes after its answer
                while True:
                    msg = tunnel.recv(timeout=10)
                    got += msg if isinstance(msg, bytes) else msg.encode()
            assert got.startswith(b"HTTP/1.0 200"), got[:200]
        # Plain HTTP on the TLS port is refused, never served.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{th.port}/sandboxes", headers=AUTH, timeout=5)
        # The start-up lines name the URL and the key a client needs.
        assert f"export TENSORLAKE_API_URL=https://api.{DOMAIN}:{th.port}" in th.host.log()
        # A restart over TLS keeps the sandbox (an upgrade is a restart).
        stop_process(th.host.proc)
        th = start_tls_host(state_root / "a", pki, th.port)
        with th.client() as c:
            r = c.post(
                "/api/v1/processes/run",
                json={"command": "echo", "args": ["still-here"]},
                headers=by_header,
                extensions=th.ext(),
            )
            assert "still-here" in r.text, r.text
    finally:
        if sid:
            with th.client() as c:
                c.delete(f"/sandboxes/{sid}", extensions=th.ext())
        th.host.stop()
    assert_gone(th.host, sid)


def test_sighup_loads_a_renewed_certificate_and_open_connections_carry_on(
    state_root: Path, pki: Pki
) -> None:
    th = start_tls_host(state_root / "b", pki)  # no polling: only SIGHUP reloads
    sid = ""
    try:
        sid = _create(th)
        assert served_serial(th.port, pki) == 100
        with _pty_ws(th, sid) as ws:
            assert _pty_says(ws, "echo before-$((1+1))\n", b"before-2")
            pki.issue(th.cert, th.key, serial=200)  # renewed on disk
            assert served_serial(th.port, pki) == 100  # not yet: no poll, no signal
            th.host.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: served_serial(th.port, pki) == 200, timeout=10)
            # The terminal opened under the old certificate still works.
            assert _pty_says(ws, "echo after-$((2+2))\n", b"after-4")
        with th.client() as c:
            assert c.get(f"/sandboxes/{sid}", extensions=th.ext()).json()["status"] == "running"
        assert th.host.proc.poll() is None
    finally:
        if sid:
            with th.client() as c:
                c.delete(f"/sandboxes/{sid}", extensions=th.ext())
        th.host.stop()


def test_a_certificate_renewed_on_disk_is_picked_up_and_a_torn_pair_is_not(
    state_root: Path, pki: Pki
) -> None:
    th = start_tls_host(state_root / "c", pki, poll_s="0.2")
    try:
        assert served_serial(th.port, pki) == 100
        # Caught half-written: a new chain with the old key. The old pair stays in use.
        spare_key = pki.dir / "spare-key.pem"
        pki.issue(pki.dir / "new-cert.pem", spare_key, serial=300)
        os.replace(pki.dir / "new-cert.pem", th.cert)
        wait_for(lambda: "TLS reload (files changed) failed" in th.host.log(), timeout=10)
        assert served_serial(th.port, pki) == 100
        # The key arrives: the renewed pair is used.
        os.replace(spare_key, th.key)
        wait_for(lambda: served_serial(th.port, pki) == 300, timeout=10)
    finally:
        th.host.stop()


def test_the_sdk_refuses_a_private_ca(state_root: Path, pki: Pki, tmp_path: Path) -> None:
    """Measured fact, pinned: the SDK's Rust core trusts only its bundled public roots.

    Given the test CA through SSL_CERT_FILE, it still fails with UnknownIssuer,
    so deployments need a publicly trusted certificate (docs/deploy.md).
    """
    th = start_tls_host(state_root / "d", pki)
    try:
        script = (
            "import json\n"
            "from tensorlake.sandbox import Sandbox\n"
            "try:\n"
            "    Sandbox.list()\n"
            "    out = 'created'\n"
            "except Exception as exc:\n"
            "    out = repr(exc)\n"
            "print(json.dumps({'out': out}))\n"
        )
        env = {
            "TENSORLAKE_API_URL": f"https://api.{DOMAIN}:{th.port}",
            "TENSORLAKE_API_KEY": ADMIN,
            "SSL_CERT_FILE": str(pki.ca_file),
        }
        out = run_remote(tmp_path, script, env, timeout=120)["out"]
        assert "UnknownIssuer" in out, out
        # Python's ssl in the same position trusts it (the CA itself is fine).
        assert served_serial(th.port, pki) == 100
        # The CA added to the system's bundle (a copy with it appended, bound over
        # the bundle in the client's own mount namespace): refused all the same,
        # while a client that reads the system bundle (Python's ssl) accepts it.
        bundle = tmp_path / "system-bundle.pem"
        bundle.write_bytes(Path(SYSTEM_BUNDLE).read_bytes() + pki.ca_file.read_bytes())
        in_system = (
            "import json, socket, ssl, subprocess\n"
            f"subprocess.run(['mount', '--bind', {str(bundle)!r}, {SYSTEM_BUNDLE!r}], check=True)\n"
            f"ctx = ssl.create_default_context(cafile={SYSTEM_BUNDLE!r})\n"
            f"raw = socket.create_connection(('127.0.0.1', {th.port}))\n"
            f"ctx.wrap_socket(raw, server_hostname='api.{DOMAIN}').close()\n"
            "from tensorlake.sandbox import Sandbox\n"
            "try:\n"
            "    Sandbox.list()\n"
            "    out = 'listed'\n"
            "except Exception as exc:\n"
            "    out = repr(exc)\n"
            "print(json.dumps({'out': out}))\n"
        )
        env.pop("SSL_CERT_FILE")
        out = run_remote(tmp_path, in_system, env, timeout=120)["out"]
        assert "UnknownIssuer" in out, out
    finally:
        th.host.stop()


def test_a_bad_pair_stops_the_start_with_one_line(tmp_path: Path, pki: Pki) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    pki.issue(cert, key, serial=5)
    other = tmp_path / "other-key.pem"
    pki.issue(tmp_path / "unused.pem", other, serial=6)

    def host(*flags: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "sandboxd", "host", *flags, "--state-dir", str(tmp_path / "s")]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)

    r = host("--tls-cert", str(cert), "--tls-key", str(other))
    assert r.returncode != 0
    assert "cannot load the TLS certificate" in r.stderr and "Traceback" not in r.stderr
    r = host("--tls-cert", str(cert))
    assert "--tls-cert and --tls-key go together" in r.stderr
