"""The fleet's etcd: a thin typed layer over the ``aetcd`` client (etcd v3 over gRPC).

Why ``aetcd``: maintained, asyncio-native, works with etcd 3.4 and the
grpcio/protobuf this project already installs (docs/fleet.md). What it lacks
we add here, in a few lines each: several endpoints (a gRPC ``ipv4:`` target
lists them all, and gRPC's round-robin policy skips a dead member), and
serializable prefix reads (answered by any member, even without quorum).

Every etcd error becomes :class:`Unavailable`, which the API answers as a 503
with ``FLEET_STORE_UNAVAILABLE``: with quorum lost, etcd refuses writes and
linearizable reads, and our callers turn that into a clear refusal.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# The host forks (bwrap, mkfs): gRPC's fork handlers are not wanted, nor its notes about them.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import aetcd
import grpc
from aetcd import rpc, utils, watcher

from ..host.model import ApiError

# Each call's deadline: a write that quorum cannot commit is refused in this time.
CALL_TIMEOUT_S = 3
ROOT = "/sandboxd/"


class Unavailable(ApiError):
    def __init__(self, why: str) -> None:
        super().__init__(
            503,
            "FLEET_STORE_UNAVAILABLE",
            f"the fleet's etcd cannot take this now ({why}); running sandboxes still answer "
            "through the proxy: retry when etcd has its quorum back",
        )


def parse_cluster(url: str) -> list[tuple[str, int]]:
    """``etcd://H1:2379,H2:2379`` (or ``http://`` entries) to ``[(host, port), ...]``."""
    if not url.startswith("etcd://"):
        raise ValueError(f"--cluster {url!r}: expected etcd://HOST:PORT[,HOST:PORT...]")
    out = []
    for part in url[len("etcd://") :].split(","):
        part = part.strip().removeprefix("http://").rstrip("/")
        if not part:
            continue
        u = urlsplit("//" + part)
        if not u.hostname:
            raise ValueError(f"--cluster: {part!r} is not HOST:PORT")
        out.append((u.hostname, u.port or 2379))
    if not out:
        raise ValueError("--cluster names no etcd endpoint")
    return out


def grpc_target(endpoints: list[tuple[str, int]]) -> str:
    """One gRPC target naming every member (``ipv4:A:P,B:P``); names are resolved now."""
    ips = []
    for host, port in endpoints:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = ipaddress.ip_address(socket.getaddrinfo(host, port)[0][4][0])
        ips.append((ip, port))
    if {ip.version for ip, _ in ips} == {6}:
        return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in ips)
    if {ip.version for ip, _ in ips} == {4}:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in ips)
    raise ValueError("--cluster: use either IPv4 or IPv6 addresses for every etcd member")


@dataclass(frozen=True)
class Tls:
    """Client TLS to etcd: the CA that signed the members' certificates, and ours."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.ca.read_bytes(),
            self.key.read_bytes() if self.key else None,
            self.cert.read_bytes() if self.cert else None,
        )


class _Client(aetcd.Client):
    """``aetcd.Client`` dialing one target that names every member, in TLS if asked."""

    def __init__(self, target: str, first_host: str, tls: Tls | None) -> None:
        # aetcd dials f"{host}:{port}": split the target so that it rebuilds it.
        host, _, port = target.rpartition(":")
        options: dict[str, Any] = {"grpc.lb_policy_name": "round_robin"}
        if tls is not None:  # certificates name the members, not our multi-address target
            options["grpc.ssl_target_name_override"] = first_host
        super().__init__(host=host, port=int(port), timeout=CALL_TIMEOUT_S, options=options)
        self._tls = tls

    async def connect(self) -> None:
        if self._tls is None:
            return await super().connect()
        if self._connected.is_set():
            return None
        # aetcd's own set-up (its stubs and watcher), over a TLS channel instead.
        target = f"{self._host}:{self._port}"
        creds = self._tls.credentials()
        self.channel = rpc.secure_channel(target, creds, options=list(self._options.items()))
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()
        return None


@dataclass
class Entry:
    key: str
    value: dict[str, Any]
    mod_revision: int
    lease: int


def _entry(kv: Any) -> Entry:
    return Entry(kv.key.decode(), json.loads(kv.value), kv.mod_revision, kv.lease)


def dump(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


class Etcd:
    def __init__(self, cluster_url: str, tls: Tls | None = None) -> None:
        self.url = cluster_url
        endpoints = parse_cluster(cluster_url)
        self.client = _Client(grpc_target(endpoints), endpoints[0][0], tls)
        self.txn = self.client.transactions

    async def close(self) -> None:
        await self.client.close()

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except aetcd.ClientError as exc:
            raise Unavailable(str(exc).splitlines()[0][:200] or type(exc).__name__) from exc
        except rpc.AioRpcError as exc:  # a call made on aetcd's stub directly (prefix)
            raise Unavailable(f"{exc.code().name}: {exc.details()}"[:200]) from exc
        except (TimeoutError, OSError) as exc:
            raise Unavailable(type(exc).__name__) from exc

    async def get(self, key: str, serializable: bool = False) -> Entry | None:
        r = await self._call(self.client.get(key.encode(), serializable=serializable))
        return None if r is None else _entry(r)

    async def read(self, key: str) -> Entry | None:
        """Linearizable; without quorum, what the member reached has (reads go on)."""
        try:
            return await self.get(key)
        except Unavailable:
            return await self.get(key, serializable=True)

    async def prefix(self, prefix: str, serializable: bool = False) -> tuple[int, list[Entry]]:
        """(revision, entries); ``serializable``: any member answers, quorum or not."""
        await self._call(self.client.connect())
        req = rpc.RangeRequest(
            key=prefix.encode(),
            range_end=utils.prefix_range_end(prefix.encode()),
            serializable=serializable,
        )
        resp = await self._call(
            self.client.kvstub.Range(req, timeout=CALL_TIMEOUT_S, metadata=self.client.metadata)
        )
        return resp.header.revision, [_entry(kv) for kv in resp.kvs]

    async def put(self, key: str, value: dict[str, Any], lease: int | None = None) -> None:
        await self._call(self.client.put(key.encode(), dump(value), lease=lease))

    async def delete(self, key: str) -> None:
        await self._call(self.client.delete(key.encode()))

    async def transaction(self, compare: list[Any], success: list[Any]) -> bool:
        ok, _ = await self._call(
            self.client.transaction(compare=compare, success=success, failure=[])
        )
        return bool(ok)

    # Transaction parts, with str keys and dict values.
    def absent(self, key: str) -> Any:
        return self.txn.version(key.encode()) == 0

    def unchanged(self, key: str, mod_revision: int) -> Any:
        return self.txn.mod(key.encode()) == mod_revision

    def put_op(self, key: str, value: dict[str, Any], lease: int | None = None) -> Any:
        return self.txn.put(key.encode(), dump(value), lease=lease)

    def delete_op(self, key: str) -> Any:
        return self.txn.delete(key.encode())

    async def grant(self, ttl: int) -> int:
        lease = await self._call(self.client.lease(ttl))
        return int(lease.id)

    async def keepalive(self, lease_id: int) -> bool:
        """Renew; False once the lease is gone (expired: its keys went with it)."""
        reply = await self._call(self.client.refresh_lease(lease_id))
        return reply is not None and reply.TTL > 0

    async def revoke(self, lease_id: int) -> None:
        await self._call(self.client.revoke_lease(lease_id))
