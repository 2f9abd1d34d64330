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
Python here (``isolation.md`` §1.2), and needs no dependency. The rule text is
rendered by pure functions (:class:`Plan`), tested without root.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("sandboxd.host")

DEFAULT_SUBNET = "10.88.0.0/16"
NETNS_DIR = Path("/run/netns")
RESOLV_CONF = Path("/etc/resolv.conf")
SANDBOX_IF = "eth0"
MAX_ENTRIES = 256  # per list: keeps a policy (and its nft transaction) small
RESOLVE_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 15.0

# Never reachable from a sandbox, whatever its policy says.
ALWAYS_DENIED = tuple(
    IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local: the cloud metadata service (169.254.169.254)
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the broadcast address
    )
)
# Denied when "internet on" means the internet, not the host's LAN; an
# allow_out entry that covers them opens them (allow_out is default-deny).
PRIVATE = tuple(
    IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)
REJECT = "reject with icmp type admin-prohibited"

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_CHAIN_OK = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,127}$")
_NETNS_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


class NetworkError(OSError):
    """A network command failed (caught by the launcher like any OS failure)."""


class PolicyError(ValueError):
    """A ``network`` policy the API must refuse (400, with ``code``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- the policy, as the SDK sends it (pure) -----------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One allow_out/deny_out destination: a network, or a hostname resolved at apply time."""

    text: str
    net: IPv4Network | None = None
    host: str | None = None
    ipv6: bool = False


def parse_entry(raw: Any, key: str) -> Entry:
    """An IPv4 address, a CIDR or a hostname; an optional ``:port`` is accepted and ignored."""
    if not isinstance(raw, str) or not raw.strip():
        raise PolicyError("INVALID_NETWORK_DESTINATION", f"network.{key} entries must be strings")
    text = raw.strip()
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        net = None
    if net is None:
        # "1.2.3.4:443", "api.example.com:443": the SDK accepts a port suffix,
        # which does not make the rule port-specific.
        base, sep, port = text.rpartition(":")
        if sep and port.isdigit() and 0 < int(port) < 65536 and ":" not in base:
            return replace(parse_entry(base, key), text=text) if base else _bad_entry(text, key)
        host = text[:-1] if text.endswith(".") else text
        if len(host) <= 253 and all(_LABEL.match(label) for label in host.split(".")):
            if host.replace(".", "").isdigit():
                return _bad_entry(text, key)  # "1.2.3" is not a hostname
            return Entry(text, host=host.lower())
        return _bad_entry(text, key)
    if net.version == 6:
        if key == "allow_out":
            raise PolicyError(
                "INVALID_NETWORK_DESTINATION",
                f"network.allow_out entry {text!r} is IPv6: sandboxes have IPv4 egress only",
            )
        return Entry(text, ipv6=True)  # all IPv6 is denied anyway
    return Entry(text, net=net)  # type: ignore[arg-type]


def _bad_entry(text: str, key: str) -> Entry:
    raise PolicyError(
        "INVALID_NETWORK_DESTINATION",
        f"network.{key} entry {text!r} is not an IPv4 address, a CIDR or a hostname",
    )


def normalize_policy(value: Any) -> dict[str, Any]:
    """A create/PATCH ``network`` object → the stored form (all three keys), or PolicyError."""
    if not isinstance(value, dict):
        raise PolicyError("INVALID_NETWORK", "network must be an object")
    unknown = sorted(set(value) - {"allow_internet_access", "allow_out", "deny_out"})
    if unknown:
        raise PolicyError("INVALID_NETWORK", f"unknown network field(s): {', '.join(unknown)}")
    internet = value.get("allow_internet_access", True)
    if not isinstance(internet, bool):
        raise PolicyError("INVALID_NETWORK", "network.allow_internet_access must be a boolean")
    out: dict[str, Any] = {"allow_internet_access": internet}
    for key in ("allow_out", "deny_out"):
        items = value.get(key)
        if items is None:
            items = []
        if not isinstance(items, list):
            raise PolicyError("INVALID_NETWORK", f"network.{key} must be a list of destinations")
        if len(items) > MAX_ENTRIES:
            raise PolicyError(
                "INVALID_NETWORK", f"network.{key} has more than {MAX_ENTRIES} entries"
            )
        out[key] = [parse_entry(item, key).text for item in items]
    return out


