"""Packaging: the wheel, the Dockerfile's PID 1 duty, the systemd unit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import httpx
import pytest

from .conftest import ROOT, free_port, pid_alive, skip_with_reason, wait_for, zombies_of

VENV_BIN = Path(sys.executable).parent


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the daemon exited early"
        try:
            if httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    pytest.fail("the daemon did not come up")


# --- the Python package ---


def test_pyproject_metadata() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "sandboxd"
    assert meta["scripts"] == {"sandboxd": "sandboxd.cli:main"}
    deps = " ".join(meta["dependencies"])
    for dep in ("aiohttp", "pydantic", "prometheus_client"):
        assert dep in deps
    assert "pexpect" in " ".join(meta["optional-dependencies"]["test"])
    assert (ROOT / meta["readme"]).is_file()
    assert meta["requires-python"] == ">=3.11"


def test_wheel_installs_a_working_sandboxd_in_a_clean_venv(tmp_path: Path) -> None:
    """``pip wheel`` the tree, install the wheel and its deps in a fresh venv, run it."""
    wheels = tmp_path / "wheels"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = wheels.glob("sandboxd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("cli/__init__.py", "cli/serve.py", "observability/metrics.py", "api/app.py"):
        assert f"sandboxd/{module}" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "sandboxd = sandboxd.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    venv = tmp_path / "venv"
    # The base interpreter, not this venv's: nothing of the dev environment leaks in.
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
    r = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    exe = venv / "bin" / "sandboxd"
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("SANDBOXD_", "PYTHON"))}
    r = subprocess.run(
        [str(exe), "--help"], capture_output=True, text=True, env=clean_env, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "usage: sandboxd" in r.stdout and "serve" in r.stdout

    # And it serves, with every runtime dependency present (metrics included).
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(exe), "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=clean_env,
        cwd=tmp_path,
    )
    try:
        wait_healthy(url, proc)
        r = subprocess.run(
            [str(exe), "run", "--url", url, "--", "sh", "-c", "echo from-wheel"],
            capture_output=True,
            text=True,
            env=clean_env,
            timeout=60,
        )
        assert (r.returncode, r.stdout) == (0, "from-wheel\n")
        assert "sandboxd_process_spawns_total 1.0" in httpx.get(f"{url}/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


# --- PID 1 (what the Dockerfile relies on), in a new PID namespace ---


def _unshare_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root for a new PID namespace"
    if shutil.which("unshare") is None:
        return "no unshare(1) on this machine"
    r = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30
    )
    if r.returncode != 0:
        return f"unshare --pid does not work here: {r.stderr.decode().strip()}"
    return None


class Pid1:
    """``sandboxd serve`` as PID 1 of a fresh PID namespace (as in a container)."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "pid1.log"
        self.outer = subprocess.Popen(
            [
                "unshare",
                "--pid",
                "--fork",
                "--mount-proc",
                str(VENV_BIN / "sandboxd"),
                "serve",
                "--port",
                str(self.port),
            ],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
        wait_healthy(self.url, self.outer)
        # unshare --fork waits for its child, which is PID 1 inside.
        children = Path(f"/proc/{self.outer.pid}/task/{self.outer.pid}/children").read_text()
        self.pid = int(children.split()[0])  # as seen from out here
        nspid = Path(f"/proc/{self.pid}/status").read_text().split("NSpid:")[1].split("\n")[0]
        assert nspid.split()[-1] == "1", "not PID 1 in its namespace"

    def stop(self, sig: int = signal.SIGTERM) -> float:
        t0 = time.monotonic()
        os.kill(self.pid, sig)  # straight to PID 1: only a handler makes it act
        assert self.outer.wait(15) == 0
        return time.monotonic() - t0

    def close(self) -> None:
        """SIGTERM first: a SIGKILLed daemon leaves its cgroups behind."""
        if self.outer.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.outer.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.outer.wait(10)


@pytest.fixture
def pid1(tmp_path: Path):  # type: ignore[no-untyped-def]
    reason = _unshare_available()
    if reason:
        skip_with_reason(reason)
    d = Pid1(tmp_path)
    yield d
    d.close()


def test_pid1_reaps_orphans(pid1: Pid1) -> None:
    # The shell exits at once; its background children are orphans, and inside
    # the namespace their new parent is sandboxd (PID 1).
    body = {"command": "sh", "args": ["-c", "sleep 0.5 & setsid sleep 0.7 & exit 0"]}
    r = httpx.post(f"{pid1.url}/api/v1/processes", json=body)
    assert r.status_code == 201, r.text
    children = Path(f"/proc/{pid1.pid}/task/{pid1.pid}/children")
    wait_for(lambda: len(children.read_text().split()) == 2)  # the two adopted sleeps
    wait_for(lambda: not children.read_text().split() and not zombies_of(pid1.pid), timeout=5)
    info = httpx.get(f"{pid1.url}/api/v1/processes/{r.json()['pid']}").json()
    assert (info["status"], info["exit_code"]) == ("exited", 0)  # its own status kept


def test_pid1_sigterm_shuts_down_and_kills_every_tree(pid1: Pid1) -> None:
    r = httpx.post(f"{pid1.url}/api/v1/processes", json={"command": "sleep", "args": ["300"]})
    assert r.status_code == 201, r.text
    pid_inside = r.json()["pid"]
    children = Path(f"/proc/{pid1.pid}/task/{pid1.pid}/children").read_text().split()
    (outside,) = [int(c) for c in children]
    assert pid_inside != outside  # the daemon reports pids of its own namespace
    # An open follow stream must not hold the shutdown up.
    with httpx.stream("GET", f"{pid1.url}/api/v1/processes/{pid_inside}/output/follow") as follow:
        took = pid1.stop(signal.SIGTERM)
        tail = follow.read().decode()
    assert took < 5
    assert "event: eof" in tail  # the stream ended cleanly, not cut
    assert not pid_alive(outside)
    assert "received SIGTERM" in pid1.log.read_text()


def test_pid1_sigint_shuts_down(pid1: Pid1) -> None:
    assert pid1.stop(signal.SIGINT) < 5
    assert "received SIGINT" in pid1.log.read_text()


# --- Dockerfile ---

DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_runs_sandboxd_as_pid1() -> None:
    ins = _instructions()
    (entry,) = [rest for word, rest in ins if word == "ENTRYPOINT"]
    # Exec form: sandboxd is PID 1, not /bin/sh -c (which would not forward signals).
    assert json.loads(entry) == ["sandboxd", "serve"]
    assert not [rest for word, rest in ins if word == "CMD"]
    text = DOCKERFILE.read_text()
    for init in ("tini", "dumb-init", "--init"):
        assert init not in text.replace("No tini or dumb-init", "")
    assert ("STOPSIGNAL", "SIGTERM") in ins
    assert any(w == "ENV" and "SANDBOXD_HOST=0.0.0.0" in r for w, r in ins)
    assert any(w == "HEALTHCHECK" and "sandboxd health" in r for w, r in ins)
    assert ("EXPOSE", "9501") in ins


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv"} <= ignored
    for word, rest in _instructions():
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _dest = rest.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: missing"
                assert src not in ignored


def test_docker_image_builds_and_stops_cleanly(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "info"], capture_output=True).returncode != 0:
        skip_with_reason("no usable Docker engine here; the PID 1 behaviour is tested with unshare")
    tag = "sandboxd-test:latest"
    subprocess.run([docker, "build", "-q", "-t", tag, str(ROOT)], check=True, timeout=900)
    port = free_port()
    cid = subprocess.run(
        [docker, "run", "-d", "-p", f"127.0.0.1:{port}:9501", tag],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        wait_for(lambda: _healthy(f"http://127.0.0.1:{port}"), timeout=30)
        t0 = time.monotonic()
        subprocess.run([docker, "stop", cid], check=True, capture_output=True, timeout=30)
        assert time.monotonic() - t0 < 8  # stopped by SIGTERM, not the 10 s SIGKILL
        code = subprocess.run(
            [docker, "inspect", "-f", "{{.State.ExitCode}}", cid], capture_output=True, text=True
        ).stdout.strip()
        assert code == "0"
    finally:
        subprocess.run([docker, "rm", "-f", cid], capture_output=True)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# --- systemd ---


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = ROOT / "packaging" / "sandboxd.service"
    text = unit.read_text()
    assert "ExecStart=/opt/sandboxd/bin/sandboxd serve" in text
    for line in ("Delegate=yes", "KillMode=mixed", "KillSignal=SIGTERM", "Type=exec"):
        assert line in text.splitlines()
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        skip_with_reason("systemd-analyze is not installed; the unit was checked textually only")
    # verify checks that ExecStart exists: point it at this venv's sandboxd.
    local = tmp_path / "sandboxd.service"
    local.write_text(text.replace("/opt/sandboxd/bin/sandboxd", str(VENV_BIN / "sandboxd")))
    r = subprocess.run(
        [analyze, "verify", "--man=no", str(local)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr
