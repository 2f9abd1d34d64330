"""The command line client, driven as a subprocess against a live daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .cli_helpers import CLI, Lines, cli, popen
from .conftest import Daemon, pid_alive, wait_for

SUBCOMMANDS = [
    "serve", "health", "info", "ps", "start", "logs", "kill", "signal",
    "stdin", "run", "pty", "cp", "ls", "sbx",
]  # fmt: skip
SBX_SUBCOMMANDS = [
    "ls", "create", "describe", "terminate", "suspend", "resume", "snapshot",
    "pool ls", "pool create", "pool rm",
]  # fmt: skip


# --- help and usage ---


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_command_has_help(cmd: str) -> None:
    r = cli(None, cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: sandboxd {cmd}")


def test_top_level_help_lists_every_command() -> None:
    r = cli(None, "--help")
    assert r.returncode == 0
    for cmd in SUBCOMMANDS:
        assert f"    {cmd} " in r.stdout
    assert "exit codes" in r.stdout


@pytest.mark.parametrize("cmd", SBX_SUBCOMMANDS)
def test_every_sbx_command_has_help(cmd: str) -> None:
    r = cli(None, "sbx", *cmd.split(), "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: sandboxd sbx {cmd}")
    assert "--namespace" in r.stdout and "--url" in r.stdout


def test_bare_sandboxd_lists_the_commands() -> None:
    r = cli(None)
    assert r.returncode == 2
    assert r.stdout.startswith("usage: sandboxd")
    for cmd in SUBCOMMANDS:
        assert f"    {cmd} " in r.stdout
    assert "exit codes" in r.stdout
    r = cli(None, "sbx")
    assert r.returncode == 2 and r.stdout.startswith("usage: sandboxd sbx")
    for cmd in {c.split()[0] for c in SBX_SUBCOMMANDS}:
        assert f"    {cmd} " in r.stdout
    r = cli(None, "sbx", "pool")
    assert r.returncode == 2
    assert all(f"    {c} " in r.stdout for c in ("ls", "create", "rm"))


@pytest.mark.parametrize(
    "args", [("ps", "--bogus"), ("run", "--bogus", "--", "true"), ("sbx", "pool", "ls", "-z")]
)
def test_an_unknown_flag_prints_the_subcommands_usage(args: tuple[str, ...]) -> None:
    r = cli(None, *args)
    assert r.returncode == 2
    prog = "sandboxd " + " ".join(a for a in args if not a.startswith("-") and a != "true")
    assert r.stderr.startswith(f"usage: {prog} ["), r.stderr
    assert (
        f"{prog}: error: unrecognized arguments: {args[-1] if args[0] != 'run' else '--bogus'}"
        in r.stderr
    )


def test_usage_errors_exit_2() -> None:
    assert cli(None).returncode == 2
    assert cli(None, "frobnicate").returncode == 2
    r = cli(None, "run")
    assert r.returncode == 2
    assert "no command given" in r.stderr


# --- health, info, errors ---


def test_health_and_info(daemon: Daemon) -> None:
    r = cli(daemon, "health")
    assert (r.returncode, r.stdout.strip()) == (0, "healthy")
    r = cli(daemon, "health", "--json")
    assert json.loads(r.stdout) == {"healthy": True}
    r = cli(daemon, "info")
    assert r.returncode == 0
    assert "version" in r.stdout and "running processes" in r.stdout
    info = json.loads(cli(daemon, "info", "--json").stdout)
    assert {"version", "uptime_secs", "running_processes", "total_processes"} <= info.keys()


def test_url_flag_overrides_environment(daemon: Daemon) -> None:
    r = cli(None, "health", "--url", daemon.url + "/")
    assert r.returncode == 0, r.stderr


def test_unreachable_daemon_exits_3() -> None:
    from .conftest import free_port

    r = cli(None, "ps", "--url", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 3
    assert "cannot reach sandboxd" in r.stderr
    assert "Traceback" not in r.stderr


def test_not_found_prints_the_daemons_error_and_exits_5(daemon: Daemon) -> None:
    r = cli(daemon, "logs", "999999")
    assert r.returncode == 5
    assert r.stderr.strip() == "sandboxd logs: Process 999999 not found (NOT_FOUND, HTTP 404)"
    assert cli(daemon, "kill", "no-such-name").returncode == 5


def test_token_from_flag_and_environment(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(token="s3cret-cli")
    assert cli(d, "ps").returncode == 0  # SANDBOXD_TOKEN from the environment
    r = cli(None, "ps", "--url", d.url, "--token", "s3cret-cli")
    assert r.returncode == 0, r.stderr
    r = cli(None, "ps", "--url", d.url)
    assert r.returncode == 4
    assert "UNAUTHORIZED" in r.stderr
    r = cli(None, "ps", "--url", d.url, "--token", "wrong")
    assert r.returncode == 4


# --- run ---


def test_run_streams_stdout_and_stderr_apart(daemon: Daemon) -> None:
    r = cli(daemon, "run", "--", "sh", "-c", "echo out; echo err >&2; echo out2")
    assert r.returncode == 0
    assert r.stdout == "out\nout2\n"
    assert r.stderr == "err\n"


@pytest.mark.parametrize(
    ("script", "code"),
    [("exit 0", 0), ("exit 3", 3), ("exit 255", 255), ("kill -TERM $$", 143), ("kill -9 $$", 137)],
)
def test_run_exits_with_the_process_exit_code(daemon: Daemon, script: str, code: int) -> None:
    r = cli(daemon, "run", "--", "sh", "-c", script)
    assert r.returncode == code, r.stderr


def test_run_signaled_says_which_signal(daemon: Daemon) -> None:
    r = cli(daemon, "run", "--", "sh", "-c", "kill -TERM $$")
    assert "killed by SIGTERM" in r.stderr


def test_run_timeout_exits_124_and_kills_the_tree(daemon: Daemon, tmp_path: Path) -> None:
    marker = tmp_path / "survivor"
    t0 = time.monotonic()
    r = cli(daemon, "run", "--timeout", "0.5", "--", "sh", "-c", f"sleep 3; touch {marker}")
    assert r.returncode == 124
    assert time.monotonic() - t0 < 2.5
    assert "timed out after 0.5s" in r.stderr
    time.sleep(3)
    assert not marker.exists()


def test_run_start_failures_use_shell_codes(daemon: Daemon, tmp_path: Path) -> None:
    r = cli(daemon, "run", "--", "no-such-command-xyz")
    assert r.returncode == 127
    assert "COMMAND_NOT_FOUND" in r.stderr
    script = tmp_path / "not-exec.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    assert cli(daemon, "run", "--", str(script)).returncode == 126
    r = cli(daemon, "run", "--cwd", "/no/such/dir", "--", "true")
    assert r.returncode == 125
    assert "WORKING_DIR_NOT_FOUND" in r.stderr


def test_run_env_cwd_and_user(daemon: Daemon, tmp_path: Path) -> None:
    r = cli(
        daemon, "run", "-e", "A=1", "--env", "B=two words", "--cwd", str(tmp_path),
        "--", "sh", "-c", 'echo "$A|$B|$(pwd)"',
    )  # fmt: skip
    assert r.stdout == f"1|two words|{tmp_path}\n"
    if os.geteuid() != 0:
        return
    r = cli(daemon, "run", "--user", "nobody", "--", "id", "-un")
    assert (r.returncode, r.stdout) == (0, "nobody\n")
    r = cli(daemon, "run", "--user", "65534:65534", "--", "id", "-u")
    assert r.stdout == "65534\n"


def test_run_bad_env_is_a_usage_error(daemon: Daemon) -> None:
    r = cli(daemon, "run", "--env", "NOEQUALS", "--", "true")
    assert r.returncode == 2
    assert "KEY=VALUE" in r.stderr


def test_run_output_is_live(daemon: Daemon) -> None:
    p = popen(daemon, "run", "--", "sh", "-c", "echo first; sleep 3; echo second")
    try:
        out = Lines(p.stdout)
        t0 = time.monotonic()
        assert out.readline(2.5) == "first\n"
        assert time.monotonic() - t0 < 2.5  # well before the process ends
        assert p.wait(10) == 0
        assert out.rest() == "second\n"
    finally:
        p.kill()


def test_run_json_events(daemon: Daemon) -> None:
    r = cli(daemon, "run", "--json", "--", "sh", "-c", "echo hi; exit 4")
    assert r.returncode == 4
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[0]["event"] == "started" and events[0]["pid"] > 0
    assert {"event": "output", "line": "hi", "stream": "stdout"}.items() <= events[1].items()
    assert events[-1]["event"] == "exit" and events[-1]["exit_code"] == 4


def test_run_forwards_ctrl_c_to_the_process(daemon: Daemon) -> None:
    script = 'trap "echo got INT; exit 5" INT; echo ready; while :; do sleep 0.1; done'
    p = popen(daemon, "run", "--", "sh", "-c", script)
    try:
        out = Lines(p.stdout)
        assert out.readline() == "ready\n"
        p.send_signal(signal.SIGINT)
        assert p.wait(10) == 5
        assert "got INT" in out.rest()
    finally:
        p.kill()


def test_run_second_ctrl_c_disconnects_and_the_tree_dies(daemon: Daemon, http) -> None:  # type: ignore[no-untyped-def]
    script = 'trap "" INT; echo ready; exec sleep 60'
    p = popen(daemon, "run", "--json", "--", "sh", "-c", script)
    try:
        out = Lines(p.stdout)
        started = json.loads(out.readline())
        assert "ready" in out.readline()
        p.send_signal(signal.SIGINT)  # forwarded, ignored by the process
        time.sleep(0.5)
        assert p.poll() is None
        p.send_signal(signal.SIGINT)
        assert p.wait(10) == 130
        wait_for(lambda: not pid_alive(started["pid"]))
    finally:
        p.kill()


# --- start, ps, logs, signal, kill, stdin ---


def test_start_prints_the_pid_and_ps_lists_it(daemon: Daemon) -> None:
    r = cli(daemon, "start", "--", "sleep", "30")
    assert r.returncode == 0
    pid = int(r.stdout)
    try:
        table = cli(daemon, "ps").stdout.splitlines()
        assert table[0].split() == ["PID", "NAME", "STATUS", "EXIT", "STARTED", "COMMAND"]
        row = next(line for line in table if line.split()[0] == str(pid))
        assert "running" in row and row.endswith("sleep 30")
        listed = json.loads(cli(daemon, "ps", "--json").stdout)
        assert any(p["pid"] == pid and p["status"] == "running" for p in listed)
        running = json.loads(cli(daemon, "ps", "--running", "--json").stdout)
        assert all(p["status"] == "running" for p in running)
    finally:
        assert cli(daemon, "kill", str(pid)).returncode == 0
    listed = json.loads(cli(daemon, "ps", "--json").stdout)
    assert next(p for p in listed if p["pid"] == pid)["status"] == "signaled"


def test_start_json_and_options(daemon: Daemon, tmp_path: Path) -> None:
    r = cli(
        daemon, "start", "--json", "-e", "X=42", "--cwd", str(tmp_path),
        "--", "sh", "-c", 'echo "$X $(pwd)"',
    )  # fmt: skip
    info = json.loads(r.stdout)
    assert info["command"] == "sh"
    wait_for(lambda: cli(daemon, "logs", str(info["pid"])).stdout == f"42 {tmp_path}\n")


def test_named_process_logs_follow_signal_kill(daemon: Daemon) -> None:
    name = "cli web 1"  # spaces are percent-encoded in the path
    script = 'trap "echo bye; exit 0" TERM; echo hello; echo oops >&2; while :; do sleep 0.1; done'
    r = cli(daemon, "start", "--name", name, "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    try:
        wait_for(lambda: cli(daemon, "logs", name).stdout == "hello\noops\n")
        assert cli(daemon, "logs", "--stream", "stderr", name).stdout == "oops\n"
        body = json.loads(cli(daemon, "logs", "--json", name).stdout)
        assert body["lines"] == ["hello", "oops"]
        row = next(line for line in cli(daemon, "ps").stdout.splitlines() if name in line)
        assert "running" in row
        f = popen(daemon, "logs", "-f", name)
        out = Lines(f.stdout)
        assert out.readline() == "hello\n"
        assert out.readline() == "oops\n"
        assert cli(daemon, "signal", name, "TERM").returncode == 0
        assert f.wait(10) == 0  # the follow ends once the process has ended
        assert out.rest().endswith("bye\n")  # after the shell's note on its killed sleep
    finally:
        cli(daemon, "kill", name)


def test_signal_names_and_numbers(daemon: Daemon) -> None:
    for sig in ("INT", "sigint", "SIGINT", "2"):
        pid = cli(daemon, "start", "--", "sleep", "30").stdout.strip()
        assert cli(daemon, "signal", pid, sig).returncode == 0
        info = json.loads(cli(daemon, "ps", "--json").stdout)
        wait_for(
            lambda pid=pid: (
                next(
                    p
                    for p in json.loads(cli(daemon, "ps", "--json").stdout)
                    if str(p["pid"]) == pid
                )["signal"]
                == 2
            )
        )
        del info
    r = cli(daemon, "signal", "1", "NOPE")
    assert r.returncode == 2


def test_logs_follow_json_lines(daemon: Daemon) -> None:
    pid = cli(daemon, "start", "--", "sh", "-c", "echo a; echo b >&2").stdout.strip()
    r = cli(daemon, "logs", "-f", "--json", pid)
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(e["event"], e.get("line"), e.get("stream")) for e in events] == [
        ("output", "a", "stdout"),
        ("output", "b", "stderr"),
        ("eof", None, None),
    ]


def test_stdin_pipes_local_stdin_and_closes(daemon: Daemon) -> None:
    pid = cli(daemon, "start", "--stdin", "--", "sh", "-c", "tr a-z A-Z; echo done").stdout.strip()
    r = cli(daemon, "stdin", pid, input=b"hello\nworld\n")
    assert r.returncode == 0, r.stderr
    # stdin was closed at EOF, so tr finished and the script went on.
    wait_for(lambda: cli(daemon, "logs", pid).stdout == "HELLO\nWORLD\ndone\n")


def test_stdin_is_live_and_keep_open(daemon: Daemon) -> None:
    pid = cli(daemon, "start", "--stdin", "--", "cat").stdout.strip()
    p = popen(daemon, "stdin", "--keep-open", pid, stdin=subprocess.PIPE)
    try:
        p.stdin.write(b"line one\n")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]
        wait_for(lambda: cli(daemon, "logs", pid).stdout == "line one\n")
        p.stdin.close()  # type: ignore[union-attr]
        assert p.wait(10) == 0
        info = next(
            q for q in json.loads(cli(daemon, "ps", "--json").stdout) if str(q["pid"]) == pid
        )
        assert info["status"] == "running" and info["stdin_writable"] is True
    finally:
        cli(daemon, "kill", pid)


def test_stdin_to_a_process_without_a_pipe_fails_clearly(daemon: Daemon) -> None:
    pid = cli(daemon, "start", "--", "sleep", "30").stdout.strip()
    try:
        r = cli(daemon, "stdin", pid, input=b"x")
        assert r.returncode == 1
        assert "STDIN_NOT_WRITABLE" in r.stderr
    finally:
        cli(daemon, "kill", pid)


# --- cp and ls ---


def test_cp_both_ways_with_progress(daemon: Daemon, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    data = os.urandom(3 << 20)
    src.write_bytes(data)
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    r = cli(daemon, "cp", "--progress", str(src), f":{remote_dir}/")
    assert r.returncode == 0, r.stderr
    assert (remote_dir / "big.bin").read_bytes() == data
    assert "100.0%" in r.stderr and "3.0 MiB/3.0 MiB" in r.stderr
    # Into an existing remote directory named without the slash.
    assert cli(daemon, "cp", "--no-progress", str(src), f":{remote_dir}").stderr == ""
    local = tmp_path / "local"
    local.mkdir()
    r = cli(daemon, "cp", "--progress", f":{remote_dir}/big.bin", str(local))
    assert r.returncode == 0, r.stderr
    assert (local / "big.bin").read_bytes() == data
    assert "100.0%" in r.stderr
    assert not [p for p in local.iterdir() if p.name.startswith(".sandboxd-cp-")]


def test_cp_no_bar_when_not_a_terminal(daemon: Daemon, tmp_path: Path) -> None:
    src = tmp_path / "f.txt"
    src.write_bytes(b"x" * (2 << 20))
    r = cli(daemon, "cp", str(src), f":{tmp_path}/g.txt")
    assert (r.returncode, r.stderr) == (0, "")


def test_cp_stdin_and_stdout(daemon: Daemon, tmp_path: Path) -> None:
    target = tmp_path / "from-stdin.txt"
    assert cli(daemon, "cp", "-", f":{target}", input=b"piped\n").returncode == 0
    assert target.read_text() == "piped\n"
    r = cli(daemon, "cp", f":{target}", "-")
    assert r.stdout == "piped\n"


def test_cp_errors(daemon: Daemon, tmp_path: Path) -> None:
    r = cli(daemon, "cp", "a", "b")
    assert r.returncode == 2 and "leading ':'" in r.stderr
    r = cli(daemon, "cp", ":/no/such/file", str(tmp_path / "x"))
    assert r.returncode == 5 and "NOT_FOUND" in r.stderr
    assert not (tmp_path / "x").exists()
    r = cli(daemon, "cp", str(tmp_path / "missing"), ":/tmp/x")
    assert r.returncode == 2 and "no such file" in r.stderr
    r = cli(daemon, "cp", ":/tmp/../etc/passwd", str(tmp_path / "y"))
    assert r.returncode == 1 and "PATH_TRAVERSAL" in r.stderr


def test_ls(daemon: Daemon, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "file.txt").write_bytes(b"12345")
    r = cli(daemon, "ls", str(tmp_path))
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["TYPE", "SIZE", "MODIFIED", "NAME"]
    assert lines[1].split()[0] == "dir" and lines[1].endswith("sub/")
    assert any(
        line.startswith("file") and line.endswith("file.txt") and "5 B" in line for line in lines
    )
    body = json.loads(cli(daemon, "ls", "--json", str(tmp_path)).stdout)
    assert {e["name"] for e in body["entries"]} >= {"sub", "file.txt"}
    # A file: its own line, as ls(1) shows it.
    r = cli(daemon, "ls", str(tmp_path / "file.txt"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[1].split()[:3] == ["file", "5", "B"]
    assert lines[1].endswith(str(tmp_path / "file.txt"))
    body = json.loads(cli(daemon, "ls", "--json", str(tmp_path / "file.txt")).stdout)
    (entry,) = body["entries"]
    assert (entry["is_dir"], entry["size"]) == (False, 5)
    assert abs(entry["modified_at"] / 1000 - (tmp_path / "file.txt").stat().st_mtime) < 2
    r = cli(daemon, "ls", str(tmp_path / "missing"))
    assert r.returncode == 5 and "NOT_FOUND" in r.stderr


@pytest.mark.parametrize("columns", [30, 60, 100])
def test_the_progress_bar_fits_the_terminal_width(
    daemon: Daemon, tmp_path: Path, columns: int
) -> None:
    deep = tmp_path / ("a-rather-long-directory-name-" * 3)
    deep.mkdir()
    src = deep / "big.bin"
    src.write_bytes(os.urandom(2 << 20))
    r = cli(
        daemon,
        "cp",
        "--progress",
        str(src),
        f":{tmp_path}/copy.bin",
        env={"COLUMNS": str(columns)},
    )
    assert r.returncode == 0, r.stderr
    # Text mode turned each \r into a line break: one line per redraw.
    drawn = [d.replace("\x1b[K", "") for d in r.stderr.splitlines() if d.strip()]
    assert drawn and "100.0%" in drawn[-1]
    assert all(len(d) < columns for d in drawn), drawn
    if columns >= 60:
        assert "[" in drawn[-1] and "copy.bin" in drawn[-1]


def test_console_script_is_installed() -> None:
    import shutil
    import sys

    exe = shutil.which("sandboxd", path=os.path.dirname(sys.executable))
    assert exe is not None, "the sandboxd console script is missing from the venv"
    assert CLI[0] == sys.executable