@dataclass(frozen=True, slots=True)
class Rules:
    """A policy with its hostnames resolved: what one sandbox's chain enforces."""

    internet: bool = True
    allow_listed: bool = False  # allow_out was non-empty: default deny
    allow: tuple[IPv4Network, ...] = ()
    deny: tuple[IPv4Network, ...] = ()


DEFAULT_RULES = Rules()
# Nothing out (DNS included): what a policy becomes when one of its deny names
# cannot be resolved at a claim or restart.
CLOSED = Rules(internet=False, allow_listed=True)

Lookup = Callable[[str], Awaitable[list[str]]]


async def _lookup(host: str) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(
        loop.getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_STREAM),
        RESOLVE_TIMEOUT_S,
    )
    return [str(info[4][0]) for info in infos]


async def resolve(
    policy: dict[str, Any] | None, strict: bool, lookup: Lookup | None = None
) -> Rules:
    """Resolve a stored policy's hostnames (at apply time; DNS changes need a PATCH or restart).

    ``strict`` (create, PATCH): a name that does not resolve is a PolicyError
    (``UNRESOLVABLE_DESTINATION``). Otherwise (claim, restart) an allow entry
    that does not resolve opens nothing, and a deny entry that does not resolve
    closes **everything** (:data:`CLOSED`): a DNS hiccup must not reopen what
    the policy shut; the next PATCH or restart resolves again.
    """
    if policy is None:
        return DEFAULT_RULES
    lookup = lookup or _lookup

    async def one(key: str, host: str) -> list[str] | None:
        """The name's addresses; None when it does not resolve (not strict)."""
        try:
            return await lookup(host)
        except (OSError, TimeoutError, UnicodeError) as exc:
            if strict:
                raise PolicyError(
                    "UNRESOLVABLE_DESTINATION",
                    f"network.{key} entry {host!r} does not resolve: {exc or type(exc).__name__}",
                ) from exc
            log.warning("network.%s entry %r does not resolve: %s", key, host, exc)
            return None

    if strict:
        policy = normalize_policy(policy)
    lists: dict[str, list[IPv4Network]] = {}
    unresolved_deny = False
    for key in ("allow_out", "deny_out"):
        items = policy.get(key) or []
        entries = []
        for item in items if isinstance(items, list) else [items]:
            try:
                entries.append(parse_entry(item, key))
            except PolicyError as exc:  # a record stored before policies were checked
                log.warning("ignoring network.%s entry %r: %s", key, item, exc)
        hosts = sorted({e.host for e in entries if e.host})
        addrs = await asyncio.gather(*(one(key, h) for h in hosts))
        if key == "deny_out" and any(found is None for found in addrs):
            unresolved_deny = True
        nets = [e.net for e in entries if e.net is not None]
        nets += [IPv4Network(a) for found in addrs for a in found or [] if ":" not in a]
        lists[key] = nets
    if unresolved_deny:
        log.warning("a deny_out name did not resolve: the sandbox's egress is closed")
        return CLOSED
    return Rules(
        internet=policy.get("allow_internet_access", True) is not False,
        allow_listed=bool(policy.get("allow_out")),
        allow=tuple(ipaddress.collapse_addresses(lists["allow_out"])),
        deny=tuple(ipaddress.collapse_addresses(lists["deny_out"])),
    )


def read_resolvers(path: Path = RESOLV_CONF) -> tuple[IPv4Address, ...]:
    """The host's IPv4 nameservers a sandbox can reach (loopback stubs cannot be)."""
    found: list[IPv4Address] = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    addr = ipaddress.ip_address(parts[1])
                    if addr.version == 4 and not addr.is_loopback and addr not in found:
                        found.append(addr)  # type: ignore[arg-type]
    return tuple(found)


# -- names and rule text (pure) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lease:
    """One sandbox's slot: its address (index in the subnet), veth and netns names."""

    sandbox_id: str
    index: int
    address: IPv4Address
    veth: str
    netns: str

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.netns)


def _nft_set(items: Iterable[object]) -> str:
    return "{ " + ", ".join(str(i) for i in items) + " }"


