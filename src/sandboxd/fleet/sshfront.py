"""SSH through any front of a fleet: ``ssh -p N SANDBOX@FRONT`` for a sandbox on any node.

A node (``sandboxd host --cluster ... --ssh-port N``) or a gateway
(``sandboxd gateway --ssh-port N``) runs the same SSH gateway as a lone host
(``host/proxy/sshgateway.py``) with the fleet's view of where logins lead:

* **Keys** are the fleet's, in etcd (``sandboxd host ssh-keys add --cluster``):
  one list per namespace, read at each login, so a key added or removed
  applies to every front at its next connection.
* **Sandboxes** are found by id or name in the fleet's records, in the
  namespaces the key may reach, live ones only.
* **The daemon** of a sandbox on this node is reached as on a lone host; on
  another node, through that node's own proxy (its ``/api/v1/*`` route, the
  SSH enable call and the TCP tunnel's websocket), as a front forwards any
  other request: with the fleet's token and its hop mark.
* **Identity**: the host key users see and the key the fronts log into
  daemons with are the fleet's, made once and kept in etcd, the same on every
  front. One host key, so a user behind a load balancer never sees it change;
  one proxy key, because a daemon lets in only the key of its last enable, and
  two fronts with keys of their own would lock each other out.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any

import aiohttp
import asyncssh

from ..host.model import LIVE
from ..host.proxy.sshgateway import DaemonLine, LocalSandboxes, SshGateway, Unreachable
from ..host.proxy.sshkeys import AuthorizedKey, SshKeyError, parse_public_key
from . import keys
from .front import record_of
from .hop import HOP, fleet_hop, node_session
from .store import ROOT, Etcd, Tls

log = logging.getLogger("sandboxd.fleet.ssh")

SSH_KEYS = ROOT + "ssh-keys/"  # {ns}/{sha256 of the fingerprint}: one authorized key
HOST_KEY = ROOT + "ssh-host-key"  # the private key every front shows its users
PROXY_KEY = ROOT + "ssh-proxy-key"  # the private key every front logs into daemons with

# What may follow ``ssh -p N``: an id or a name, then ``+NAMESPACE``; anything
# else is refused before etcd is asked.
_IDENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_REMEMBERED = 10_000  # sandbox -> namespace, from logins (bounded: cleared when full)


def _key_of(namespace: str, fingerprint: str) -> str:
    # A fingerprint is base64 (it may hold '/'): its digest makes a flat key.
    return f"{SSH_KEYS}{namespace}/{hashlib.sha256(fingerprint.encode()).hexdigest()[:32]}"


class FleetSshKeys:
    """The fleet's authorized keys, one list per namespace, in etcd."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd

    async def entries(self, namespace: str | None = None) -> list[AuthorizedKey]:
        prefix = SSH_KEYS if namespace is None else f"{SSH_KEYS}{namespace}/"
        _, found = await self.etcd.prefix(prefix, serializable=True)
        out = [
            AuthorizedKey(
                e.value["namespace"],
                e.value["algorithm"],
                e.value["fingerprint"],
                e.value.get("comment", ""),
                e.value["line"],
            )
            for e in found
        ]
        return sorted(out, key=lambda k: (k.namespace, k.fingerprint))

    async def namespaces_for(self, fingerprint: str) -> list[str]:
        return sorted({k.namespace for k in await self.entries() if k.fingerprint == fingerprint})

    async def add(self, namespace: str, line: str) -> AuthorizedKey:
        from ..host.model import check_namespace

        try:
            check_namespace(namespace)
        except Exception:
            raise SshKeyError(f"namespace {namespace!r} is not a valid name") from None
        parsed = parse_public_key(line)
        if parsed is None:
            raise SshKeyError("give one public key line (as in ~/.ssh/id_ed25519.pub)")
        entry = AuthorizedKey(namespace, *parsed, line=line.strip())
        await self.etcd.put(
            _key_of(namespace, entry.fingerprint),
            {
                "namespace": namespace,
                "algorithm": entry.algorithm,
                "fingerprint": entry.fingerprint,
                "comment": entry.comment,
                "line": entry.line,
            },
        )  # adding twice is not an error: the same key, the same value
        return entry

    async def remove(self, namespace: str, fingerprint: str) -> bool:
        key = _key_of(namespace, fingerprint)
        if await self.etcd.read(key) is None:
            return False
        await self.etcd.delete(key)
        return True


