"""``sandboxd sbx``: a ``sandboxd host``'s sandboxes, in the habits of ``kubectl`` and ``tl sbx``.

Every command is one or two calls of the host's lifecycle API
(``/v1/namespaces/{ns}/sandboxes``, the same routes the SDK uses); a sandbox
is named by its id or its name wherever one is asked for. ``sbx pool`` lives
in :mod:`.pools`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
from typing import Any

from multidict import MultiDict

from . import hostapi, pools
from .client import Client
from .common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    add_json_flag,
    human_bytes,
    print_json,
    print_table,
)
from .sbxspec import (
    add_sandbox_spec,
    age,
    cpus,
    label_pairs,
    label_text,
    labels_body,
    mib,
    spec_body,
)

POLL_S = 0.2
# A blocking create answers "pending" after this long and we poll: one call
# never outlasts the client's 30 s call timeout.
CREATE_BUDGET_MS = 20_000
STATUSES = ("pending", "running", "suspending", "suspended", "snapshotting")
ENDED = ("terminated", "failed")
PAGE = 1000  # the host's largest page; `ls` follows next_cursor to the end


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    top = sub.add_parser(
        "sbx",
        help="the sandboxes of a `sandboxd host`: ls, create, describe, terminate, ...",
        description="Drive the sandboxes of a `sandboxd host` through its lifecycle API "
        "(--url/SANDBOXD_URL, default http://127.0.0.1:8900). A sandbox is named by id or name.",
    )
    # Not required: a bare `sandboxd sbx` prints this help (see cli.main).
    cmds = top.add_subparsers(dest="sbx_cmd", metavar="SBX_COMMAND")

    p = cmds.add_parser(
        "ls",
        parents=[parent],
        help="list the live sandboxes",
        description="List the namespace's live sandboxes (pending, running, suspending, "
        "suspended, snapshotting), oldest first. --status and --label are answered by the "
        "host (a fleet of thousands is listed page by page).",
    )
    p.add_argument(
        "--status",
        action="append",
        metavar="STATUS",
        help=f"only these statuses (repeatable or comma-separated: {', '.join(STATUSES)}; "
        f"{', '.join(ENDED)} list ended ones)",
    )
    p.add_argument(
        "--label",
        action="append",
        metavar="KEY=VALUE",
        help="only sandboxes with this label (repeatable: all must match; KEY alone: any value)",
    )
    p.add_argument("--name", metavar="PATTERN", help="only names matching this glob (e.g. 'web-*')")
    add_json_flag(p)
    p.set_defaults(handler=ls)

    p = cmds.add_parser(
        "create",
        parents=[parent],
        help="create a sandbox and print its id",
        description="Create a sandbox and print its id. Without --wait the id is printed at once "
        "and the sandbox starts in the background (`sbx describe` shows when it runs).",
    )
    add_sandbox_spec(p)
    p.add_argument("--name", help="a name, unique among the namespace's live sandboxes")
    p.add_argument(
        "--label",
        action="append",
        metavar="KEY=VALUE",
        help="a label (repeatable); `sbx ls --label KEY=VALUE` finds it",
    )
    p.add_argument(
        "--snapshot",
        metavar="SNAPSHOT_ID",
        help="restore this snapshot (`sbx snapshot`): its files, image and resources",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="return once the sandbox runs (exit 1 and print why if it failed to start)",
    )
    add_json_flag(p, "print the host's JSON answer (with --wait: the SandboxInfo)")
    p.set_defaults(handler=create)

    p = cmds.add_parser(
        "describe",
        parents=[parent],
        help="show one sandbox, with its usage",
        description="Show one sandbox (also a terminated one, by id), with its labels and, "
        "while it is live, its usage: CPU time, memory (current, peak, limit), disk used of "
        "its disk and network bytes.",
    )
    p.add_argument("sandbox", metavar="ID|NAME")
    add_json_flag(p)
    p.set_defaults(handler=describe)

    p = cmds.add_parser(
        "terminate",
        parents=[parent],
        help="terminate sandboxes",
        description="Terminate sandboxes: kill everything in them and remove their files. "
        "Prints each id once it is gone.",
    )
    p.add_argument("sandboxes", nargs="+", metavar="ID|NAME")
    p.set_defaults(handler=terminate)

    for verb, what in (
        ("suspend", "freeze every process of a named sandbox (memory and files stay)"),
        ("resume", "thaw a suspended sandbox"),
    ):
        p = cmds.add_parser(
            verb, parents=[parent], help=what, description=what[0].upper() + what[1:] + "."
        )
        p.add_argument("sandbox", metavar="ID|NAME")
        add_json_flag(p, "print the sandbox's SandboxInfo once the status is reached")
        p.set_defaults(handler=suspend_or_resume, verb=verb)

    p = cmds.add_parser(
        "snapshot",
        parents=[parent],
        help="snapshot a sandbox's files and print the snapshot id",
        description="Take a filesystem snapshot and print its id; `sbx create --snapshot ID` "
        "restores it into a new sandbox.",
    )
    p.add_argument("sandbox", metavar="ID|NAME")
    p.add_argument("--wait", action="store_true", help="return once the snapshot is completed")
    add_json_flag(p)
    p.set_defaults(handler=snapshot)

    pools.register(cmds, parent)


# --- sandboxes ---


def _statuses(ns: argparse.Namespace) -> set[str] | None:
    if not ns.status:
        return None
    wanted = {s.strip() for item in ns.status for s in item.split(",") if s.strip()}
    unknown = wanted - set(STATUSES) - set(ENDED)
    if unknown:
        raise CliError(
            f"unknown status {', '.join(sorted(unknown))} (use {', '.join(STATUSES)})", EXIT_USAGE
        )
    return wanted


async def list_sandboxes(
    client: Client, namespace: str, statuses: set[str] | None, labels: list[str]
) -> list[dict[str, Any]]:
    """Every sandbox the host's query selects, following ``next_cursor`` page by page."""
    out: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: MultiDict[str] = MultiDict([("limit", str(PAGE))])
        for status in sorted(statuses or ()):
            params.add("status", status)
        for label in labels:
            params.add("label", label)
        if cursor is not None:
            params.add("cursor", cursor)
        body = await client.call("GET", hostapi.sandboxes(namespace), params=params)
        out += body.get("sandboxes", [])
        cursor = body.get("next_cursor")
        if not cursor:
            return out


