"""Names, addresses and rule text for one host's sandboxes' network; no I/O.

:class:`Plan` turns a host's tag and subnet into the names it uses (nft
table, veths, netns, chains) and renders what ``network.py`` runs: the
``ip -batch`` scripts of a sandbox's veth pair and the nft transactions of its
policy chain (see ``network.py`` for the shape). Tested without root.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from .netpolicy import Rules

DEFAULT_SUBNET = "10.88.0.0/16"
NETNS_DIR = Path("/run/netns")
SANDBOX_IF = "eth0"

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

_CHAIN_OK = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,127}$")


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
