"""``sandboxd health`` and ``sandboxd info``."""

from __future__ import annotations

import argparse
from typing import Any

from .client import Client
from .common import EXIT_ERROR, EXIT_OK, add_json_flag, human_duration, print_json, print_table


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "health",
        parents=[parent],
        help="check that the daemon answers",
        description="Exit 0 when the daemon reports itself healthy (usable as a container HEALTHCHECK).",
    )
    add_json_flag(p, "print the daemon's JSON answer")
    p.set_defaults(handler=health)

    p = sub.add_parser(
        "info",
        parents=[parent],
        help="show the daemon's version, uptime and process counts",
        description="Show the daemon's version, uptime and process counts.",
    )
    add_json_flag(p)
    p.set_defaults(handler=info)


async def health(ns: argparse.Namespace, client: Client) -> int:
    body: Any = await client.call("GET", "/api/v1/health")
    healthy = isinstance(body, dict) and body.get("healthy") is True
    if ns.json:
        print_json(body)
    else:
        print("healthy" if healthy else "unhealthy")
    return EXIT_OK if healthy else EXIT_ERROR


async def info(ns: argparse.Namespace, client: Client) -> int:
    body: dict[str, Any] = await client.call("GET", "/api/v1/info")
    if ns.json:
        print_json(body)
        return EXIT_OK
    rows: list[tuple[str, object]] = [
        ("url", client.target.base),
        ("version", body.get("version", "?")),
        ("uptime", human_duration(float(body.get("uptime_secs", 0)))),
        ("running processes", body.get("running_processes", "?")),
        ("process records", body.get("total_processes", "?")),
    ]
    # Fields beyond the contract, when this daemon has them.
    if "spawned_total" in body:
        rows.append(("processes started", body["spawned_total"]))
    if "cgroups" in body:
        rows.append(("cgroups", body["cgroups"]))
    print_table(("FIELD", "VALUE"), rows)
    return EXIT_OK
