"""``sandboxd pty``: an interactive attach, driven through a real pseudo-terminal (pexpect)."""

from __future__ import annotations

import sys
from pathlib import Path

import pexpect

from sandboxd.engine.pty import session_members

from .cli_helpers import CLI, cli_env
from .conftest import Daemon, wait_for

PROMPT = "sbx-prompt> "


def spawn(daemon: Daemon, *args: str, rows: int = 30, cols: int = 100):  # type: ignore[no-untyped-def]
    child = pexpect.spawn(
        CLI[0],
        [*CLI[1:], "pty", *args],
        env=cli_env(daemon),
        dimensions=(rows, cols),
        encoding="utf-8",
        timeout=15,
    )
    child.logfile_read = sys.stdout  # shows the session in pytest's captured output on failure
    return child


def shell(daemon: Daemon, **kw: int):  # type: ignore[no-untyped-def]
    return spawn(daemon, "-e", f"PS1={PROMPT}", "--", "/bin/sh", **kw)


def test_interactive_shell_exit_code_and_cleanup(daemon: Daemon, http) -> None:  # type: ignore[no-untyped-def]
    before = {s["session_id"] for s in http.get("/api/v1/pty").json()["sessions"]}
    child = shell(daemon)
    child.expect_exact(PROMPT)
    child.sendline("echo $((6 * 7))")
    child.expect_exact("42")
    child.expect_exact(PROMPT)
    child.sendline("exit 7")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 7
    after = {s["session_id"] for s in http.get("/api/v1/pty").json()["sessions"]}
    assert after <= before  # the CLI deleted its session


def sizes(http) -> set[tuple[int, int]]:  # type: ignore[no-untyped-def]
    return {(s["rows"], s["cols"]) for s in http.get("/api/v1/pty").json()["sessions"]}


def sleeping_in_a_session(http) -> bool:  # type: ignore[no-untyped-def]
    """A ``sleep`` runs in the (live) session of some PTY of the daemon."""
    live = [s["pid"] for s in http.get("/api/v1/pty").json()["sessions"] if s["is_alive"]]
    return any(_comm(pid) == "sleep" for leader in live for pid in session_members(leader))


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def test_initial_size_and_resize_pass_through(daemon: Daemon, http) -> None:  # type: ignore[no-untyped-def]
    child = shell(daemon, rows=30, cols=100)
    child.expect_exact(PROMPT)
    child.sendline("stty size")
    child.expect_exact("30 100")
    child.expect_exact(PROMPT)
    child.setwinsize(40, 132)  # the kernel sends SIGWINCH to the CLI
    wait_for(lambda: (40, 132) in sizes(http))  # the CLI passed it on to the daemon
    child.sendline("stty size")
    child.expect_exact("40 132")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_goes_to_the_remote_program(daemon: Daemon, http) -> None:  # type: ignore[no-untyped-def]
    child = shell(daemon)
    child.expect_exact(PROMPT)
    child.sendline("sleep 30; echo $((40 + 2))-not-interrupted")
    wait_for(lambda: sleeping_in_a_session(http))  # the job runs: ^C is for it
    child.sendcontrol("c")  # raw mode: the byte goes to the remote terminal, not our SIGINT
    child.expect_exact(PROMPT)
    assert "42-not-interrupted" not in str(child.before)  # the shell stopped the whole line
    assert child.isalive()
    child.sendline("echo still-here")
    child.expect_exact("still-here")
    child.sendline("exit 0")
    child.expect(pexpect.EOF)


def test_signal_exit_is_128_plus_n(daemon: Daemon) -> None:
    child = spawn(daemon, "--", "sh", "-c", "kill -KILL $$")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 137


def test_local_terminal_is_restored(daemon: Daemon, tmp_path: Path) -> None:
    """The terminal settings after the attach are the ones before it."""
    before, after = tmp_path / "before", tmp_path / "after"
    script = (
        f"stty -g > {before}; {' '.join(CLI)} pty -- sh -c 'exit 3'; echo rc=$?; stty -g > {after}"
    )
    child = pexpect.spawn(
        "/bin/sh", ["-c", script], env=cli_env(daemon), encoding="utf-8", timeout=15
    )
    child.expect(r"rc=(\d+)")
    assert child.match.group(1) == "3"
    child.expect(pexpect.EOF)
    assert before.read_text() == after.read_text()
    assert before.read_text().strip()


def test_unknown_command_fails_clearly(daemon: Daemon) -> None:
    child = spawn(daemon, "--", "no-such-command-xyz")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert "COMMAND_NOT_FOUND" in str(child.before)


def test_attach_with_a_token(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(token="pty-cli-token")
    child = spawn(d, "--", "sh", "-c", "echo attached-ok; exit 4")
    child.expect_exact("attached-ok")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 4
    assert "pty-cli-token" not in d.log()