@dataclass(frozen=True, slots=True)
class Plan:
    """Names, addresses and rule text for one host's sandboxes; no I/O."""

    tag: str
    subnet: IPv4Network
    resolvers: tuple[IPv4Address, ...] = ()

    @classmethod
    def make(cls, tag: str, subnet: str, resolvers: tuple[IPv4Address, ...] = ()) -> Plan:
        return cls(tag, check_subnet(subnet), resolvers)

    # names --------------------------------------------------------------------

    @property
    def table(self) -> str:
        return self.tag if _CHAIN_OK.match(self.tag) else "sandboxd_" + _digest(self.tag)

    @property
    def ifprefix(self) -> str:
        """``s`` + 8 hex: the tag's own digest when it ends in one (IFNAMSIZ is 16)."""
        tail = self.tag.rsplit("-", 1)[-1]
        return "s" + (tail if re.fullmatch(r"[0-9a-f]{8}", tail) else _digest(self.tag))

    @property
    def gateway(self) -> IPv4Address:
        return self.subnet.network_address + 1

    @property
    def max_index(self) -> int:
        return min(self.subnet.num_addresses - 2, 0xFFFFFF)

    def veth(self, index: int) -> str:
        return f"{self.ifprefix}{index:06x}"

    def index_of(self, veth: str) -> int | None:
        rest = veth[len(self.ifprefix) :] if veth.startswith(self.ifprefix) else ""
        return int(rest, 16) if re.fullmatch(r"[0-9a-f]{6}", rest) else None

    def netns(self, sandbox_id: str) -> str:
        return f"{self.tag}-{sandbox_id}"

    @property
    def netns_prefix(self) -> str:
        return f"{self.tag}-"

    def chain(self, sandbox_id: str) -> str:
        return sandbox_id if _CHAIN_OK.match(sandbox_id) else "sbx_" + _digest(sandbox_id)

    def lease(self, sandbox_id: str, index: int) -> Lease:
        if not 2 <= index <= self.max_index:
            raise ValueError(f"index {index} is outside {self.subnet}")
        return Lease(
            sandbox_id,
            index,
            self.subnet.network_address + index,
            self.veth(index),
            self.netns(sandbox_id),
        )

    # ip -batch ------------------------------------------------------------------

    def router_batch(self, lease: Lease) -> str:
        """In the router namespace: the pair (its sandbox end straight into the netns), routes."""
        v, gw = lease.veth, self.gateway
        return (
            f"link add {v} type veth peer name {SANDBOX_IF} netns {lease.netns}\n"
            f"link set dev {v} alias {lease.sandbox_id}\n"
            f"addr add {gw}/32 dev {v}\n"
            f"link set dev {v} up\n"
            f"route add {lease.address}/32 dev {v} scope link src {gw}\n"
        )

    def sandbox_batch(self, lease: Lease) -> str:
        gw, a = self.gateway, lease.address
        return (
            "link set dev lo up\n"
            f"addr add {a}/32 dev {SANDBOX_IF}\n"
            f"link set dev {SANDBOX_IF} up\n"
            f"route add {gw}/32 dev {SANDBOX_IF} scope link\n"
            f"route add default via {gw} dev {SANDBOX_IF} src {a}\n"
        )

    # nft ----------------------------------------------------------------------

    def chain_rules(self, lease: Lease, rules: Rules) -> list[str]:
        """The sandbox's forward chain, first match wins (see the module doc)."""
        out = [
            "meta nfproto != ipv4 drop",
            f"ip saddr != {lease.address} drop",
            "ct state established,related accept",
            f"ip daddr {_nft_set(ipaddress.collapse_addresses([*ALWAYS_DENIED, self.subnet]))} "
            + REJECT,
        ]
        if rules.deny:
            out.append(f"ip daddr {_nft_set(rules.deny)} {REJECT}")
        if rules.internet and self.resolvers:
            out.append(
                f"ip daddr {_nft_set(self.resolvers)} meta l4proto {{ tcp, udp }} th dport 53 accept"
            )
        if rules.allow_listed:
            if rules.allow:
                out.append(f"ip daddr {_nft_set(rules.allow)} accept")
            out.append(REJECT)
        elif rules.internet:
            out.append(f"ip daddr {_nft_set(PRIVATE)} {REJECT}")
            out.append("accept")
        else:
            out.append(REJECT)
        return out

    def policy_chain(self, sandbox_id: str, gen: int) -> str:
        return f"{self.chain(sandbox_id)}_p{gen}"

    def _policy_text(self, lease: Lease, rules: Rules, gen: int) -> str:
        t, p = self.table, self.policy_chain(lease.sandbox_id, gen)
        return f"add chain inet {t} {p}\n" + "".join(
            f"add rule inet {t} {p} {r}\n" for r in self.chain_rules(lease, rules)
        )

    def nft_add(self, lease: Lease, rules: Rules) -> str:
        """A new sandbox: its entry chain (the map's target) going to policy generation 0."""
        t, c = self.table, self.chain(lease.sandbox_id)
        return (
            f"add chain inet {t} {c}\n"
            + self._policy_text(lease, rules, 0)
            + f"add rule inet {t} {c} goto {self.policy_chain(lease.sandbox_id, 0)}\n"
            + f'add element inet {t} sandboxes {{ "{lease.veth}" : jump {c} }}\n'
        )

    def nft_swap(self, lease: Lease, rules: Rules, gen: int) -> str:
        """A live policy change: the new generation, put first in the entry chain.

        Only additions, in one transaction: atomic, and no removal for the
        kernel to wait out (a transaction that removes a rule costs ~15 ms
        more here). The old generation is pruned after (:meth:`nft_prune`).
        """
        t, c = self.table, self.chain(lease.sandbox_id)
        return (
            self._policy_text(lease, rules, gen)
            + f"insert rule inet {t} {c} goto {self.policy_chain(lease.sandbox_id, gen)}\n"
        )

    def nft_prune(self, lease: Lease, gen: int, stale: Iterable[int]) -> str:
        """The entry chain with only its current generation; older generations removed."""
        t, c = self.table, self.chain(lease.sandbox_id)
        return (
            f"flush chain inet {t} {c}\n"
            f"add rule inet {t} {c} goto {self.policy_chain(lease.sandbox_id, gen)}\n"
            + "".join(
                f"delete chain inet {t} {self.policy_chain(lease.sandbox_id, g)}\n" for g in stale
            )
        )

    def nft_remove(self, lease: Lease, gens: Iterable[int] = (0,)) -> list[str]:
        """The sandbox's map element and chains (one command each, sent as one transaction)."""
        t, sid = self.table, lease.sandbox_id
        return [
            f'delete element inet {t} sandboxes {{ "{lease.veth}" }}\n',
            f"delete chain inet {t} {self.chain(sid)}\n",
            *(f"delete chain inet {t} {self.policy_chain(sid, g)}\n" for g in gens),
        ]

    def nft_table(self, entries: Iterable[tuple[Lease, Rules]]) -> str:
        """The whole table, replacing any older one atomically (start-up, recovery)."""
        t, p = self.table, f'"{self.ifprefix}*"'
        text = (
            f"table inet {t} {{}}\n"
            f"delete table inet {t}\n"
            f"table inet {t} {{\n"
            "  map sandboxes { type ifname : verdict ; }\n"
            "  chain input {\n"
            "    type filter hook input priority filter ; policy accept ;\n"
            f"    iifname {p} drop\n"
            "  }\n"
            "  chain forward {\n"
            "    type filter hook forward priority filter ; policy accept ;\n"
            f"    iifname {p} iifname vmap @sandboxes\n"
            f"    iifname {p} drop\n"
            f"    oifname {p} ct state established,related accept\n"
            f"    oifname {p} drop\n"
            "  }\n"
            "  chain postrouting {\n"
            "    type nat hook postrouting priority srcnat ; policy accept ;\n"
            f"    iifname {p} oifname != {p} masquerade\n"
            "  }\n"
            "}\n"
        )
        return text + "".join(self.nft_add(lease, rules) for lease, rules in entries)


