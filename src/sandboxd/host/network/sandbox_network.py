"""Per-sandbox network: a named netns, a routed veth pair, one nft chain for its policy.

Shape (``docs/self-hosted.md`` "Network"): every sandbox gets its own network
namespace ``<tag>-<sandbox id>`` with ``lo`` and ``eth0``. The other end of the
veth pair, ``s<8 hex><6 hex index>``, sits in the **router namespace** (the
host's own by default, or ``--net-router NAME``). The pair is routed
point-to-point: the sandbox has ``<address>/32`` and a default route via the
gateway (the subnet's first address, put on every router-side veth), the
router has a ``/32`` route to the sandbox. No bridge, so sandboxes share no L2.

One nftables table per host (``inet <tag>``) in the router namespace:

* ``input``: anything a sandbox veth sends to the router itself is dropped
  (sandbox → host is always closed);
* ``forward``: ``iifname vmap @sandboxes`` jumps to the sandbox's own chain;
  traffic towards a sandbox veth is let through only as a reply
  (``ct state established,related``), so sandbox ↔ sandbox is always closed;
* ``postrouting``: what a sandbox may send out leaves masqueraded.

A sandbox's chain (:meth:`Plan.chain_rules`), first match wins: not IPv4 or a
spoofed source → drop; replies → accept; the always-denied ranges (link-local
169.254.0.0/16 with the cloud metadata address, loopback, multicast, reserved,
this host's sandbox subnet) → reject; ``deny_out`` → reject; the resolvers of
the host's ``/etc/resolv.conf`` on port 53 → accept when
``allow_internet_access``; then a non-empty ``allow_out`` accepts only its
entries and rejects the rest; otherwise ``allow_internet_access`` decides, with
private ranges (RFC 1918, 100.64.0.0/10) rejected unless an ``allow_out``
lists them. The map element jumps to the sandbox's entry chain ``<id>``,
which goes to its policy chain ``<id>_p<n>``: a live change adds ``_p<n+1>``
and puts it first (additions only, so no RCU wait), then prunes the old one.

Everything that changes rules is one ``nft -f`` transaction (atomic); links
are set up with ``ip -batch``. Spawning these is faster than netlink from
Python here, and needs no dependency. The rule text is
rendered by pure functions (:class:`Plan`), tested without root.

Four modules by concern: ``netpolicy.py`` (the policy as the SDK sends it,
and its names resolved), ``netplan.py`` (names and rule text, pure),
``netns.py`` (entering a namespace, running the commands), and this one, the
:class:`Network` of a host that drives them. It re-exports their public
names, so ``network.X`` keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .netns import NetworkError, connect_local, forwarding, in_netns, run
from .netplan import (
    ALWAYS_DENIED,
    DEFAULT_SUBNET,
    NETNS_DIR,
    PRIVATE,
    REJECT,
    SANDBOX_IF,
    Lease,
    Plan,
    check_subnet,
)
from .netpolicy import (
    CLOSED,
    DEFAULT_RULES,
    MAX_ENTRIES,
    Entry,
    PolicyError,
    Rules,
    normalize_policy,
    parse_entry,
    read_resolvers,
    resolve,
)

__all__ = [
    "ALWAYS_DENIED",
    "CLOSED",
    "DEFAULT_RULES",
    "DEFAULT_SUBNET",
    "MAX_ENTRIES",
    "NETNS_DIR",
    "PRIVATE",
    "REJECT",
    "SANDBOX_IF",
    "Config",
    "Entry",
    "Lease",
    "Network",
    "NetworkError",
    "Plan",
    "PolicyError",
    "Rules",
    "check_subnet",
    "connect_local",
    "in_netns",
    "normalize_policy",
    "parse_entry",
    "read_resolvers",
    "resolve",
]

log = logging.getLogger("sandboxd.host")

_NETNS_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


@dataclass(frozen=True, slots=True)
class Config:
    """``--net-router`` (None: the host's own namespace) and ``--net-subnet``."""

    router: str | None = None
    subnet: str = DEFAULT_SUBNET

    def __post_init__(self) -> None:
        if self.router is not None and not _NETNS_NAME.match(self.router):
            raise ValueError(f"--net-router {self.router!r} is not a network namespace name")
        check_subnet(self.subnet)


class Network:
    """This host's sandboxes' network. Disabled (loopback-only sandboxes) when
    ``config`` is None or the machine lacks what it needs; ``reason`` says why.
    """

    def __init__(self, tag: str, config: Config | None) -> None:
        self.config = config
        self.plan = Plan.make(tag, config.subnet if config else DEFAULT_SUBNET)
        self.enabled = False
        self.reason: str | None = "disabled (--no-net)" if config is None else "not started"
        self.leases: dict[str, Lease] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Policy generations per sandbox (the last is in force; see Plan.nft_swap).
        self._gens: dict[str, list[int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._forwarding_set = False  # this run turned ip_forward on
        self.last_setup_s: float | None = None
        self.last_apply_s: float | None = None

    # commands -------------------------------------------------------------------

    @property
    def router_path(self) -> str | None:
        router = self.config.router if self.config else None
        return str(NETNS_DIR / router) if router else None

    def _ip(self, *args: str) -> list[str]:
        router = self.config.router if self.config else None
        return ["ip", *(["-n", router] if router else []), *args]

    def _nft_argv(self, *args: str) -> list[str]:
        path = self.router_path
        return [*(["nsenter", f"--net={path}", "--"] if path else []), "nft", *args]

    async def _nft(self, text: str) -> None:
        """One transaction: all of ``text`` or nothing."""
        await run(self._nft_argv("-f", "-"), text)

    def describe(self) -> str:
        if not self.enabled:
            return f"loopback only ({self.reason})"
        where = (
            f"netns {self.config.router}" if self.config and self.config.router else "host netns"
        )
        return (
            f"routed veth per sandbox from {self.plan.subnet}, router in {where}, "
            f"nft table inet {self.plan.table}"
        )

    # start-up and recovery ----------------------------------------------------------

    async def start(self) -> None:
        """Check the tools and the router namespace, enable forwarding there, find our leases."""
        if self.config is None:
            return
        missing = [t for t in ("ip", "nft", "nsenter") if shutil.which(t) is None]
        if missing:
            self._disable(f"{', '.join(missing)} not found (apt-get install iproute2 nftables)")
            return
        path = self.router_path
        if path is not None and not Path(path).exists():
            self._disable(f"router network namespace {self.config.router!r} does not exist")
            return
        try:
            self._forwarding_set = await in_netns(path, lambda: forwarding("1"))
            await run(["nft", "--version"])
            self.leases = await self._discover()
        except OSError as exc:
            self._disable(str(exc))
            return
        self.plan = Plan.make(self.plan.tag, self.config.subnet, read_resolvers())
        self.enabled = True
        self.reason = None

    def _disable(self, reason: str) -> None:
        self.enabled = False
        self.reason = reason
        log.warning("sandbox networking is off, sandboxes get loopback only: %s", reason)

    async def _discover(self) -> dict[str, Lease]:
        """Our veths in the router namespace: the name gives the index, the alias the sandbox."""
        out = await run(self._ip("-j", "link", "show"))
        leases: dict[str, Lease] = {}
        for link in json.loads(out or b"[]"):
            name, sid = link.get("ifname", ""), link.get("ifalias") or ""
            index = self.plan.index_of(name)
            if index is None:
                continue
            try:
                lease = self.plan.lease(sid, index)
            except ValueError:
                lease = None
            if sid and lease is not None and lease.veth == name:
                leases[sid] = lease
            else:
                log.info("removing stray sandbox veth %s", name)
                with contextlib.suppress(OSError):
                    await run(self._ip("link", "del", name))
        return leases

    async def sweep(self, keep: dict[str, dict[str, Any] | None]) -> None:
        """Start-up: drop what no live sandbox owns; rebuild the table for those that are left.

        ``keep``: the live sandboxes' policies by id.
        """
        if not self.enabled:
            return
        for sid in [s for s in self.leases if s not in keep]:
            await self.teardown(sid)
        with contextlib.suppress(OSError):
            for p in NETNS_DIR.iterdir():
                sid = p.name[len(self.plan.netns_prefix) :]
                # Only this module's namespaces (<tag>-<sandbox id>): the gVisor
                # runtime's (<tag>-gv-…, <tag>-gc-…) are its own to sweep.
                ours = p.name.startswith(self.plan.netns_prefix) and sid.startswith("sbx-")
                if ours and sid not in keep:
                    log.info("removing leftover network namespace %s", p.name)
                    with contextlib.suppress(OSError):
                        await run(["ip", "netns", "del", p.name])
        entries = [
            (lease, await resolve(keep[sid], strict=False)) for sid, lease in self.leases.items()
        ]
        self._gens = {sid: [0] for sid in self.leases}
        try:
            await self._nft(self.plan.nft_table(entries))
        except OSError as exc:
            self._disable(f"nft could not load table inet {self.plan.table}: {exc}")

    async def close(self) -> None:
        """The host stops: sandboxes that live on keep their rules; with none, the table goes."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if not self.enabled or self.leases:
            return
        with contextlib.suppress(OSError):
            await self._nft(f"delete table inet {self.plan.table}\n")
            # This run turned forwarding on, and no sandboxd host's table is left
            # in the router (another host may still route through it): turn it off.
            tables = (await run(self._nft_argv("list", "tables"))).decode()
            if self._forwarding_set and "inet sandboxd" not in tables:
                await in_netns(self.router_path, lambda: forwarding("0"))

    # per sandbox ----------------------------------------------------------------

    def _lock(self, sid: str) -> asyncio.Lock:
        return self._locks.setdefault(sid, asyncio.Lock())

    def _allocate(self, sid: str) -> Lease:
        used = {lease.index for lease in self.leases.values()}
        index = next((i for i in range(2, self.plan.max_index + 1) if i not in used), None)
        if index is None:
            raise NetworkError(f"no free address left in {self.plan.subnet}")
        lease = self.plan.lease(sid, index)
        self.leases[sid] = lease
        return lease

    async def setup(self, sid: str, policy: dict[str, Any] | None) -> str | None:
        """The sandbox's netns, veth and chain; its netns path (None: loopback only)."""
        if not self.enabled:
            return None
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with self._lock(sid):
            rules = await resolve(policy, strict=False)
            lease = self._allocate(sid)
            self._gens[sid] = [0]
            try:
                await run(["ip", "netns", "add", lease.netns])

                async def links() -> None:
                    await run(self._ip("-batch", "-"), self.plan.router_batch(lease))
                    await run(
                        ["ip", "-n", lease.netns, "-batch", "-"], self.plan.sandbox_batch(lease)
                    )

                await asyncio.gather(links(), self._nft(self.plan.nft_add(lease, rules)))
            except BaseException:
                await asyncio.shield(self._remove(lease, [0]))
                self.leases.pop(sid, None)
                self._gens.pop(sid, None)
                raise
        self.last_setup_s = loop.time() - t0
        log.debug("network of %s set up in %.1f ms", sid, self.last_setup_s * 1000)
        return lease.netns_path

    async def apply(self, sid: str, policy: dict[str, Any] | None, strict: bool = False) -> bool:
        """Replace the sandbox's policy atomically; False if it has no network of its own."""
        rules = await resolve(policy, strict=strict)
        if not self.enabled:
            return False
        async with self._lock(sid):
            lease = self.leases.get(sid)
            if lease is None:
                return False
            gens = self._gens.setdefault(sid, [0])
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await self._nft(self.plan.nft_swap(lease, rules, gens[-1] + 1))
            gens.append(gens[-1] + 1)
            self.last_apply_s = loop.time() - t0
        # The old generation is unreachable now; removing it costs the kernel an
        # RCU grace period, which the reply does not wait for.
        task = asyncio.ensure_future(self._prune(sid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _prune(self, sid: str) -> None:
        async with self._lock(sid):
            lease, gens = self.leases.get(sid), self._gens.get(sid)
            if lease is None or not gens or len(gens) < 2:
                return
            try:
                await self._nft(self.plan.nft_prune(lease, gens[-1], gens[:-1]))
            except OSError as exc:
                log.warning("could not prune old policy chains of %s: %s", sid, exc)
                return
            del gens[:-1]

    async def teardown(self, sid: str) -> None:
        """Chain, map element, veth and netns; never raises (a leftover is swept at start-up)."""
        if self.config is None:
            return
        async with self._lock(sid):
            lease = self.leases.get(sid)
            if lease is not None:
                await self._remove(lease, self._gens.get(sid, [0]))
                self.leases.pop(sid, None)
                self._gens.pop(sid, None)
            elif (NETNS_DIR / self.plan.netns(sid)).exists():
                with contextlib.suppress(OSError):
                    await run(["ip", "netns", "del", self.plan.netns(sid)])
        self._locks.pop(sid, None)

    async def _remove(self, lease: Lease, gens: list[int]) -> None:
        async def nft() -> None:
            cmds = self.plan.nft_remove(lease, gens)
            try:
                await self._nft("".join(cmds))
            except OSError:
                for cmd in cmds:  # one of them was already gone
                    with contextlib.suppress(OSError):
                        await self._nft(cmd)

        async def link() -> None:
            with contextlib.suppress(OSError):
                await run(self._ip("link", "del", lease.veth))

        async def netns() -> None:
            if (NETNS_DIR / lease.netns).exists():
                try:
                    await run(["ip", "netns", "del", lease.netns])
                except OSError as exc:
                    log.warning("could not remove network namespace %s: %s", lease.netns, exc)

        await asyncio.gather(nft(), link(), netns())

    def netns_path(self, sid: str) -> str | None:
        lease = self.leases.get(sid)
        return lease.netns_path if lease is not None else None
