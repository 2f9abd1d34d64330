"""The README's quick tour, pasted as a new user would, against a real daemon.

The code blocks are read from README.md, not copied here, so the tour cannot
drift from what works: step 1's PATH line, step 2's Python (the official SDK),
step 3's shell lines in one shell (two interactive lines are driven: ``logs
-f`` is stopped with Ctrl-C, ``pty`` gets a terminal and ``exit``), step 4's
``curl``, and the files/terminals/tunnels example (its tunnel is used while
it is open). The daemon's address is the only thing changed: a free port
instead of 9501.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import ROOT, Daemon, wait_for

README = ROOT / "README.md"
VENV_BIN = ROOT / ".venv" / "bin"
# The interactive lines of step 3, and what the test does instead of a person.
DRIVEN = {
    "sandboxd logs -f web": "timeout -s INT 3 sandboxd logs -f web",
    "sandboxd pty -- bash": "printf 'exit\\n' | script -qec 'sandboxd pty -- bash' /dev/null",
}


@pytest.fixture(autouse=True)
def leaves_no_files() -> Iterator[None]:
    """The daemon runs on this machine: what the tour writes in /tmp is removed after."""
    made = [p for p in (Path("/tmp/notes.txt"), Path("/tmp/app")) if not p.exists()]
    yield
    for p in made:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S)]


def localize(code: str, daemon: Daemon) -> str:
    return code.replace("http://127.0.0.1:9501", daemon.url)


def clean_env(**extra: str) -> dict[str, str]:
    """A new user's shell: no SANDBOXD_* variables, no venv on the PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXD_")}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env.pop("VIRTUAL_ENV", None)
    return {**env, **extra}


def shell_lines(code: str) -> list[str]:
    """The block's lines without their trailing comments (``# ...`` after two spaces)."""
    return [re.split(r"\s{2,}# ", line)[0].rstrip() for line in code.strip().splitlines()]


def test_the_tour_pastes_cleanly(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = make_daemon()
    tour = blocks(section("Quick tour"))
    langs = [lang for lang, _ in tour]
    assert langs[:5] == ["sh", "sh", "python", "sh", "sh"], langs
    path_line, _serve, step2, step3, step4 = (code for _, code in tour[:5])
    assert "sudo " not in README.read_text()  # root on Debian has no sudo

    # Step 2: the SDK, from the venv's python3 (what the PATH line puts first).
    r = subprocess.run(
        [str(VENV_BIN / "python3"), "-c", localize(step2, daemon)],
        capture_output=True, text=True, timeout=120, env=clean_env(),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert re.match(r"hello 3 [0-9a-f]{32}\n", r.stdout), r.stdout  # as its comment says
    assert "b'hi'" in r.stdout and "Traced(" not in r.stdout, r.stdout

    # Step 3: one shell, from a fresh clone's directory: step 1's PATH line first.
    lines = shell_lines(step3)
    for line in DRIVEN:
        assert line in lines, f"the tour lost {line!r}; update DRIVEN"
    script = "\n".join(
        [f"cd {ROOT}", path_line.strip(), f"cd {tmp_path}", *(DRIVEN.get(x, x) for x in lines)]
    )
    r = subprocess.run(
        ["bash", "-c", script],
        capture_output=True, text=True, timeout=180,
        env=clean_env(SANDBOXD_URL=daemon.url),
    )  # fmt: skip
    out, err = r.stdout, r.stderr
    assert r.returncode == 0, (out, err)
    assert "command not found" not in err and "Traceback" not in err, err
    assert "NAME_IN_USE" not in err, err  # step 2 freed "web"
    assert err.count("sandboxd") == 0, err  # no refusal of any command
    assert out.startswith("healthy\nout\n3\n1 /tmp\n"), out
    assert re.search(r"^\d+$", out, re.M), out  # start printed a pid
    assert "\nhi\n" in out, out
    assert (tmp_path / "hostname").read_text().strip()
    assert re.search(r"^\[\d+(, \d+)*\]$", out.splitlines()[-1]), out

    # Step 4: the metrics line.
    r = subprocess.run(
        ["bash", "-c", localize(step4, daemon)],
        capture_output=True, text=True, timeout=60, env=clean_env(),
    )  # fmt: skip
    assert r.returncode == 0 and "sandboxd_http_requests" in r.stdout, (r.stdout, r.stderr)


def test_the_files_terminals_and_tunnels_example_runs(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon()
    (lang, code), *_ = blocks(section("Files, terminals and tunnels"))
    assert lang == "python"
    prelude = (
        "from tensorlake.sandbox import Sandbox\n"
        f'sbx = Sandbox.connect("local", proxy_url="{daemon.url}")\n'
    )
    proc = subprocess.Popen(
        [str(VENV_BIN / "python3"), "-u", "-c", prelude + code],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=clean_env(),
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        # Up to the tunnel's prompt: the output so far, then the URL it offers.
        seen = b""
        while b"Enter closes it" not in seen:
            chunk = proc.stdout.read1(4096)
            assert chunk, (seen, proc.stderr.read() if proc.stderr else b"")
            seen += chunk
        text = seen.decode()
        assert "b'{\"debug\": true}'" in text and "Traced(" not in text, text
        assert "['config.json']" in text and "\n3\n" in text and "42" in text, text
        url = re.findall(r"(http://127\.0\.0\.1:\d+/) reaches", text)[-1]

        def serves() -> bool:
            try:
                return httpx.get(url, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(serves, timeout=15)  # the sandbox's web server, through the open tunnel
        proc.stdin.write(b"\n")
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_make_run_installs_only_what_running_needs_and_says_where_sandboxd_is(
    tmp_path: Path,
) -> None:
    """``make run`` on a fresh clone: ``pip install -e .``, never the test extra."""
    venv = tmp_path / "venv"
    r = subprocess.run(
        ["make", "-n", "run", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert f"{venv}/bin/pip install --quiet -e . " in r.stdout, r.stdout
    assert "[test]" not in r.stdout and "[bench]" not in r.stdout, r.stdout
    # It prints where the command is and the PATH line of the tour's step 1.
    assert f'export PATH=\\"{venv}/bin:' in r.stdout, r.stdout
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    running = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in project["dependencies"]}
    tools = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in project["optional-dependencies"]["test"]}
    assert running.isdisjoint(tools), running & tools
    assert {"pytest", "ruff", "playwright", "tensorlake"} <= tools