def check_subnet(subnet: str) -> IPv4Network:
    try:
        net = IPv4Network(subnet, strict=True)
    except ValueError as exc:
        raise ValueError(f"--net-subnet {subnet!r}: {exc}") from exc
    if not 8 <= net.prefixlen <= 29:
        raise ValueError(f"--net-subnet {subnet!r}: the prefix must be between /8 and /29")
    return net


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


# -- entering a namespace (I/O) ---------------------------------------------------

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


async def in_netns(path: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a new thread that has entered the network namespace at ``path``.

    setns(CLONE_NEWNET) changes only the calling thread, and a pooled thread
    must never be left in a sandbox's namespace: each call gets its own thread,
    which ends with ``fn``. Sockets made there stay in that namespace.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            if ok and isinstance(value, socket.socket):
                value.close()  # the caller gave up (cancelled)
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def target() -> None:
        try:
            if path is not None:
                _setns(path)
            value: Any = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, False, exc)
        else:
            loop.call_soon_threadsafe(settle, True, value)

    threading.Thread(target=target, name="sandboxd-netns", daemon=True).start()
    return await fut


def connect_local(port: int, timeout: float = 5.0) -> socket.socket:
    """In the calling thread's namespace: a non-blocking socket connected to the port on loopback."""
    err: OSError | None = None
    for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((addr, port))
            sock.setblocking(False)
            return sock
        except OSError as exc:
            sock.close()
            err = err or exc
    assert err is not None
    raise err


