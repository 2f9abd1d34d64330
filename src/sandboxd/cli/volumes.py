"""``sandboxd host volumes create|ls|rm``: a running host's volumes (docs/self-hosted.md).

Talks to the host over its API (``/v1/namespaces/{ns}/volumes``), like the
``sbx`` commands: the host decides whether a volume is in use.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from .client import Client, selector
from .common import (
    DEFAULT_HOST_URL,
    EXIT_OK,
    add_json_flag,
    host_subcommands,
    print_json,
    print_table,
    target_parser,
)


def _path(namespace: str) -> str:
    return f"/v1/namespaces/{selector(namespace)}/volumes"


def register(host: argparse.ArgumentParser) -> None:
    """``volumes`` under ``sandboxd host`` (which still runs the host when given none)."""
    # One subparsers action per parser: join the one keys/drain/ssh-keys made, if any.
    cmds = host_subcommands(host)
    top = cmds.add_parser(
        "volumes",
        help="a running host's volumes: create, ls, rm",
        description="Named directories the host keeps and mounts into sandboxes "
        "(Sandbox.create(file_systems=[...]), attach_file_system).",
    )
    sub = top.add_subparsers(dest="volumes_cmd", metavar="VOLUMES_COMMAND")
    top.set_defaults(run=_usage(top))
    parent = target_parser(sandbox=False)

    p = sub.add_parser("ls", parents=[parent], help="list volumes", description="List volumes.")
    add_json_flag(p)
    p.set_defaults(run=_runner(ls))

    p = sub.add_parser(
        "create", parents=[parent], help="create a volume", description="Create an empty volume."
    )
    p.add_argument("name", metavar="NAME")
    add_json_flag(p, "print the host's JSON answer")
    p.set_defaults(run=_runner(create))

    p = sub.add_parser(
        "rm",
        parents=[parent],
        help="delete volumes",
        description="Delete volumes and their files (refused while a live sandbox mounts one).",
    )
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(run=_runner(rm))


def _usage(parser: argparse.ArgumentParser) -> Any:
    def run(ns: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return run


def _runner(handler: Any) -> Any:
    """A ``run`` for ``main``: the shared client dispatch, aimed at a host by default."""

    def run(ns: argparse.Namespace) -> int:
        from . import dispatch

        ns.url = ns.url or DEFAULT_HOST_URL
        ns.handler = handler
        return dispatch(ns)

    return run


async def ls(ns: argparse.Namespace, client: Client) -> int:
    body = await client.call("GET", _path(ns.namespace))
    items: list[dict[str, Any]] = body.get("volumes", [])
    if ns.json:
        print_json(items)
        return EXIT_OK
    rows = []
    for v in items:
        created = v.get("created_at")
        age = f"{int(time.time() - created)}s" if isinstance(created, (int, float)) else "-"
        rows.append((v.get("name"), ",".join(v.get("used_by") or []) or "-", age))
    print_table(("NAME", "USED BY", "AGE"), rows)
    return EXIT_OK


async def create(ns: argparse.Namespace, client: Client) -> int:
    answer = await client.call("POST", _path(ns.namespace), json_body={"name": ns.name})
    if ns.json:
        print_json(answer)
    else:
        print(answer["name"])
    return EXIT_OK


async def rm(ns: argparse.Namespace, client: Client) -> int:
    for name in ns.names:
        await client.call("DELETE", f"{_path(ns.namespace)}/{selector(name)}")
        print(name, flush=True)
    return EXIT_OK
