"""The command line against a real ``sandboxd host``: ``sbx`` and ``--sandbox``.

One control plane for the module (``tests/test_host.py``'s ``start_host``),
real bubblewrap sandboxes, and the real CLI as a subprocess, the way people
run it. Each test makes and terminates its own sandboxes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from .cli_helpers import CLI, Lines, cli, cli_env
from .conftest import free_port, wait_for
from .test_host import Host, make_state_root, start_host


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    yield from make_state_root("sbc")


@pytest.fixture(scope="module")
def host(state_root: Path) -> Iterator[Host]:
    h = start_host(state_root / "s", warm=1)
    yield h
    with h.http() as c:
        for s in c.get("/v1/namespaces/default/sandboxes").json()["sandboxes"]:
            c.delete(f"/v1/namespaces/default/sandboxes/{s['id']}")
    h.stop()


def run(
    host: Host, *args: str, env: dict[str, str] | None = None, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """``sandboxd ARGS`` with ``SANDBOXD_URL`` set to the host."""
    return cli(None, *args, env={"SANDBOXD_URL": host.url, **(env or {})}, input=input, timeout=90)


def ok(host: Host, *args: str, **kwargs: Any) -> str:
    r = run(host, *args, **kwargs)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r.stdout


def as_json(host: Host, *args: str, **kwargs: Any) -> Any:
    return json.loads(ok(host, *args, "--json", **kwargs))


@pytest.fixture
def named(host: Host, request: pytest.FixtureRequest) -> Iterator[str]:
    """A running sandbox named after the test; terminated at the end."""
    name = "t-" + hashlib.sha1(request.node.name.encode()).hexdigest()[:10]
    sid = ok(host, "sbx", "create", "--name", name, "--memory", "512", "--wait").strip()
    assert sid.startswith("sbx-")
    yield name
    run(host, "sbx", "terminate", sid)


# --- sbx ---


def test_sbx_create_ls_describe_terminate(host: Host) -> None:
    # Without --wait: the id at once, the sandbox starts in the background.
    sid = ok(host, "sbx", "create", "--cpus", "0.5", "--memory", "256M", "--timeout", "600").strip()
    assert sid.startswith("sbx-")
    named = ok(host, "sbx", "create", "--name", "cli-web", "--wait").strip()
    assert named.startswith("sbx-") and named != sid

    listed = {s["id"]: s for s in as_json(host, "sbx", "ls")}
    assert {sid, named} <= listed.keys()
    assert listed[sid]["resources"]["cpus"] == 0.5
    assert listed[sid]["resources"]["memory_mb"] == 256
    assert listed[named]["status"] == "running" and listed[named]["name"] == "cli-web"

    table = ok(host, "sbx", "ls").splitlines()
    assert table[0].split() == ["ID", "NAME", "STATUS", "IMAGE", "CPUS", "MEMORY", "AGE", "LABELS"]
    row = next(line.split() for line in table if line.startswith(named))
    assert row[1:5] == ["cli-web", "running", "default", "1"] and row[5:7] == ["1.0", "GiB"]

    assert [s["id"] for s in as_json(host, "sbx", "ls", "--name", "cli-w*")] == [named]
    assert as_json(host, "sbx", "ls", "--name", "nothing-*") == []
    running = as_json(host, "sbx", "ls", "--status", "running,pending")
    assert named in {s["id"] for s in running}
    assert as_json(host, "sbx", "ls", "--status", "suspended") == []
    r = run(host, "sbx", "ls", "--status", "sleeping")
    assert r.returncode == 2 and "unknown status sleeping" in r.stderr

    info = as_json(host, "sbx", "describe", "cli-web")
    assert (info["id"], info["status"], info["resources"]["disk_mb"]) == (named, "running", 10240)
    text = ok(host, "sbx", "describe", named)
    fields = dict(line.split(None, 1) for line in text.splitlines()[1:])
    assert fields["name"] == "cli-web" and fields["status"] == "running"
    assert fields["memory"] == "1.0 GiB" and fields["timeout"] == "none"

    assert ok(host, "sbx", "terminate", "cli-web", sid).split() == [named, sid]
    assert as_json(host, "sbx", "describe", named)["status"] == "terminated"
    assert named not in {s["id"] for s in as_json(host, "sbx", "ls")}
    # The name is gone with its sandbox: 5, with the host's message.
    r = run(host, "sbx", "terminate", "cli-web")
    assert r.returncode == 5 and "SANDBOX_NOT_FOUND" in r.stderr
    assert r.stderr.startswith("sandboxd sbx terminate: ")


def test_sbx_suspend_resume_snapshot_and_restore(host: Host, named: str, tmp_path: Path) -> None:
    ok(host, "run", "--sandbox", named, "--", "sh", "-c", "echo kept > /root/mark")
    assert ok(host, "sbx", "suspend", named).split()[1] == "suspended"
    assert as_json(host, "sbx", "describe", named)["status"] == "suspended"
    assert [s["name"] for s in as_json(host, "sbx", "ls", "--status", "suspended")] == [named]
    assert ok(host, "sbx", "resume", named).split()[1] == "running"
    # --json: the host's SandboxInfo once the status is reached.
    assert as_json(host, "sbx", "suspend", named)["status"] == "suspended"
    resumed = as_json(host, "sbx", "resume", named)
    assert (resumed["name"], resumed["status"]) == (named, "running")

    snap = as_json(host, "sbx", "snapshot", "--wait", named)
    assert snap["status"] == "completed" and snap["id"].startswith("snap-")
    plain = ok(host, "sbx", "snapshot", named).strip()
    assert plain.startswith("snap-") and plain != snap["id"]

    restored = as_json(host, "sbx", "create", "--snapshot", snap["id"], "--wait")
    try:
        assert restored["status"] == "running"
        out = ok(host, "run", "--sandbox", restored["id"], "--", "cat", "/root/mark")
        assert out == "kept\n"
    finally:
        ok(host, "sbx", "terminate", restored["id"])


def test_sbx_create_failure_and_refusals_exit_codes(host: Host) -> None:
    # Refused by the host: 1, its code printed.
    r = run(host, "sbx", "create", "--image", "no-such-image")
    assert r.returncode == 1 and "UNKNOWN_IMAGE" in r.stderr, r.stderr
    unnamed = ok(host, "sbx", "create", "--wait").strip()
    try:
        r = run(host, "sbx", "suspend", unnamed)
        assert r.returncode == 1 and "SUSPEND_NEEDS_NAME" in r.stderr
        # Resuming a running sandbox asks for where it already is: fine.
        assert ok(host, "sbx", "resume", unnamed).split() == [unnamed, "running"]
    finally:
        ok(host, "sbx", "terminate", unnamed)
    # Usage: 2 before anything is sent.
    r = run(host, "sbx", "create", "--memory", "lots")
    assert r.returncode == 2 and "not a size" in r.stderr
    assert run(host, "sbx", "describe").returncode == 2
    # Not found: 5. Unreachable: 3.
    for args in (("describe", "sbx-0000000000000000"), ("snapshot", "nobody"), ("resume", "x")):
        r = run(host, "sbx", *args)
        assert r.returncode == 5 and "SANDBOX_NOT_FOUND" in r.stderr, (args, r.stderr)
    r = run(host, "sbx", "ls", env={"SANDBOXD_URL": f"http://127.0.0.1:{free_port()}"})
    assert r.returncode == 3 and "cannot reach" in r.stderr
    # Another namespace has its own sandboxes.
    assert as_json(host, "sbx", "ls", "--namespace", "other") == []
    assert run(host, "sbx", "ls", env={"SANDBOXD_NAMESPACE": "Bad Name!"}).returncode == 1


def test_sbx_pools(host: Host) -> None:
    made = as_json(
        host, "sbx", "pool", "create", "--memory", "512", "--max", "2", "--label", "tier=gpu"
    )
    pool_id = made["pool_id"]
    try:
        pools = {p["id"]: p for p in as_json(host, "sbx", "pool", "ls")}
        assert pools[pool_id]["resources"]["memory_mb"] == 512
        assert pools[pool_id]["max_containers"] == 2
        assert pools[pool_id]["labels"] == {"tier": "gpu"}
        table = ok(host, "sbx", "pool", "ls").splitlines()
        assert table[0].split() == ["ID", "IMAGE", "CPUS", "MEMORY", "WARM", "MAX", "AGE", "LABELS"]
        row = next(line.split() for line in table if line.startswith(pool_id))
        assert row[-1] == "tier=gpu" and " 2 " in f" {' '.join(row)} "
        r = run(host, "sbx", "pool", "create", "--label", "bad key=x")
        assert r.returncode == 1 and "INVALID_LABEL_KEY" in r.stderr, r.stderr
        r = run(host, "sbx", "pool", "create", "--warm", "3", "--max", "1")
        assert r.returncode == 1 and "INVALID_WARM_CONTAINERS" in r.stderr
    finally:
        assert ok(host, "sbx", "pool", "rm", pool_id).strip() == pool_id
    assert pool_id not in {p["id"] for p in as_json(host, "sbx", "pool", "ls")}
    r = run(host, "sbx", "pool", "rm", pool_id)
    assert r.returncode == 5 and "POOL_NOT_FOUND" in r.stderr


def test_a_token_guarded_host_exits_4_without_it(state_root: Path) -> None:
    h = start_host(state_root / "tok", warm=0, token="s3cret")
    try:
        r = run(h, "sbx", "ls")
        assert r.returncode == 4, r.stderr
        r = run(h, "sbx", "ls", env={"SANDBOXD_TOKEN": "wrong"})
        assert r.returncode == 4
        assert as_json(h, "sbx", "ls", "--token", "s3cret") == []
        r = run(h, "ps", "--sandbox", "any")
        assert r.returncode == 4
    finally:
        h.stop()


# --- the daemon's commands, sent to a host's sandbox ---


def test_client_commands_reach_a_sandbox_by_name_and_id(host: Host, named: str) -> None:
    sid = as_json(host, "sbx", "describe", named)["id"]
    assert ok(host, "health", "--sandbox", named).strip() == "healthy"
    assert "running processes" in ok(host, "info", "--sandbox", sid)

    r = run(host, "run", "--sandbox", named, "--", "sh", "-c", "hostname; echo oops >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, f"{sid}\n", "oops\n")

    # SANDBOXD_SANDBOX instead of the flag.
    env = {"SANDBOXD_SANDBOX": named}
    pid = ok(host, "start", "--name", "ticker", "--", "sh", "-c", "echo one; echo two", env=env)
    assert ok(host, "logs", "-f", "ticker", env=env) == "one\ntwo\n"
    procs = as_json(host, "ps", "--sandbox", named)
    assert int(pid) in {p["pid"] for p in procs}

    cat = ok(host, "start", "--stdin", "--", "cat", env=env).strip()
    ok(host, "stdin", cat, env=env, input=b"through the proxy\n")
    assert ok(host, "logs", "-f", cat, env=env) == "through the proxy\n"

    sleeper = ok(host, "start", "--", "sleep", "300", env=env).strip()
    ok(host, "signal", sleeper, "TERM", env=env)
    ok(host, "logs", "-f", sleeper, env=env)  # returns once the process has ended
    info = next(p for p in as_json(host, "ps", env=env) if p["pid"] == int(sleeper))
    assert (info["status"], info["signal"]) == ("signaled", 15)
    sleeper2 = ok(host, "start", "--", "sleep", "300", env=env).strip()
    ok(host, "kill", sleeper2, env=env)
    running = {p["pid"] for p in as_json(host, "ps", "-r", env=env)}
    assert int(sleeper2) not in running

    # ls of a file shows the file.
    lines = ok(host, "ls", "/etc/hostname", env=env).splitlines()
    assert lines[1].split()[0] == "file" and lines[1].endswith("/etc/hostname")

    # A terminal: input from a pipe, the program's exit code is ours.
    r = run(host, "pty", "--", "/bin/sh", env=env, input=b"echo $((6*7)); exit 7\n")
    assert r.returncode == 7 and "42" in r.stdout, (r.stdout, r.stderr)

    # An unknown sandbox: 5, and the host says which.
    r = run(host, "ps", "--sandbox", "no-such-sandbox")
    assert r.returncode == 5 and "no-such-sandbox" in r.stderr
    r = run(host, "ps")  # no --sandbox: the proxy cannot route it
    assert r.returncode == 1 and "NO_SANDBOX_NAMED" in r.stderr


def test_logs_follow_is_live_through_the_host(host: Host, named: str) -> None:
    """``logs -f`` prints what is there, waits, and prints what comes later."""
    env = {"SANDBOXD_URL": host.url, "SANDBOXD_SANDBOX": named}
    script = "echo before; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo after"
    pid = ok(host, "start", "--", "sh", "-c", script, env=env).strip()
    follower = subprocess.Popen(
        [*CLI, "logs", "-f", pid], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=cli_env(None, env),
    )  # fmt: skip
    try:
        out = Lines(follower.stdout)
        assert out.readline(timeout=30) == "before\n"
        assert follower.poll() is None  # still following: the process has not ended
        ok(host, "run", "--", "touch", "/tmp/go", env=env)
        assert out.readline(timeout=30) == "after\n"
        assert follower.wait(timeout=30) == 0  # it returns once the process ended
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    # The same stream as JSON lines: one output event per line, then eof.
    events = [json.loads(x) for x in ok(host, "logs", "-f", "--json", pid, env=env).splitlines()]
    assert [e["line"] for e in events if e["event"] == "output"] == ["before", "after"]
    assert events[-1]["event"] == "eof"
    body = as_json(host, "logs", pid, env=env)
    assert body["lines"] == ["before", "after"]


def _pty_sizes(host: Host, sid: str) -> set[tuple[int, int]]:
    with host.http() as c:
        r = c.get("/api/v1/pty", headers={"X-Tensorlake-Sandbox-Id": sid})
        assert r.status_code == 200, r.text
        return {(s["rows"], s["cols"]) for s in r.json()["sessions"] if s["is_alive"]}


def test_pty_through_the_host_is_sized_like_the_terminal_and_follows_a_resize(
    host: Host, named: str
) -> None:
    sid = as_json(host, "sbx", "describe", named)["id"]
    prompt = "sbx-host-prompt> "
    child = pexpect.spawn(
        CLI[0],
        [*CLI[1:], "pty", "--sandbox", named, "-e", f"PS1={prompt}", "--", "/bin/sh"],
        env=cli_env(None, {"SANDBOXD_URL": host.url}),
        dimensions=(30, 100),
        encoding="utf-8",
        timeout=30,
    )
    try:
        child.expect_exact(prompt)
        child.sendline("stty size")
        child.expect_exact("30 100")
        child.expect_exact(prompt)
        child.setwinsize(40, 132)  # SIGWINCH to the CLI, a resize frame through the proxy
        wait_for(lambda: (40, 132) in _pty_sizes(host, sid), timeout=15)
        child.sendline("stty size")
        child.expect_exact("40 132")
        child.sendline("exit 6")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 6
    wait_for(lambda: not _pty_sizes(host, sid), timeout=15)  # the CLI ended its session


def test_files_json_and_exit_codes_through_the_host(host: Host, named: str, tmp_path: Path) -> None:
    env = {"SANDBOXD_SANDBOX": named}
    local = tmp_path / "notes.bin"
    local.write_bytes(os.urandom(3 << 20) + b"\nend")  # over 1 MiB: a forced bar is drawn
    r = run(host, "cp", "--progress", str(local), ":/root/", env=env)
    assert r.returncode == 0 and "notes.bin" in r.stderr and "100.0%" in r.stderr, r.stderr
    ok(host, "cp", ":/root/notes.bin", str(tmp_path / "back.bin"), env=env)
    assert (tmp_path / "back.bin").read_bytes() == local.read_bytes()
    ok(host, "cp", "-", ":/root/piped.txt", env=env, input=b"through a pipe\n")  # stdin up
    assert ok(host, "cp", ":/root/piped.txt", "-", env=env) == "through a pipe\n"  # stdout down

    table = ok(host, "ls", "/root", env=env).splitlines()
    assert table[0].split() == ["TYPE", "SIZE", "MODIFIED", "NAME"]
    row = next(line.split() for line in table[1:] if line.endswith("notes.bin"))
    assert row[:3] == ["file", "3.0", "MiB"]
    listed = as_json(host, "ls", "/root", env=env)
    entry = next(e for e in listed["entries"] if e["name"] == "notes.bin")
    assert entry["size"] == local.stat().st_size and entry["is_dir"] is False
    one = as_json(host, "ls", "/root/notes.bin", env=env)["entries"]
    assert [(e["name"], e["size"]) for e in one] == [("/root/notes.bin", local.stat().st_size)]

    started = json.loads(ok(host, "start", "--json", "--", "sleep", "300", env=env))
    assert started["status"] == "running" and started["command"] == "sleep"
    r = run(host, "run", "--json", "--", "sh", "-c", "echo hi; exit 4", env=env)
    assert r.returncode == 4, r.stderr  # the command's own code, with --json too
    events = [json.loads(x) for x in r.stdout.splitlines()]
    assert [e["event"] for e in events] == ["started", "output", "exit"]
    assert (events[1]["line"], events[2]["exit_code"]) == ("hi", 4)
    ok(host, "kill", str(started["pid"]), env=env)

    # What the sandbox's daemon does not have is 5, as against a daemon.
    for args in (
        ("logs", "99999"), ("kill", "99999"), ("signal", "99999", "TERM"),
        ("cp", ":/root/nothing", str(tmp_path / "nothing")), ("ls", "/nothing"),
    ):  # fmt: skip
        r = run(host, *args, env=env)
        assert r.returncode == 5 and "NOT_FOUND" in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "nothing").exists()


# --- cp -r ---


def _make_tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "hello.txt").write_text("hello\n")
    (root / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (root / "run.sh").chmod(0o755)
    (root / "sub" / "data.bin").write_bytes(os.urandom(1 << 20) + b"\0end")
    (root / "sub" / "deeper" / "name with spaces").write_text("spaced\n")
    (root / "sub" / "link").symlink_to("../hello.txt")


def _snapshot_tree(root: Path) -> dict[str, tuple[str, str]]:
    """Every entry below ``root``: its kind and its content (or link target)."""
    out: dict[str, tuple[str, str]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir", "")
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[rel] = ("file", f"{digest} {oct(path.stat().st_mode & 0o111)}")
    return out


def test_cp_r_copies_a_tree_both_ways(host: Host, named: str, tmp_path: Path) -> None:
    src = tmp_path / "project"
    _make_tree(src)
    env = {"SANDBOXD_SANDBOX": named}

    ok(host, "cp", "-r", str(src), ":/srv/copy", env=env)  # a new name: the tree becomes it
    listing = ok(host, "run", "--", "sh", "-c", "cd /srv/copy && find . | sort", env=env)
    assert listing.split("\n")[:-1] == [
        ".", "./empty", "./hello.txt", "./run.sh", "./sub", "./sub/data.bin", "./sub/deeper",
        "./sub/deeper/name with spaces", "./sub/link",
    ]  # fmt: skip
    assert ok(host, "run", "--", "readlink", "/srv/copy/sub/link", env=env) == "../hello.txt\n"
    assert ok(host, "run", "--", "/srv/copy/run.sh", env=env) == "ran\n"
    remote_sum = ok(host, "run", "--", "sha256sum", "/srv/copy/sub/data.bin", env=env).split()[0]
    assert remote_sum == hashlib.sha256((src / "sub" / "data.bin").read_bytes()).hexdigest()
    # Into an existing directory: under its own name, as cp -r does.
    ok(host, "cp", "-r", str(src), ":/srv/copy/", env=env)
    assert ok(host, "run", "--", "cat", "/srv/copy/project/hello.txt", env=env) == "hello\n"

    back = tmp_path / "back"
    ok(host, "cp", "-r", ":/srv/copy", str(back), env=env)
    expected = _snapshot_tree(src)
    got = _snapshot_tree(back)
    assert {k: v for k, v in got.items() if not k.startswith("project")} == expected
    assert {k.removeprefix("project/"): v for k, v in got.items() if k.startswith("project/")} == (
        expected
    )
    # Into an existing local directory: under the source's name.
    ok(host, "cp", "-r", ":/srv/copy/sub", str(back), env=env)
    assert (back / "sub" / "deeper" / "name with spaces").read_text() == "spaced\n"
    # The archive the sandbox wrote for the download is gone.
    assert ".sandboxd-cp-" not in ok(host, "run", "--", "ls", "-a", "/tmp", env=env)

    # The sandbox's tar refuses: 1, with its own words.
    r = run(host, "cp", "-r", str(src), ":/etc/hostname/x", env=env)
    assert r.returncode == 1 and "tar exited" in r.stderr and "Not a directory" in r.stderr
    assert "Traceback" not in r.stderr
    # Without -r a directory is a usage error; a missing remote tree is 5.
    r = run(host, "cp", str(src), ":/srv/x", env=env)
    assert r.returncode == 2 and "cp -r" in r.stderr
    r = run(host, "cp", "-r", ":/srv/none", str(tmp_path / "none"), env=env)
    assert r.returncode == 5 and not (tmp_path / "none").exists()


def test_cp_r_download_writes_nothing_outside_the_destination(
    host: Host, named: str, tmp_path: Path
) -> None:
    """A sandbox's root can replace its tar: what comes back is extracted with care."""
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        link = tarfile.TarInfo("escape")
        link.type, link.linkname = tarfile.SYMTYPE, str(outside)
        tar.addfile(link)
        data = b"pwned\n"
        member = tarfile.TarInfo("escape/pwned")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    (tmp_path / "evil.tar").write_bytes(evil.getvalue())
    fake_tar = '#!/bin/sh\n# called as: tar -c -f ARCHIVE -C DIR .\ncat /root/evil.tar > "$3"\n'
    (tmp_path / "tar").write_text(fake_tar)
    env = {"SANDBOXD_SANDBOX": named}
    ok(host, "cp", str(tmp_path / "evil.tar"), ":/root/evil.tar", env=env)
    ok(host, "cp", str(tmp_path / "tar"), ":/usr/local/bin/tar", env=env)
    ok(host, "run", "--", "chmod", "755", "/usr/local/bin/tar", env=env)

    r = run(host, "cp", "-r", ":/etc", str(tmp_path / "got"), env=env)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "outside the destination" in r.stderr or "outside" in r.stderr.lower()
    assert list(outside.iterdir()) == []