async def fleet_identity(etcd: Etcd) -> tuple[asyncssh.SSHKey, asyncssh.SSHKey]:
    """(host key, proxy key): made by the first front that needs them, then shared."""
    out = []
    for key, name in ((HOST_KEY, "host"), (PROXY_KEY, "proxy")):
        e = await etcd.read(key)
        if e is None:
            made = asyncssh.generate_private_key("ssh-ed25519", comment=f"sandboxd fleet {name}")
            value = {"private": made.export_private_key().decode()}
            # Create-if-absent: two fronts starting at once agree on one key.
            await etcd.transaction([etcd.absent(key)], [etcd.put_op(key, value)])
            e = await etcd.read(key)
            assert e is not None
        out.append(asyncssh.import_private_key(e.value["private"]))
    return out[0], out[1]


class FleetSandboxes:
    """Where logins lead in a fleet (host/proxy/sshgateway.py's ``Sandboxes``)."""

    def __init__(
        self,
        etcd: Etcd,
        token: str | None,
        node: str | None = None,
        local: LocalSandboxes | None = None,
    ) -> None:
        self.etcd = etcd
        self.keys = FleetSshKeys(etcd)
        self.token = token
        self.hop = ""  # the fleet's mark: start_fleet_gateway reads it (front.fleet_hop)
        self.node, self.local = node, local
        self._ns: dict[str, str] = {}  # sandbox id -> namespace, as a login found it
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    async def close(self) -> None:
        for s in self._sessions.values():
            await s.close()
        await self.etcd.close()

    async def _live(self, ns: str, ident: str) -> Any:
        """The record entry of a live sandbox named or numbered ``ident`` in ``ns``."""
        e = await self.etcd.read(keys.sandbox(ns, ident))
        if e is None:
            named = await self.etcd.read(keys.name(ns, ident))
            sid = named.value.get("id") if named is not None else None
            e = await self.etcd.read(keys.sandbox(ns, sid)) if sid else None
        if e is None or record_of(e.value).status not in LIVE:
            return None
        return e

    async def resolve(self, username: str, fingerprint: str) -> str | None:
        ident, _, ns = username.partition("+")
        if not _IDENT.match(ident):
            return None
        allowed = await self.keys.namespaces_for(fingerprint)
        if ns:
            allowed = [n for n in allowed if n == ns]
        found: dict[str, str] = {}
        for n in allowed:
            e = await self._live(n, ident)
            if e is not None:
                found[record_of(e.value).id] = n
        if len(found) != 1:
            return None  # none, or a name found in two namespaces: say which with +NS
        ((sid, n),) = found.items()
        if len(self._ns) > MAX_REMEMBERED:
            self._ns.clear()
        self._ns[sid] = n
        return sid

    async def daemon(self, sid: str) -> DaemonLine:
        ns = self._ns.get(sid)
        e = await self._live(ns, sid) if ns is not None else None
        if e is None:
            raise Unreachable(f"sandbox {sid} is gone")
        node = e.value["node"]
        if node == self.node and self.local is not None:
            return await self.local.daemon(sid)
        published = await self.etcd.get(keys.node(node), serializable=True)
        if published is None:  # its lease ran out: the fleet is giving it up
            raise Unreachable(f"the node of sandbox {sid} ({node}) has left the fleet")
        headers = {"X-Tensorlake-Sandbox-Id": sid, HOP: self.hop}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        # `<id>.local`: a name a node without a token accepts (its guard against
        # DNS rebinding), and one that names the sandbox as the header does.
        base = f"http://{sid}.local"
        return DaemonLine(self._session(published.value["url"]), base, headers)

    def _session(self, url: str) -> aiohttp.ClientSession:
        s = self._sessions.get(url)
        if s is None or s.closed:
            s = self._sessions[url] = node_session(url)
        return s


async def start_fleet_gateway(
    cluster: str,
    tls: Tls | None,
    token: str | None,
    host: str,
    port: int,
    node: str | None = None,
    local: LocalSandboxes | None = None,
) -> SshGateway:
    """The SSH gateway of one front (a node's, with its own sandboxes as ``local``, or a gateway's)."""
    etcd = Etcd(cluster, tls)
    try:
        host_key, proxy_key = await fleet_identity(etcd)
        sandboxes = FleetSandboxes(etcd, token, node, local)
        sandboxes.hop = await fleet_hop(etcd, token)
        gateway = SshGateway(sandboxes, host, port, host_key, proxy_key)
        await gateway.start()
    except BaseException:
        await etcd.close()
        raise
    return gateway