def netns_of_pids(pids: Iterable[int]) -> str | None:
    """``/proc/<pid>/ns/net`` of the first process not in our own network namespace."""
    try:
        own = os.readlink("/proc/self/ns/net")
    except OSError:
        return None
    for pid in pids:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/ns/net") != own:
                return f"/proc/{pid}/ns/net"
    return None


# -- the host's sandboxes' network (I/O) -----------------------------------------


@dataclass(frozen=True, slots=True)
class Config:
    """``--net-router`` (None: the host's own namespace) and ``--net-subnet``."""

    router: str | None = None
    subnet: str = DEFAULT_SUBNET

    def __post_init__(self) -> None:
        if self.router is not None and not _NETNS_NAME.match(self.router):
            raise ValueError(f"--net-router {self.router!r} is not a network namespace name")
        check_subnet(self.subnet)


async def _run(argv: list[str], stdin: str | None = None) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), COMMAND_TIMEOUT_S
        )
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    if proc.returncode != 0:
        what = " ".join(a for a in argv if not a.startswith("--net="))
        raise NetworkError(f"{what}: {err.decode(errors='replace').strip() or proc.returncode}")
    return out


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
        await _run(self._nft_argv("-f", "-"), text)

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
            self._forwarding_set = await in_netns(path, lambda: _forwarding("1"))
            await _run(["nft", "--version"])
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
        out = await _run(self._ip("-j", "link", "show"))
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
                    await _run(self._ip("link", "del", name))
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
                if p.name.startswith(self.plan.netns_prefix) and sid not in keep:
                    log.info("removing leftover network namespace %s", p.name)
                    with contextlib.suppress(OSError):
                        await _run(["ip", "netns", "del", p.name])
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
            tables = (await _run(self._nft_argv("list", "tables"))).decode()
            if self._forwarding_set and "inet sandboxd" not in tables:
                await in_netns(self.router_path, lambda: _forwarding("0"))

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
                await _run(["ip", "netns", "add", lease.netns])

                async def links() -> None:
                    await _run(self._ip("-batch", "-"), self.plan.router_batch(lease))
                    await _run(
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
                    await _run(["ip", "netns", "del", self.plan.netns(sid)])
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
                await _run(self._ip("link", "del", lease.veth))

        async def netns() -> None:
            if (NETNS_DIR / lease.netns).exists():
                try:
                    await _run(["ip", "netns", "del", lease.netns])
                except OSError as exc:
                    log.warning("could not remove network namespace %s: %s", lease.netns, exc)

        await asyncio.gather(nft(), link(), netns())

    def netns_path(self, sid: str) -> str | None:
        lease = self.leases.get(sid)
        return lease.netns_path if lease is not None else None


def _forwarding(value: str) -> bool:
    """Set ``net.ipv4.ip_forward`` of the calling thread's namespace; False if it already was."""
    path = "/proc/sys/net/ipv4/ip_forward"
    with open(path) as f:
        if f.read().strip() == value:
            return False
    with open(path, "w") as f:
        f.write(value)
    return True