async def ls(ns: argparse.Namespace, client: Client) -> int:
    wanted = _statuses(ns)
    found = await list_sandboxes(client, ns.namespace, wanted, label_pairs(ns.label))
    items = [
        s
        for s in found
        if ns.name is None or fnmatch.fnmatchcase(str(s.get("name") or ""), ns.name)
    ]
    if ns.json:
        print_json(items)
        return EXIT_OK
    fleet = any(s.get("node") for s in items)  # a fleet's front says each one's node
    rows = []
    for s in items:
        res = s.get("resources") or {}
        rows.append(
            (
                s.get("id"),
                s.get("name") or "-",
                s.get("status"),
                *((s.get("node") or "-",) if fleet else ()),
                s.get("image") or "-",
                cpus(res.get("cpus")),
                mib(res.get("memory_mb")),
                age(s.get("created_at")),
                label_text(s.get("labels")),
            )
        )
    heads = ("ID", "NAME", "STATUS", *(("NODE",) if fleet else ()), "IMAGE", "CPUS", "MEMORY")
    print_table((*heads, "AGE", "LABELS"), rows)
    return EXIT_OK


async def create(ns: argparse.Namespace, client: Client) -> int:
    body = spec_body(ns)
    if ns.name:
        body["name"] = ns.name
    if ns.snapshot:
        body["snapshot_id"] = ns.snapshot
    if ns.label:
        body["labels"] = labels_body(ns.label)
    body["wait"] = bool(ns.wait)
    headers = {"x-tensorlake-request-timeout-ms": str(CREATE_BUDGET_MS)}
    async with client.request(
        "POST", hostapi.sandboxes(ns.namespace), json_body=body, headers=headers
    ) as resp:
        answer: dict[str, Any] = await resp.json()
    sid = str(answer["sandbox_id"])
    if not ns.wait:
        if ns.json:
            print_json(answer)
        else:
            print(sid)
        return EXIT_OK
    info = await wait_started(client, ns.namespace, sid)
    if ns.json:
        print_json(info)
    else:
        print(sid)
    if info.get("status") != "running":
        reason = (info.get("error_details") or {}).get("message") or info.get(
            "termination_reason", "unknown"
        )
        raise CliError(f"sandbox {sid} is {info.get('status')}: {reason}", EXIT_ERROR)
    return EXIT_OK


