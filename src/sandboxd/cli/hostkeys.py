"""``sandboxd host keys create|list|revoke``: API keys per namespace (host/apikeys.py).

They edit the host's state dir directly (run them as the user that runs the
host, on its machine); a running host sees the change on its next request.
With ``--cluster etcd://...`` they edit a fleet's keys in etcd instead
(fleet/apikeys.py), which every node and gateway of the fleet takes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .common import add_host_state_dir, host_subcommands


def add_parser(host: argparse.ArgumentParser) -> None:
    # One subparsers action per parser: share it with `host ssh-keys` (hostssh.py).
    sub = host_subcommands(host)
    keys = sub.add_parser(
        "keys",
        help="API keys per namespace: create, list, revoke",
        description="API keys that each reach one namespace's sandboxes, snapshots and pools. "
        "Stored hashed in STATE_DIR/apikeys.json; a running host sees changes at once.",
    )
    ksub = keys.add_subparsers(dest="keys_cmd", metavar="COMMAND", required=True)

    create = ksub.add_parser("create", help="make a key for a namespace (printed once)")
    create.add_argument("--namespace", required=True, metavar="NS")
    _where(create)
    create.set_defaults(run=run_create)
    ls = ksub.add_parser("list", help="the keys: id, namespace, created (never the key)")
    ls.add_argument("--json", action="store_true", help="one JSON document")
    _where(ls)
    ls.set_defaults(run=run_list)
    revoke = ksub.add_parser("revoke", help="revoke a key by its id (from list)")
    revoke.add_argument("key_id", metavar="ID")
    _where(revoke)
    revoke.set_defaults(run=run_revoke)


def _where(p: argparse.ArgumentParser) -> None:
    """A lone host's state dir, or a fleet's etcd (``--cluster`` and its TLS files)."""
    from .fleet import add_cluster

    add_host_state_dir(p)
    add_cluster(p, "the fleet's keys, in its etcd, for every node and gateway (docs/fleet.md)")


def _file(ns: argparse.Namespace) -> Any:
    from ..host.apikeys import KeyFile

    if ns.cluster:
        return _Fleet(ns)
    return KeyFile(ns.state_dir)


class _Fleet:
    """The fleet's keys in etcd, with the state-dir file's three calls."""

    def __init__(self, ns: argparse.Namespace) -> None:
        from ..fleet.store import parse_cluster
        from .fleet import tls_of

        try:
            parse_cluster(ns.cluster)
        except ValueError as exc:
            raise SystemExit(f"sandboxd host keys: {exc}") from None
        self.url, self.tls = ns.cluster, tls_of(ns, "sandboxd host keys")

    def _run(self, what: str, *args: Any) -> Any:
        import asyncio

        from ..fleet import apikeys
        from ..fleet.store import Etcd, Unavailable
        from ..host.apikeys import KeyError_

        async def go() -> Any:
            etcd = Etcd(self.url, self.tls)
            try:
                return await getattr(apikeys, what)(etcd, *args)
            finally:
                await etcd.close()

        try:
            return asyncio.run(go())
        except Unavailable as exc:
            raise KeyError_(exc.message) from None

    def create(self, namespace: str) -> Any:
        return self._run("create", namespace)

    def keys(self) -> Any:
        return self._run("listed")

    def revoke(self, key_id: str) -> Any:
        return self._run("revoke", key_id)


def _fail(message: str) -> int:
    sys.stderr.write(f"sandboxd host keys: {message}\n")
    return 1


def run_create(ns: argparse.Namespace) -> int:
    from ..host.apikeys import KeyError_

    try:
        stored, key = _file(ns).create(ns.namespace)
    except (KeyError_, OSError) as exc:
        return _fail(str(exc))
    sys.stderr.write(
        f"key {stored.id} for namespace {stored.namespace!r} (shown once; only its hash is kept):\n"
    )
    print(key)
    return 0


def run_list(ns: argparse.Namespace) -> int:
    from ..host.apikeys import KeyError_

    try:
        keys = _file(ns).keys()
    except (KeyError_, OSError) as exc:
        return _fail(str(exc))
    if ns.json:
        print(json.dumps({"keys": [k.public() for k in keys]}))
        return 0
    print(f"{'ID':<10} {'NAMESPACE':<24} CREATED")
    for k in keys:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(k.created_at))
        print(f"{k.id:<10} {k.namespace:<24} {created} UTC")
    return 0


def run_revoke(ns: argparse.Namespace) -> int:
    from ..host.apikeys import KeyError_

    try:
        gone = _file(ns).revoke(ns.key_id)
    except (KeyError_, OSError) as exc:
        return _fail(str(exc))
    sys.stderr.write(f"revoked key {gone.id} of namespace {gone.namespace!r}\n")
    return 0
