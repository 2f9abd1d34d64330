"""``sandboxd sbx pool ls|create|rm``: a host's warm pools."""

from __future__ import annotations

import argparse
from typing import Any

from . import hostapi
from .client import Client, selector
from .common import EXIT_OK, add_json_flag, print_json, print_table
from .sbxspec import add_sandbox_spec, age, cpus, label_text, labels_body, mib, spec_body


def register(
    cmds: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    top = cmds.add_parser(
        "pool",
        help="warm pools: ls, create, rm",
        description="A pool keeps sandboxes of one shape started ahead of demand; "
        "the SDK claims one with Sandbox.create(pool_id=...).",
    )
    sub = top.add_subparsers(dest="pool_cmd", metavar="POOL_COMMAND")

    p = sub.add_parser("ls", parents=[parent], help="list pools", description="List the pools.")
    add_json_flag(p)
    p.set_defaults(handler=ls)

    p = sub.add_parser(
        "create",
        parents=[parent],
        help="create a pool and print its id",
        description="Create a pool and print its id.",
    )
    add_sandbox_spec(p)
    p.add_argument(
        "--warm", type=int, default=0, metavar="N", help="sandboxes kept started (default 0)"
    )
    p.add_argument(
        "--max", type=int, metavar="N", help="at most N claimed at once (default: no cap)"
    )
    p.add_argument(
        "--label",
        action="append",
        metavar="KEY=VALUE",
        help="a label (repeatable) that every sandbox claimed from the pool carries",
    )
    add_json_flag(p, "print the host's JSON answer")
    p.set_defaults(handler=create)

    p = sub.add_parser(
        "rm",
        parents=[parent],
        help="delete pools",
        description="Delete pools and their warm sandboxes (refused while claimed ones live).",
    )
    p.add_argument("pools", nargs="+", metavar="POOL_ID")
    p.set_defaults(handler=rm)


async def ls(ns: argparse.Namespace, client: Client) -> int:
    body = await client.call("GET", hostapi.pools(ns.namespace))
    items: list[dict[str, Any]] = body.get("pools", [])
    if ns.json:
        print_json(items)
        return EXIT_OK
    rows = []
    for p in items:
        res = p.get("resources") or {}
        rows.append(
            (
                p.get("id"),
                p.get("image") or "-",
                cpus(res.get("cpus")),
                mib(res.get("memory_mb")),
                p.get("warm_containers", 0),
                p.get("max_containers") or "-",
                age(p.get("created_at")),
                label_text(p.get("labels")),
            )
        )
    print_table(("ID", "IMAGE", "CPUS", "MEMORY", "WARM", "MAX", "AGE", "LABELS"), rows)
    return EXIT_OK


async def create(ns: argparse.Namespace, client: Client) -> int:
    body = spec_body(ns)
    body["warm_containers"] = ns.warm
    if ns.max is not None:
        body["max_containers"] = ns.max
    if ns.label:
        body["labels"] = labels_body(ns.label)
    answer = await client.call("POST", hostapi.pools(ns.namespace), json_body=body)
    if ns.json:
        print_json(answer)
    else:
        print(answer["pool_id"])
    return EXIT_OK


async def rm(ns: argparse.Namespace, client: Client) -> int:
    for pool_id in ns.pools:
        await client.call("DELETE", f"{hostapi.pools(ns.namespace)}/{selector(pool_id)}")
        print(pool_id, flush=True)
    return EXIT_OK
