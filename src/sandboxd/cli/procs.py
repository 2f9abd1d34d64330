"""Process subcommands: ``ps``, ``start``, ``logs``, ``kill``, ``signal``, ``stdin``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .client import Client, selector, sse_events, warn
from .common import (
    EXIT_OK,
    add_json_flag,
    age_ms,
    command_argv,
    parse_env_pairs,
    parse_signal,
    print_json,
    print_table,
    read_chunks,
    shell_join,
)

STDIN_CHUNK = 1 << 20


def add_spawn_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``start`` and ``run``: how the process is started."""
    p.add_argument(
        "-e", "--env", action="append", metavar="KEY=VALUE", help="set a variable (repeatable)"
    )
    p.add_argument("--cwd", metavar="DIR", help="working directory (default: the daemon's)")
    p.add_argument(
        "--user", metavar="USER", help="run as USER: a name, UID or UID:GID (default: the daemon's)"
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")


def spawn_body(ns: argparse.Namespace) -> dict[str, Any]:
    argv = command_argv(ns.command)
    body: dict[str, Any] = {"command": argv[0], "args": argv[1:]}
    env = parse_env_pairs(ns.env)
    if env:
        body["env"] = env
    if ns.cwd:
        body["working_dir"] = ns.cwd
    if ns.user:
        body["user"] = ns.user
    return body


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "ps",
        parents=[parent],
        help="list processes",
        description="List the processes the daemon knows, running and exited.",
    )
    p.add_argument("-r", "--running", action="store_true", help="only running processes")
    add_json_flag(p)
    p.set_defaults(handler=ps)

    p = sub.add_parser(
        "start",
        parents=[parent],
        help="start a process in the background and print its pid",
        description="Start a process in the background and print its pid. "
        "Follow it with `sandboxd logs -f PID`.",
    )
    p.add_argument("--name", help="name the process (it becomes managed: addressable by name)")
    p.add_argument(
        "--restart",
        choices=("never", "on_failure", "always"),
        help="restart policy (makes the process managed)",
    )
    p.add_argument(
        "--stdin", action="store_true", help="keep stdin open as a pipe (for `sandboxd stdin`)"
    )
    add_json_flag(p, "print the process's JSON record instead of its pid")
    add_spawn_options(p)
    p.set_defaults(handler=start)

    p = sub.add_parser(
        "logs",
        parents=[parent],
        help="print a process's output",
        description="Print the retained output of a process (stdout and stderr in arrival order).",
    )
    p.add_argument("target", metavar="PID|NAME")
    p.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing new output until the process ends",
    )
    p.add_argument(
        "--stream",
        choices=("output", "stdout", "stderr"),
        default="output",
        help="which output (default output: both)",
    )
    add_json_flag(p, "print JSON (with -f: one event per line)")
    p.set_defaults(handler=logs)

    p = sub.add_parser(
        "kill",
        parents=[parent],
        help="kill a process and its whole tree",
        description="Kill a process and its whole tree (a managed process is stopped: SIGTERM, "
        "then SIGKILL after its stop grace, and never restarted).",
    )
    p.add_argument("target", metavar="PID|NAME")
    p.set_defaults(handler=kill)

    p = sub.add_parser(
        "signal",
        parents=[parent],
        help="send a signal to a process group",
        description="Send a signal to a process's process group.",
    )
    p.add_argument("target", metavar="PID|NAME")
    p.add_argument("signal", metavar="SIGNAL", help="a name (TERM, SIGINT, hup) or a number")
    p.set_defaults(handler=send_signal)

    p = sub.add_parser(
        "stdin",
        parents=[parent],
        help="pipe local stdin into a process",
        description="Copy this command's stdin to a process started with --stdin, as it arrives; "
        "close the process's stdin at the end.",
    )
    p.add_argument("target", metavar="PID|NAME")
    p.add_argument(
        "--keep-open", action="store_true", help="do not close the process's stdin at local EOF"
    )
    p.set_defaults(handler=stdin)


def _status(info: dict[str, Any]) -> str:
    status = str(info.get("status", "?"))
    managed = info.get("managed")
    if isinstance(managed, dict) and managed.get("status") not in (None, "running"):
        status += f" ({managed['status']})"
    return status


def _exit(info: dict[str, Any]) -> str:
    if info.get("exit_code") is not None:
        return str(info["exit_code"])
    if info.get("signal") is not None:
        return f"sig {info['signal']}"
    return "-"


async def ps(ns: argparse.Namespace, client: Client) -> int:
    body = await client.call("GET", "/api/v1/processes")
    procs = [p for p in body.get("processes", []) if not ns.running or p.get("status") == "running"]
    if ns.json:
        print_json(procs)
        return EXIT_OK
    rows = []
    for p in procs:
        managed = p.get("managed") or {}
        rows.append(
            (
                p.get("pid"),
                managed.get("name") or "-",
                _status(p),
                _exit(p),
                age_ms(p.get("started_at")),
                shell_join([p.get("command", ""), *p.get("args", [])]),
            )
        )
    print_table(("PID", "NAME", "STATUS", "EXIT", "STARTED", "COMMAND"), rows)
    return EXIT_OK


async def start(ns: argparse.Namespace, client: Client) -> int:
    body = spawn_body(ns)
    if ns.name:
        body["name"] = ns.name
    if ns.restart:
        body["restart"] = {"policy": ns.restart}
    if ns.stdin:
        body["stdin_mode"] = "pipe"
    info = await client.call("POST", "/api/v1/processes", json_body=body)
    if ns.json:
        print_json(info)
    else:
        print(info["pid"])
    return EXIT_OK


async def logs(ns: argparse.Namespace, client: Client) -> int:
    path = f"/api/v1/processes/{selector(ns.target)}/{ns.stream}"
    out = sys.stdout
    if not ns.follow:
        body = await client.call("GET", path)
        if ns.json:
            print_json(body)
            return EXIT_OK
        dropped = body.get("dropped_bytes")
        if dropped:
            warn(f"{dropped} bytes of older output were dropped (the daemon's --output-cap)")
        for line in body.get("lines", []):
            out.write(line + "\n")
        return EXIT_OK
    async with client.request("GET", path + "/follow", stream=True) as resp:
        async for event in sse_events(resp):
            if ns.json:
                out.write(_json_line({"event": event.name, **event.data}))
            elif "line" in event.data:
                out.write(str(event.data["line"]) + "\n")
            elif event.name == "dropped":
                out.flush()
                warn(
                    f"{event.data.get('dropped_bytes')} bytes of output were dropped (--output-cap)"
                )
            out.flush()
    return EXIT_OK


def _json_line(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":")) + "\n"


async def kill(ns: argparse.Namespace, client: Client) -> int:
    await client.call("DELETE", f"/api/v1/processes/{selector(ns.target)}")
    return EXIT_OK


async def send_signal(ns: argparse.Namespace, client: Client) -> int:
    sig = parse_signal(ns.signal)
    await client.call(
        "POST", f"/api/v1/processes/{selector(ns.target)}/signal", json_body={"signal": sig}
    )
    return EXIT_OK


async def stdin(ns: argparse.Namespace, client: Client) -> int:
    """One POST per chunk read: what a person types arrives line by line, at once.

    Sequential POSTs keep the order; a pipe's chunks are up to 1 MiB each.
    """
    path = f"/api/v1/processes/{selector(ns.target)}/stdin"
    async for data in read_chunks(sys.stdin.fileno(), STDIN_CHUNK):
        async with client.request("POST", path, data=data):
            pass
    if not ns.keep_open:
        async with client.request("POST", path + "/close"):
            pass
    return EXIT_OK
