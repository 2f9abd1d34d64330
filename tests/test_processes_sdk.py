"""Conformance: every /api/v1/processes call, driven through the official SDK."""

from __future__ import annotations

import os
import time

import pytest
from tensorlake.sandbox import StdinMode
from tensorlake.sandbox.exceptions import RemoteAPIError

from .conftest import Daemon, pid_alive, wait_for


def stdout_lines(sbx, pid: int, n: int) -> list[str]:  # type: ignore[no-untyped-def]
    """Wait until the process printed at least ``n`` lines."""
    return wait_for(lambda: len(out := sbx.get_stdout(pid).lines) >= n and out)  # type: ignore[return-value]


def wait_exit(sbx, pid: int, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    return wait_for(
        lambda: (info := sbx.get_process(pid)).status != "running" and info, timeout=timeout
    )


def test_health_and_info(sbx) -> None:  # type: ignore[no-untyped-def]
    assert sbx.health().healthy is True
    before = sbx.daemon_info()
    assert before.version
    assert before.uptime_secs >= 0
    p = sbx.start_process("sleep", args=["5"])
    info = sbx.daemon_info()
    assert info.running_processes >= 1
    assert info.total_processes >= before.total_processes + 1
    sbx.kill_process(p.pid)


def test_start_get_list(sbx) -> None:  # type: ignore[no-untyped-def]
    p = sbx.start_process(
        "sh", args=["-c", "sleep 0.2; exit 3"], env={"A": "1"}, working_dir="/tmp"
    )
    assert p.status == "running"
    assert p.command == "sh"
    assert p.args == ["-c", "sleep 0.2; exit 3"]
    assert p.handle is not None and p.handle >= 1
    assert p.exit_code is None and p.ended_at is None
    assert p.stdin_writable is False
    got = sbx.get_process(p.pid)
    assert got.pid == p.pid and got.handle == p.handle
    assert any(q.pid == p.pid for q in sbx.list_processes())
    done = wait_exit(sbx, p.pid)
    assert done.status == "exited"
    assert done.exit_code == 3
    assert done.signal is None
    assert done.ended_at is not None and done.ended_at >= done.started_at


def test_handles_are_per_spawn(sbx) -> None:  # type: ignore[no-untyped-def]
    a = sbx.start_process("true")
    b = sbx.start_process("true")
    assert b.handle == a.handle + 1


def test_env_merge_and_working_dir(sbx, tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = sbx.run(
        "sh",
        args=["-c", 'echo "$A|$PATH_SET|$(pwd)"'],
        env={"A": "x y", "PATH_SET": "1"},
        working_dir=str(tmp_path),
    )
    assert r.exit_code == 0
    assert r.stdout == f"x y|1|{tmp_path}"
    # The daemon's own environment is the base the request's env is merged over.
    r = sbx.run("sh", args=["-c", 'test -n "$PATH" && echo has-path'])
    assert r.stdout == "has-path"


def test_no_shell_argv_is_exact(sbx) -> None:  # type: ignore[no-untyped-def]
    r = sbx.run("printf", args=["%s|", "a b", "$HOME", "*", ""])
    assert r.stdout == "a b|$HOME|*||"


def test_signal_goes_to_the_group(sbx) -> None:  # type: ignore[no-untyped-def]
    p = sbx.start_process("sh", args=["-c", "sleep 100 & echo $!; wait"])
    child = int(stdout_lines(sbx, p.pid, 1)[0])
    assert sbx.send_signal(p.pid, 15).success is True
    info = wait_exit(sbx, p.pid)
    assert info.status == "signaled"
    assert info.signal == 15
    assert info.exit_code is None
    wait_for(lambda: not pid_alive(child))


def test_signal_errors(sbx) -> None:  # type: ignore[no-untyped-def]
    p = sbx.start_process("true")
    wait_exit(sbx, p.pid)
    with pytest.raises(RemoteAPIError) as err:
        sbx.send_signal(p.pid, 15)
    assert err.value.code == "PROCESS_NOT_RUNNING"
    q = sbx.start_process("sleep", args=["10"])
    with pytest.raises(RemoteAPIError) as err:
        sbx.send_signal(q.pid, 999)
    assert err.value.code == "INVALID_SIGNAL"
    sbx.kill_process(q.pid)


def test_kill_is_idempotent_and_reports_sigkill(sbx) -> None:  # type: ignore[no-untyped-def]
    p = sbx.start_process("sleep", args=["100"])
    sbx.kill_process(p.pid)
    info = sbx.get_process(p.pid)  # DELETE waits for the exit
    assert info.status == "signaled"
    assert info.signal == 9
    sbx.kill_process(p.pid)  # again: 204, not an error
    assert sbx.get_process(p.pid).status == "signaled"


def test_kill_takes_the_whole_tree_including_setsid(sbx) -> None:  # type: ignore[no-untyped-def]
    script = (
        "sleep 300 & echo $!; "
        "setsid sh -c 'sleep 300 & echo $!; wait' & "
        "sh -c 'sleep 300 & echo $!; wait' & "
        "wait"
    )
    p = sbx.start_process("sh", args=["-c", script])
    pids = [int(x) for x in stdout_lines(sbx, p.pid, 3)]
    assert all(pid_alive(x) for x in pids)
    sbx.kill_process(p.pid)
    wait_for(lambda: not any(pid_alive(x) for x in pids), timeout=5)


def test_stdin_write_and_close(sbx) -> None:  # type: ignore[no-untyped-def]
    p = sbx.start_process("cat", stdin_mode=StdinMode.PIPE)
    assert p.stdin_writable is True
    sbx.write_stdin(p.pid, b"hello\n")
    sbx.write_stdin(p.pid, b"")
    sbx.write_stdin(p.pid, b"wor")
    sbx.write_stdin(p.pid, b"ld\n")
    sbx.close_stdin(p.pid)
    sbx.close_stdin(p.pid)  # a repeated close is fine
    info = wait_exit(sbx, p.pid)
    assert info.exit_code == 0
    assert info.stdin_writable is False
    assert sbx.get_stdout(p.pid).lines == ["hello", "world"]


def test_stdin_not_writable(sbx) -> None:  # type: ignore[no-untyped-def]
    p = sbx.start_process("sleep", args=["10"])
    with pytest.raises(RemoteAPIError) as err:
        sbx.write_stdin(p.pid, b"x")
    assert err.value.code == "STDIN_NOT_WRITABLE"
    with pytest.raises(RemoteAPIError) as err:
        sbx.close_stdin(p.pid)
    assert err.value.code == "STDIN_NOT_WRITABLE"
    sbx.kill_process(p.pid)
    q = sbx.start_process("true", stdin_mode=StdinMode.PIPE)
    wait_exit(sbx, q.pid)
    with pytest.raises(RemoteAPIError) as err:
        sbx.write_stdin(q.pid, b"late")
    assert err.value.code == "STDIN_NOT_WRITABLE"


def test_stdout_stderr_output(sbx) -> None:  # type: ignore[no-untyped-def]
    script = "echo o1; sleep 0.05; echo e1 >&2; sleep 0.05; echo o2; sleep 0.05; printf 'e2' >&2"
    p = sbx.start_process("sh", args=["-c", script])
    wait_exit(sbx, p.pid)
    out = sbx.get_stdout(p.pid)
    assert out.pid == p.pid
    assert out.lines == ["o1", "o2"]
    assert out.line_count == 2
    assert sbx.get_stderr(p.pid).lines == ["e1", "e2"]
    # Combined output is in arrival order, not all stdout then all stderr.
    assert sbx.get_output(p.pid).lines == ["o1", "e1", "o2", "e2"]


def test_output_modes_discard(sbx) -> None:  # type: ignore[no-untyped-def]
    from tensorlake.sandbox import OutputMode

    p = sbx.start_process(
        "sh", args=["-c", "echo out; echo err >&2"], stdout_mode=OutputMode.DISCARD
    )
    wait_exit(sbx, p.pid)
    assert sbx.get_stdout(p.pid).lines == []
    assert sbx.get_stderr(p.pid).lines == ["err"]


def test_follow_streams_live_then_eof(sbx) -> None:  # type: ignore[no-untyped-def]
    script = "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; sleep 0.05; done"
    p = sbx.start_process("sh", args=["-c", script])
    t0 = time.monotonic()
    events = list(sbx.follow_output(p.pid))
    assert time.monotonic() - t0 < 10
    assert [e.line for e in events if e.stream == "stdout"] == [f"out{i}" for i in range(1, 6)]
    assert [e.line for e in events if e.stream == "stderr"] == [f"err{i}" for i in range(1, 6)]
    assert all(e.timestamp.year >= 2024 for e in events)
    stdout = list(sbx.follow_stdout(p.pid))
    assert [e.line for e in stdout] == [f"out{i}" for i in range(1, 6)]
    assert all(e.stream is None for e in stdout)
    assert [e.line for e in sbx.follow_stderr(p.pid)] == [f"err{i}" for i in range(1, 6)]


def test_follow_has_no_gap_or_duplicate(sbx) -> None:  # type: ignore[no-untyped-def]
    # Output starts before the follower attaches and goes on after: replay + live.
    script = "i=0; while [ $i -lt 400 ]; do echo line$i; i=$((i+1)); [ $((i % 50)) = 0 ] && sleep 0.05; done"
    p = sbx.start_process("sh", args=["-c", script])
    wait_for(lambda: sbx.get_stdout(p.pid).lines)  # attach once output has begun
    lines = [e.line for e in sbx.follow_stdout(p.pid)]
    assert lines == [f"line{i}" for i in range(400)]


def test_follow_after_exit_replays_and_closes(sbx) -> None:  # type: ignore[no-untyped-def]
    p = sbx.start_process("sh", args=["-c", "echo a; echo b"])
    wait_exit(sbx, p.pid)
    t0 = time.monotonic()
    assert [e.line for e in sbx.follow_stdout(p.pid)] == ["a", "b"]
    assert time.monotonic() - t0 < 2


def test_run_collects_output_and_exit(sbx) -> None:  # type: ignore[no-untyped-def]
    r = sbx.run("sh", args=["-c", "echo hello; echo oops >&2; exit 4"])
    assert r.exit_code == 4
    assert r.stdout == "hello"
    assert r.stderr == "oops"
    assert r.reason == "exited"


def test_run_signaled(sbx) -> None:  # type: ignore[no-untyped-def]
    r = sbx.run("sh", args=["-c", "kill -TERM $$"])
    assert r.exit_code == -15
    assert r.reason == "signaled"


def test_run_timeout_kills_the_tree(sbx) -> None:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    r = sbx.run("sh", args=["-c", "setsid sleep 300 & echo $!; sleep 300"], timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert r.reason == "timed_out"
    assert r.exit_code == -9
    escaped = int(r.stdout.split()[0])
    wait_for(lambda: not pid_alive(escaped), timeout=5)


def test_run_does_not_hang_on_a_background_child(sbx) -> None:  # type: ignore[no-untyped-def]
    # The grandchild keeps the stdout pipe open for 60 s; run must end after the drain grace.
    t0 = time.monotonic()
    r = sbx.run("sh", args=["-c", "echo before; sleep 60 & echo started"])
    assert time.monotonic() - t0 < 5
    assert r.exit_code == 0
    assert r.stdout == "before\nstarted"


def test_not_found_is_a_remote_api_error(sbx) -> None:  # type: ignore[no-untyped-def]
    for call in (sbx.get_process, sbx.kill_process, sbx.get_stdout, sbx.follow_stdout):
        with pytest.raises(RemoteAPIError) as err:
            call(4_000_000)
        assert err.value.code == "NOT_FOUND"
        assert "404" in str(err.value)


def test_start_failures_are_specific_4xx(sbx, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cases = {
        "COMMAND_NOT_FOUND": dict(command="definitely-not-a-command-xyz"),
        "WORKING_DIR_NOT_FOUND": dict(command="true", working_dir=str(tmp_path / "missing")),
        "USER_NOT_FOUND": dict(command="true", user="no-such-user-xyz"),
    }
    script = tmp_path / "noexec.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    cases["NOT_EXECUTABLE"] = dict(command=str(script))
    bad_interp = tmp_path / "badinterp.sh"
    bad_interp.write_text("#!/no/such/interpreter\n")
    bad_interp.chmod(0o755)
    cases["INTERPRETER_NOT_FOUND"] = dict(command=str(bad_interp))
    for code, kwargs in cases.items():
        with pytest.raises(RemoteAPIError) as err:
            sbx.start_process(**kwargs)
        assert err.value.code == code, (code, str(err.value))
        assert "(status 4" in str(err.value)
        with pytest.raises(RemoteAPIError) as err:
            sbx.run(**kwargs)
        assert err.value.code == code


def test_run_as_another_user(sbx, tmp_path) -> None:  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("switching users needs the daemon to run as root")
    r = sbx.run("sh", args=["-c", 'id -u; id -g; echo "$HOME|$USER|$LOGNAME"'], user="nobody")
    assert r.exit_code == 0, r.stderr
    uid, gid, names = r.stdout.splitlines()
    assert gid == "65534"  # nobody's primary group, nogroup
    assert uid == "65534"
    assert names.endswith("|nobody|nobody")
    r = sbx.run("id", args=["-u"], user="1234:4321")
    assert r.stdout == "1234"
    r = sbx.run("id", args=["-G"], user={"uid": 1000, "gid": 1000})
    assert r.stdout.split() == ["1000"]
    # Supplementary groups of a named user are set: root's own groups, as "root".
    r = sbx.run("id", args=["-G"], user="root")
    assert set(r.stdout.split()) == {str(g) for g in os.getgrouplist("root", 0)}


def test_processes_survive_in_list_after_exit(daemon: Daemon, sbx) -> None:  # type: ignore[no-untyped-def]
    p = sbx.start_process("true")
    wait_exit(sbx, p.pid)
    assert any(q.handle == p.handle and q.status == "exited" for q in sbx.list_processes())
