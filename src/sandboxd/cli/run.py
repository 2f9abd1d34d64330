"""``sandboxd run -- CMD ARGS``: run a command in the sandbox as if it ran here.

Output is streamed live (stdout lines to stdout, stderr lines to stderr) and
the command's exit becomes ours, the way a shell reports it:

* exit code N → N;
* killed by signal N → 128 + N (an OOM kill is SIGKILL: 137);
* killed because ``--timeout`` expired → 124, like ``timeout(1)``, so a script
  can tell a timeout from the command's own failure;
* the command could not start → 127 (not found), 126 (not executable) or 125
  (any other refusal, or the daemon is unreachable), like ``env(1)`` and
  ``docker run``.

Ctrl-C (SIGINT) and SIGTERM are forwarded to the remote process once; a second
one disconnects, which makes the daemon kill the run's whole tree.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from typing import Any

from .client import Client, sse_events, warn
from .common import EXIT_INTERRUPTED, CliError
from .procs import add_spawn_options, spawn_body

EXIT_TIMED_OUT = 124
EXIT_CANNOT_RUN = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
_START_CODES = {
    "COMMAND_NOT_FOUND": EXIT_NOT_FOUND,
    "INTERPRETER_NOT_FOUND": EXIT_NOT_FOUND,
    "NOT_EXECUTABLE": EXIT_NOT_EXECUTABLE,
}


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "run",
        parents=[parent],
        help="run a command, stream its output, exit with its exit code",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="kill the command's tree after this long"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the daemon's events as JSON lines (started, output, exit) instead of the output",
    )
    add_spawn_options(p)
    p.set_defaults(handler=run)


def exit_status(event: dict[str, Any]) -> int:
    """The shell-style exit status of a run's ``exit`` event."""
    if event.get("reason") == "timed_out":
        return EXIT_TIMED_OUT
    if event.get("exit_code") is not None:
        return int(event["exit_code"])
    return 128 + int(event.get("signal") or 0)


def _describe(event: dict[str, Any], timeout: float | None) -> str | None:
    """A note for stderr when the exit is not a plain exit code."""
    reason = event.get("reason")
    if reason == "timed_out":
        return (
            f"timed out after {timeout:g}s; the process tree was killed" if timeout else "timed out"
        )
    if reason == "oom_killed" or event.get("oom_killed"):
        return "killed by the OOM killer (memory limit)"
    sig = event.get("signal")
    if event.get("exit_code") is None and sig is not None:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(int(sig)).name}"
        return f"killed by signal {sig}"
    return None


async def run(ns: argparse.Namespace, client: Client) -> int:
    body = spawn_body(ns)
    if ns.timeout is not None:
        body["timeout"] = ns.timeout
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    pid: int | None = None
    forwarded: set[int] = set()
    pending: set[asyncio.Task[Any]] = set()

    def on_signal(sig: int) -> None:
        # First signal: pass it on and let the command decide. Second: give up.
        if pid is None or sig in forwarded:
            if me is not None:
                me.cancel()
            return
        forwarded.add(sig)
        task = loop.create_task(_forward(client, pid, sig))
        pending.add(task)
        task.add_done_callback(pending.discard)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        try:
            async with client.request(
                "POST", "/api/v1/processes/run", json_body=body, stream=True
            ) as resp:
                async for event in sse_events(resp):
                    data = event.data
                    if ns.json:
                        sys.stdout.write(
                            json.dumps({"event": event.name, **data}, separators=(",", ":")) + "\n"
                        )
                        sys.stdout.flush()
                    if "pid" in data and "started_at" in data:
                        pid = int(data["pid"])
                    elif "line" in data:
                        if not ns.json:
                            out = sys.stderr if data.get("stream") == "stderr" else sys.stdout
                            out.write(str(data["line"]) + "\n")
                            out.flush()
                    elif event.name == "dropped":
                        warn(
                            f"{data.get('dropped_bytes')} bytes of output were dropped (--output-cap)"
                        )
                    elif data.get("exit_code") is not None or data.get("signal") is not None:
                        note = _describe(data, ns.timeout)
                        if note and not ns.json:
                            warn(note)
                        return exit_status(data)
        except CliError as exc:
            code = getattr(exc, "code", None)
            exc.exit_code = _START_CODES.get(code or "", EXIT_CANNOT_RUN)
            raise
        raise CliError("the daemon ended the stream without an exit event", EXIT_CANNOT_RUN)
    except asyncio.CancelledError:
        warn("interrupted; the process tree is killed when this command disconnects")
        return EXIT_INTERRUPTED
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _forward(client: Client, pid: int, sig: int) -> None:
    with contextlib.suppress(CliError):
        await client.call("POST", f"/api/v1/processes/{pid}/signal", json_body={"signal": sig})
