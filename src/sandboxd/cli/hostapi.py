"""Paths of a ``sandboxd host``'s lifecycle API, and sandbox names resolved to ids."""

from __future__ import annotations

from typing import Any

from .client import Client, selector


def prefix(namespace: str) -> str:
    return f"/v1/namespaces/{selector(namespace)}"


def sandboxes(namespace: str) -> str:
    return prefix(namespace) + "/sandboxes"


def sandbox(namespace: str, ident: str) -> str:
    """One sandbox by id or name (the host accepts both)."""
    return f"{sandboxes(namespace)}/{selector(ident)}"


def pools(namespace: str) -> str:
    return prefix(namespace) + "/sandbox-pools"


def snapshots(namespace: str) -> str:
    return prefix(namespace) + "/snapshots"


async def describe(client: Client, namespace: str, ident: str) -> dict[str, Any]:
    """SandboxInfo of ``ident`` (an id or a name); 404 → exit 5."""
    body: dict[str, Any] = await client.call("GET", sandbox(namespace, ident))
    return body


async def resolve(client: Client, namespace: str, ident: str) -> str:
    """The id of the sandbox ``ident`` names: the proxy routes by id only."""
    return str((await describe(client, namespace, ident))["id"])
