"""A sandbox's network policy as the SDK sends it, and its hostnames resolved.

``network`` on create and PATCH (``allow_internet_access``, ``allow_out``,
``deny_out``) is checked and stored in a normal form (:func:`normalize_policy`);
at apply time its hostnames are resolved into :class:`Rules`, what one
sandbox's nft chain enforces (``netplan.py`` renders it, ``network.py``
loads it). Pure but for :func:`resolve`'s DNS lookups and
:func:`read_resolvers`' read of ``/etc/resolv.conf``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

log = logging.getLogger("sandboxd.host")

RESOLV_CONF = Path("/etc/resolv.conf")
MAX_ENTRIES = 256  # per list: keeps a policy (and its nft transaction) small
RESOLVE_TIMEOUT_S = 5.0

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class PolicyError(ValueError):
    """A ``network`` policy the API must refuse (400, with ``code``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


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
