"""Sandbox networking without root: policy validation, resolution, the rule text, ingress routing.

The rule text is checked two ways: as text (names, the shape of each
transaction) and by meaning, with a small evaluator of the chain the host
renders (first match wins), so "deny wins" and "allow_out is default-deny" are
asserted as behaviour, not as strings. ``tests/test_host_network.py`` runs the
same text through nft in namespaces of its own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re

import pytest

from sandboxd.host import model
from sandboxd.host.model import ApiError, Record, info, parse_create, parse_update
from sandboxd.host.network.sandbox_network import (
    CLOSED,
    DEFAULT_RULES,
    Config,
    Plan,
    PolicyError,
    Rules,
    normalize_policy,
    read_resolvers,
    resolve,
)
from sandboxd.host.proxy.ingress import target_of

TAG = "sandboxd-host-1a2b3c4d"
RESOLVER = ipaddress.IPv4Address("10.255.255.53")


def _plan(subnet: str = "10.88.0.0/16") -> Plan:
    return Plan.make(TAG, subnet, (RESOLVER,))


# -- validation -------------------------------------------------------------------


def test_a_policy_is_stored_with_all_three_keys() -> None:
    assert normalize_policy({}) == {"allow_internet_access": True, "allow_out": [], "deny_out": []}
    given = {
        "allow_internet_access": False,
        "allow_out": ["8.8.8.8", "10.0.0.0/8", " api.example.com ", "1.2.3.4:443", "a.b:8443"],
        "deny_out": ["10.1.0.0/16", "2001:db8::/32"],
    }
    assert normalize_policy(given) == {
        "allow_internet_access": False,
        "allow_out": ["8.8.8.8", "10.0.0.0/8", "api.example.com", "1.2.3.4:443", "a.b:8443"],
        "deny_out": ["10.1.0.0/16", "2001:db8::/32"],
    }


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ([], "INVALID_NETWORK"),
        ({"allow_internet_access": "yes"}, "INVALID_NETWORK"),
        ({"allow_out": "1.2.3.4"}, "INVALID_NETWORK"),
        ({"bandwidth": 1}, "INVALID_NETWORK"),
        ({"allow_out": ["1.2.3.4"] * 257}, "INVALID_NETWORK"),
        ({"allow_out": [""]}, "INVALID_NETWORK_DESTINATION"),
        ({"allow_out": [7]}, "INVALID_NETWORK_DESTINATION"),
        ({"deny_out": ["10.0.0.0/33"]}, "INVALID_NETWORK_DESTINATION"),
        ({"deny_out": ["300.1.1.1"]}, "INVALID_NETWORK_DESTINATION"),
        ({"deny_out": ["1.2.3"]}, "INVALID_NETWORK_DESTINATION"),
        ({"deny_out": ["*.example.com"]}, "INVALID_NETWORK_DESTINATION"),
        ({"deny_out": ["a..b"]}, "INVALID_NETWORK_DESTINATION"),
        ({"deny_out": ["-a.b"]}, "INVALID_NETWORK_DESTINATION"),
        ({"deny_out": ["a.b:99999"]}, "INVALID_NETWORK_DESTINATION"),
        ({"deny_out": ["has space.com"]}, "INVALID_NETWORK_DESTINATION"),
        ({"allow_out": ["2001:db8::1"]}, "INVALID_NETWORK_DESTINATION"),  # no IPv6 egress
    ],
)
def test_a_bad_policy_is_a_400_with_a_code_at_create_and_patch(value: object, code: str) -> None:
    with pytest.raises(PolicyError) as e:
        normalize_policy(value)
    assert e.value.code == code
    for parse in (
        lambda: parse_create({"network": value}, host_cpus=2),
        lambda: parse_update({"network": value}),
    ):
        with pytest.raises(ApiError) as api:
            parse()
        assert (api.value.status, api.value.code) == (400, code)


def test_patch_network_replaces_and_null_clears() -> None:
    assert parse_update({"network": {"deny_out": ["1.2.3.4"]}}) == {
        "network": {"allow_internet_access": True, "allow_out": [], "deny_out": ["1.2.3.4"]}
    }
    assert parse_update({"network": None}) == {"network": None}
    assert parse_create({}).network is None  # no policy: the default (internet on)


# -- resolution -----------------------------------------------------------------------


def _resolve(policy: dict[str, object] | None, strict: bool = False) -> Rules:
    table = {"api.example.com": ["203.0.113.5", "203.0.113.6"], "v6only.example": []}

    async def lookup(host: str) -> list[str]:
        if host not in table:
            raise OSError(f"{host}: Name or service not known")
        return table[host]

    return asyncio.run(resolve(policy, strict=strict, lookup=lookup))


def test_hostnames_are_resolved_at_apply_time() -> None:
    rules = _resolve(normalize_policy({"allow_out": ["api.example.com:443", "198.51.100.0/25"]}))
    assert rules.allow_listed and rules.internet
    assert [str(n) for n in rules.allow] == [
        "198.51.100.0/25",
        "203.0.113.5/32",
        "203.0.113.6/32",
    ]
    assert _resolve(None) == DEFAULT_RULES


def test_an_unresolvable_name_is_refused_at_create_and_patch_and_opens_nothing_later() -> None:
    policy = normalize_policy({"allow_out": ["no-such.invalid"], "deny_out": ["no-such.invalid"]})
    with pytest.raises(PolicyError) as e:
        _resolve(policy, strict=True)
    assert e.value.code == "UNRESOLVABLE_DESTINATION"
    # At a claim or a restart: no address, but allow_out was given, so still default-deny.
    rules = _resolve(policy)
    assert (rules.allow, rules.deny, rules.allow_listed) == ((), (), True)
    # A deny name that does not resolve then closes everything, DNS included:
    # a hiccup must not reopen what the policy shut.
    deny_only = normalize_policy({"deny_out": ["no-such.invalid", "198.51.100.0/24"]})
    assert _resolve(deny_only) == CLOSED and not CLOSED.internet and CLOSED.allow_listed
    # An allow name that does not resolve alone opens nothing, closes nothing else.
    allow_only = normalize_policy(
        {"allow_out": ["no-such.invalid"], "deny_out": ["api.example.com"]}
    )
    assert _resolve(allow_only).deny and _resolve(allow_only) != CLOSED
    # A deny name with no IPv4 address resolves (IPv6 is dropped anyway): not closed.
    assert _resolve(normalize_policy({"deny_out": ["v6only.example"]})) != CLOSED


def test_a_record_stored_before_policies_were_checked_does_not_stop_the_host() -> None:
    old = {"allow_internet_access": False, "allow_out": ["1.2.3.4", "not a host!"]}
    rules = _resolve(old)  # at start-up: the bad entry is skipped (and logged)
    assert (rules.internet, [str(n) for n in rules.allow]) == (False, ["1.2.3.4/32"])
    with pytest.raises(PolicyError):
        _resolve(old, strict=True)


def test_overlapping_entries_are_merged() -> None:
    rules = _resolve(normalize_policy({"deny_out": ["10.0.0.0/8", "10.1.2.3", "10.0.0.0/16"]}))
    assert [str(n) for n in rules.deny] == ["10.0.0.0/8"]


def test_the_resolvers_come_from_resolv_conf_without_loopback(tmp_path) -> None:  # type: ignore[no-untyped-def]
    conf = tmp_path / "resolv.conf"
    conf.write_text("# x\nnameserver 127.0.0.53\nnameserver 10.255.255.53\nnameserver ::1\n")
    assert read_resolvers(conf) == (RESOLVER,)
    assert read_resolvers(tmp_path / "missing") == ()


# -- names and addresses ----------------------------------------------------------------


def test_names_fit_the_kernel_and_carry_the_host_tag() -> None:
    plan = _plan()
    lease = plan.lease("sbx-0123456789abcdef", 2)
    assert plan.table == TAG
    assert lease.veth == "s1a2b3c4d000002" and len(lease.veth) <= 15  # IFNAMSIZ - 1
    assert plan.index_of(lease.veth) == 2 and plan.index_of("s1a2b3c4dzzzzzz") is None
    assert plan.index_of("s99999999000002") is None  # another host's
    assert lease.netns == f"{TAG}-sbx-0123456789abcdef"
    assert lease.netns_path == f"/run/netns/{TAG}-sbx-0123456789abcdef"
    assert (str(plan.gateway), str(lease.address)) == ("10.88.0.1", "10.88.0.2")
    assert plan.max_index == 65534
    with pytest.raises(ValueError):
        plan.lease("x", 1)  # the gateway
    # A tag without a hex digest at its end still gives a short, stable prefix.
    other = Plan.make("weird tag", "10.88.0.0/16")
    assert re.fullmatch(r"s[0-9a-f]{8}", other.ifprefix) and other.table.startswith("sandboxd_")


def test_the_subnet_and_router_are_checked() -> None:
    assert Config().router is None and Config().subnet == "10.88.0.0/16"
    for bad in ("10.88.0.0/33", "10.88.0.1/16", "fd00::/64", "10.0.0.0/4", "10.0.0.0/30"):
        with pytest.raises(ValueError):
            Config(subnet=bad)
    with pytest.raises(ValueError):
        Config(router="../etc")


def test_the_links_are_a_routed_point_to_point_pair() -> None:
    plan = _plan()
    lease = plan.lease("sbx-a", 5)
    assert plan.router_batch(lease).splitlines() == [
        f"link add s1a2b3c4d000005 type veth peer name eth0 netns {TAG}-sbx-a",
        "link set dev s1a2b3c4d000005 alias sbx-a",
        "addr add 10.88.0.1/32 dev s1a2b3c4d000005",
        "link set dev s1a2b3c4d000005 up",
        "route add 10.88.0.5/32 dev s1a2b3c4d000005 scope link src 10.88.0.1",
    ]
    assert plan.sandbox_batch(lease).splitlines() == [
        "link set dev lo up",
        "addr add 10.88.0.5/32 dev eth0",
        "link set dev eth0 up",
        "route add 10.88.0.1/32 dev eth0 scope link",
        "route add default via 10.88.0.1 dev eth0 src 10.88.0.5",
    ]


# -- the chain, by meaning ----------------------------------------------------------------

_RULE = re.compile(
    r"^ip daddr (?P<set>\{[^}]*\}|\S+)(?P<dns> meta l4proto \{ tcp, udp \} th dport 53)? (?P<v>.*)$"
)


def verdict(rules: list[str], dst: str, dport: int = 443, src: str = "10.88.0.2") -> str:
    """What the chain does to a new IPv4 connection from ``src`` (first match wins)."""
    addr = ipaddress.IPv4Address(dst)
    for rule in rules:
        if rule in ("meta nfproto != ipv4 drop", "ct state established,related accept"):
            continue
        if rule.startswith("ip saddr != "):
            if src != rule.split()[3]:
                return "drop"
            continue
        if rule in ("accept", "drop") or rule.startswith("reject"):
            return rule.split()[0]
        m = _RULE.match(rule)
        assert m, rule
        nets = [ipaddress.IPv4Network(n) for n in m["set"].strip("{} ").split(", ")]
        if any(addr in n for n in nets) and (not m["dns"] or dport == 53):
            return m["v"].split()[0]
    raise AssertionError("the chain has no final verdict")


def _chain(policy: dict[str, object] | None) -> list[str]:
    plan = _plan()
    rules = _resolve(normalize_policy(policy) if policy is not None else None)
    return plan.chain_rules(plan.lease("sbx-a", 2), rules)


def test_the_default_is_the_internet_but_not_the_lan_nor_the_metadata_service() -> None:
    chain = _chain(None)
    assert verdict(chain, "198.51.100.10") == "accept"
    for dst in ("169.254.169.254", "10.0.0.5", "192.168.1.1", "172.16.0.1", "100.64.0.1"):
        assert verdict(chain, dst) == "reject", dst
    for dst in ("10.88.0.3", "10.88.0.1", "127.0.0.1", "224.0.0.1", "255.255.255.255"):
        assert verdict(chain, dst) == "reject", dst  # other sandboxes, the gateway, …
    assert verdict(chain, str(RESOLVER), dport=53) == "accept"  # DNS, though private
    assert verdict(chain, str(RESOLVER), dport=80) == "reject"
    assert verdict(chain, "198.51.100.10", src="10.88.0.9") == "drop"  # spoofed


def test_deny_wins_and_a_non_empty_allow_out_is_default_deny() -> None:
    chain = _chain({"allow_out": ["203.0.113.0/24", "10.1.0.0/16"], "deny_out": ["203.0.113.10"]})
    assert verdict(chain, "203.0.113.20") == "accept"
    assert verdict(chain, "203.0.113.10") == "reject"  # in both: deny wins
    assert verdict(chain, "198.51.100.10") == "reject"  # not listed, internet "on"
    assert verdict(chain, "10.1.2.3") == "accept"  # private, but listed
    assert verdict(chain, "169.254.169.254") == "reject"
    assert verdict(chain, str(RESOLVER), dport=53) == "accept"  # internet on: DNS implied
    # Internet off: DNS only if the resolver itself is listed.
    chain = _chain({"allow_internet_access": False, "allow_out": ["203.0.113.0/24"]})
    assert verdict(chain, str(RESOLVER), dport=53) == "reject"
    assert verdict(chain, "203.0.113.20") == "accept"
    # A deny covering the resolver disables DNS even when allowed.
    chain = _chain({"allow_out": ["10.255.255.53"], "deny_out": ["10.255.0.0/16"]})
    assert verdict(chain, str(RESOLVER), dport=53) == "reject"


def test_internet_off_blocks_everything_and_deny_out_alone_keeps_the_rest() -> None:
    chain = _chain({"allow_internet_access": False})
    for dst in ("198.51.100.10", "203.0.113.10", str(RESOLVER)):
        assert verdict(chain, dst, dport=53) == "reject"
    chain = _chain({"deny_out": ["203.0.113.0/24"]})
    assert (verdict(chain, "203.0.113.10"), verdict(chain, "198.51.100.10")) == ("reject", "accept")
    # Nothing can open what is always denied, not even allow_out.
    chain = _chain({"allow_out": ["169.254.0.0/16", "10.88.0.0/16", "0.0.0.0/0"]})
    for dst in ("169.254.169.254", "10.88.0.7", "127.0.0.1"):
        assert verdict(chain, dst) == "reject"
    assert verdict(chain, "8.8.8.8") == "accept"


# -- the nft transactions -----------------------------------------------------------------


def test_the_table_isolates_sandboxes_and_masquerades_what_leaves() -> None:
    plan = _plan()
    lease = plan.lease("sbx-a", 2)
    text = plan.nft_table([(lease, DEFAULT_RULES)])
    # Replaces an older table of this host atomically, never another host's.
    assert text.startswith(f"table inet {TAG} {{}}\ndelete table inet {TAG}\n")
    assert 'iifname "s1a2b3c4d*" drop' in text.split("chain input")[1].split("}")[0]
    forward = text.split("chain forward")[1].split("}")[0]
    assert forward.index("iifname vmap @sandboxes") < forward.index('oifname "s1a2b3c4d*" drop')
    assert 'oifname "s1a2b3c4d*" ct state established,related accept' in forward
    assert 'iifname "s1a2b3c4d*" oifname != "s1a2b3c4d*" masquerade' in text
    assert "policy drop" not in text  # other tables (hosts) on the same hook keep their say
    assert f'add element inet {TAG} sandboxes {{ "s1a2b3c4d000002" : jump sbx-a }}' in text
    assert f"add rule inet {TAG} sbx-a goto sbx-a_p0" in text


def test_a_live_change_is_one_transaction_of_additions_then_a_prune() -> None:
    plan = _plan()
    lease = plan.lease("sbx-a", 2)
    swap = plan.nft_swap(lease, Rules(internet=False), 3)
    assert "delete" not in swap and "flush" not in swap  # nothing for the kernel to wait out
    assert swap.startswith(f"add chain inet {TAG} sbx-a_p3\n")
    assert swap.endswith(f"insert rule inet {TAG} sbx-a goto sbx-a_p3\n")
    assert swap.count("\n") == 2 + len(plan.chain_rules(lease, Rules(internet=False)))
    prune = plan.nft_prune(lease, 3, [1, 2])
    assert prune.splitlines() == [
        f"flush chain inet {TAG} sbx-a",
        f"add rule inet {TAG} sbx-a goto sbx-a_p3",
        f"delete chain inet {TAG} sbx-a_p1",
        f"delete chain inet {TAG} sbx-a_p2",
    ]
    assert plan.nft_remove(lease, [3]) == [
        f'delete element inet {TAG} sandboxes {{ "s1a2b3c4d000002" }}\n',
        f"delete chain inet {TAG} sbx-a\n",
        f"delete chain inet {TAG} sbx-a_p3\n",
    ]


# -- exposed ports --------------------------------------------------------------------------


def test_an_exposed_port_is_named_by_the_host_header() -> None:
    assert target_of("8080-sbx-0123456789abcdef.localhost:8900") == (8080, "sbx-0123456789abcdef")
    assert target_of("3000-SBX-ABC.sandbox.example.com") == (3000, "sbx-abc")
    for host in (
        "sbx-abc.local",
        "127.0.0.1:8900",
        "localhost",
        "0-sbx-abc.localhost",
        "70000-sbx-abc.localhost",
        "8080-sbx-abc",
        "8080-agent-42.localhost",
        "",
    ):
        assert target_of(host) is None, host


def test_sandbox_info_has_an_ingress_endpoint_the_sdk_turns_into_port_urls() -> None:
    from tensorlake.sandbox.models import SandboxInfo

    rec = Record.new("default", parse_create({"exposed_ports": [8080]}), 1.0)
    assert "ingress_endpoint" not in info(rec, "http://127.0.0.1:8900")  # pending
    rec.status = model.RUNNING
    out = info(rec, "http://127.0.0.1:8900")
    assert out["ingress_endpoint"] == "http://localhost:8900"
    parsed = SandboxInfo.model_validate({**out, "sandbox_id": out["id"]})
    assert parsed.url_for_port(8080) == f"http://8080-{rec.id}.localhost:8900"
    assert parsed.url_for_port(9501) == "http://127.0.0.1:8900"  # the management port
