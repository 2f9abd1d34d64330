"""``sandboxd host keys create|list|revoke``: API keys per namespace (host/apikeys.py).

They edit the host's state dir directly (run them as the user that runs the
host, on its machine); a running host sees the change on its next request.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

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
    add_host_state_dir(create)
    create.set_defaults(run=run_create)
    ls = ksub.add_parser("list", help="the keys: id, namespace, created (never the key)")
    ls.add_argument("--json", action="store_true", help="one JSON document")
    add_host_state_dir(ls)
    ls.set_defaults(run=run_list)
    revoke = ksub.add_parser("revoke", help="revoke a key by its id (from list)")
    revoke.add_argument("key_id", metavar="ID")
    add_host_state_dir(revoke)
    revoke.set_defaults(run=run_revoke)


def _file(ns: argparse.Namespace):  # type: ignore[no-untyped-def]
    from ..host.apikeys import KeyFile

    return KeyFile(ns.state_dir)


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
