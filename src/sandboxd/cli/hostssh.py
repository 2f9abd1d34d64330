"""``sandboxd host --ssh-port N`` and ``sandboxd host ssh-keys add|list|rm``.

The keys commands edit the host's state dir directly (run them on its machine,
as root); a running gateway reads the lists at each login.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..config import env
from .common import add_host_state_dir, host_subcommands


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ssh-port",
        type=int,
        default=env("SANDBOXD_HOST_SSH_PORT", "0") or "0",
        metavar="PORT",
        help="serve SSH into sandboxes on this port of --host: `ssh -p PORT SANDBOX@HOST` "
        "[SANDBOXD_HOST_SSH_PORT] (default 0: off); keys: `sandboxd host ssh-keys`",
    )


async def start_gateway(
    manager: Any,
    host: str,
    port: int,
    state_dir: Path,
    cluster: Any = None,  # fleet/join.py's ClusterOptions when the host is in a fleet
    token: str | None = None,
) -> Any:
    """The host's SSH gateway when ``--ssh-port`` is set, else None; the caller closes it.

    Alone, keys and host key come from the state dir; in a fleet, from etcd,
    and a login may lead to a sandbox on any node (fleet/sshfront.py).
    """
    if not port:
        return None
    from ..host.proxy.sshgateway import LocalSandboxes, SshGateway, local_identity
    from ..host.proxy.sshkeys import AuthorizedKeys

    local = LocalSandboxes(manager, AuthorizedKeys(state_dir))
    if cluster is not None:
        from ..fleet.sshfront import start_fleet_gateway

        return await start_fleet_gateway(
            cluster.cluster, cluster.tls, token, host, port, cluster.node, local
        )
    gateway = SshGateway(local, host, port, *local_identity(state_dir))
    await gateway.start()
    return gateway


def add_commands(host: argparse.ArgumentParser) -> None:
    """``ssh-keys`` among ``sandboxd host``'s subcommands (one subparsers action per parser)."""
    sub = host_subcommands(host)
    keys = sub.add_parser(
        "ssh-keys",
        help="who may SSH into which namespace's sandboxes: add, list, rm",
        description="Public keys allowed to log into a namespace's sandboxes through the "
        "host's SSH gateway (--ssh-port). Stored in STATE_DIR/ssh/authorized_keys/NAMESPACE, "
        "or with --cluster in the fleet's etcd (every node and gateway); a running gateway "
        "reads them at each login.",
    )
    ksub = keys.add_subparsers(dest="ssh_keys_cmd", metavar="COMMAND", required=True)

    add = ksub.add_parser("add", help="allow a public key into a namespace's sandboxes")
    add.add_argument("--namespace", required=True, metavar="NS")
    add.add_argument(
        "key_file", metavar="KEY_FILE", help="a public key file (id_ed25519.pub), or - for stdin"
    )
    add_host_state_dir(add)
    _cluster_args(add)
    add.set_defaults(run=run_add)
    ls = ksub.add_parser("list", help="the keys: namespace, type, fingerprint, comment")
    ls.add_argument("--namespace", metavar="NS", help="only this namespace's keys")
    ls.add_argument("--json", action="store_true", help="one JSON document")
    add_host_state_dir(ls)
    _cluster_args(ls)
    ls.set_defaults(run=run_list)
    rm = ksub.add_parser("rm", help="remove a key from a namespace by its fingerprint")
    rm.add_argument("--namespace", required=True, metavar="NS")
    rm.add_argument("fingerprint", metavar="SHA256:...")
    add_host_state_dir(rm)
    _cluster_args(rm)
    rm.set_defaults(run=run_rm)


def _cluster_args(p: argparse.ArgumentParser) -> None:
    from .fleet import add_cluster

    add_cluster(p, "the fleet's keys, in its etcd, instead of the state dir's")


def _keys(ns: argparse.Namespace, method: str, *args: str) -> Any:
    """Call ``method`` on the state dir's keys, or on the fleet's (``--cluster``)."""
    if not ns.cluster:
        from ..host.proxy.sshkeys import AuthorizedKeys

        return getattr(AuthorizedKeys(ns.state_dir), method)(*args)
    import asyncio

    from ..fleet.sshfront import FleetSshKeys
    from ..fleet.store import Etcd, parse_cluster
    from ..host.proxy.sshkeys import SshKeyError
    from .fleet import tls_of

    try:
        parse_cluster(ns.cluster)
    except ValueError as exc:
        raise SshKeyError(str(exc)) from None

    async def call() -> Any:
        etcd = Etcd(ns.cluster, tls_of(ns, "sandboxd host ssh-keys"))
        try:
            return await getattr(FleetSshKeys(etcd), method)(*args)
        finally:
            await etcd.close()

    try:
        return asyncio.run(call())
    except Exception as exc:  # the store's Unavailable: etcd cannot be reached
        if isinstance(exc, SshKeyError):
            raise
        raise SshKeyError(f"the fleet's etcd: {getattr(exc, 'message', exc)}") from None


def _fail(message: str) -> int:
    sys.stderr.write(f"sandboxd host ssh-keys: {message}\n")
    return 2


def run_add(ns: argparse.Namespace) -> int:
    from ..host.proxy.sshkeys import SshKeyError

    try:
        text = sys.stdin.read() if ns.key_file == "-" else Path(ns.key_file).read_text()
    except OSError as exc:
        return _fail(f"cannot read {ns.key_file}: {exc.strerror or exc}")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not lines:
        return _fail(f"{ns.key_file} holds no public key")
    try:
        for line in lines:
            entry = _keys(ns, "add", ns.namespace, line)
            print(f"{entry.namespace}\t{entry.fingerprint}\t{entry.comment}")
    except SshKeyError as exc:
        return _fail(str(exc))
    return 0


def run_list(ns: argparse.Namespace) -> int:
    from ..host.proxy.sshkeys import SshKeyError

    try:
        entries = _keys(ns, "entries", ns.namespace)
    except SshKeyError as exc:
        return _fail(str(exc))
    if ns.json:
        rows = [
            {
                "namespace": e.namespace,
                "algorithm": e.algorithm,
                "fingerprint": e.fingerprint,
                "comment": e.comment,
            }
            for e in entries
        ]
        print(json.dumps({"keys": rows}, indent=2))
        return 0
    if not entries:
        print("no SSH keys (add one: sandboxd host ssh-keys add --namespace NS KEY.pub)")
        return 0
    width = max(len("NAMESPACE"), *(len(e.namespace) for e in entries))
    print(f"{'NAMESPACE':<{width}}  {'TYPE':<11}  {'FINGERPRINT':<50}  COMMENT")
    for e in entries:
        print(f"{e.namespace:<{width}}  {e.algorithm:<11}  {e.fingerprint:<50}  {e.comment}")
    return 0


def run_rm(ns: argparse.Namespace) -> int:
    from ..host.proxy.sshkeys import SshKeyError

    try:
        removed = _keys(ns, "remove", ns.namespace, ns.fingerprint)
    except SshKeyError as exc:
        return _fail(str(exc))
    if not removed:
        return _fail(f"no key {ns.fingerprint} in namespace {ns.namespace}")
    return 0