async def wait_started(client: Client, namespace: str, sid: str) -> dict[str, Any]:
    """The SandboxInfo once the sandbox left ``pending``."""
    while True:
        info = await hostapi.describe(client, namespace, sid)
        if info.get("status") != "pending":
            return info
        await asyncio.sleep(POLL_S)


async def describe(ns: argparse.Namespace, client: Client) -> int:
    info = await hostapi.describe(client, ns.namespace, ns.sandbox)
    if info.get("status") in ("running", "suspending", "suspended", "snapshotting"):
        # GET .../usage (the host's usage.py): the figures now; a sandbox that
        # ended meanwhile (409) is shown without them.
        path = f"{hostapi.sandbox(ns.namespace, str(info.get('id')))}/usage"
        with contextlib.suppress(CliError):
            info["usage"] = (await client.call("GET", path)).get("current")
    if ns.json:
        print_json(info)
        return EXIT_OK
    res = info.get("resources") or {}
    rows: list[tuple[str, object]] = [
        ("id", info.get("id")),
        ("name", info.get("name") or "-"),
        ("namespace", info.get("namespace")),
        ("status", info.get("status")),
        ("image", info.get("image")),
        ("cpus", cpus(res.get("cpus"))),
        ("memory", mib(res.get("memory_mb"))),
        ("disk", mib(res.get("disk_mb"))),
        ("timeout", f"{info['timeout_secs']}s" if info.get("timeout_secs") else "none"),
        ("age", age(info.get("created_at"))),
        ("labels", label_text(info.get("labels"))),
    ]
    optional = (
        "node",  # on a fleet's front
        "pool_id",
        "sandbox_url",
        "ingress_endpoint",
        "exposed_ports",
        "auto_resume",
        "termination_reason",
    )
    rows += [(key, _text(info[key])) for key in optional if info.get(key) not in (None, [])]
    if info.get("error_details"):
        rows.append(("error", _text(info["error_details"].get("message"))))
    for key, value in (info.get("usage") or {}).items():
        rows.append((f"usage.{key}", _figure(key, value)))
    print_table(("FIELD", "VALUE"), rows)
    return EXIT_OK


def _figure(key: str, value: object) -> str:
    """A usage figure for people: bytes with a unit, CPU time in seconds."""
    if not isinstance(value, int):
        return "-"
    if key.endswith("_bytes"):
        return human_bytes(value)
    if key == "cpu_usec":
        return f"{value / 1e6:.2f}s"
    return str(value)


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


async def terminate(ns: argparse.Namespace, client: Client) -> int:
    for ident in ns.sandboxes:
        # By id: a name is only the live sandbox's, and DELETE is idempotent by id.
        sid = await hostapi.resolve(client, ns.namespace, ident)
        await client.call("DELETE", hostapi.sandbox(ns.namespace, sid))
        print(sid, flush=True)
    return EXIT_OK


async def suspend_or_resume(ns: argparse.Namespace, client: Client) -> int:
    path = f"{hostapi.sandbox(ns.namespace, ns.sandbox)}/{ns.verb}"
    async with client.request("POST", path, params={"wait_ms": "25000"}):
        pass
    info = await hostapi.describe(client, ns.namespace, ns.sandbox)
    if ns.json:
        print_json(info)
    else:
        print(f"{info.get('id')} {info.get('status')}")
    return EXIT_OK


async def snapshot(ns: argparse.Namespace, client: Client) -> int:
    path = f"{hostapi.sandbox(ns.namespace, ns.sandbox)}/snapshot"
    answer: dict[str, Any] = await client.call("POST", path, json_body={})
    snap_id = str(answer["snapshot_id"])
    if ns.wait:
        answer = await client.call("GET", f"{hostapi.snapshots(ns.namespace)}/{snap_id}")
        while answer.get("status") == "in_progress":
            await asyncio.sleep(POLL_S)
            answer = await client.call("GET", f"{hostapi.snapshots(ns.namespace)}/{snap_id}")
    if ns.json:
        print_json(answer)
    else:
        print(snap_id)
    if answer.get("status") == "failed":
        raise CliError(f"snapshot {snap_id} failed: {answer.get('error', 'unknown')}", EXIT_ERROR)
    return EXIT_OK
