"""SSH through a fleet's fronts: keys and host key in etcd, a sandbox on any node.

A real three-member etcd, two real hosts (``a`` with ``--ssh-port``, ``b``
without) and a gateway with ``--ssh-port``; Debian's OpenSSH client as the
user. Keys are added with ``sandboxd host ssh-keys --cluster``. A sandbox on
``b`` is reached through the gateway and through ``a`` (both forward to
``b``'s proxy), byte exact; the two fronts show one host key; another
namespace's key, an unknown sandbox and a removed key are refused alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import free_port
from .test_fleet import Fleet, create, describe, only_on, run_fleet, terminate
from .test_ssh import QUIET, _keypair, _need_openssh, _ssh

GATEWAY_SSH = free_port()


class SshFleet(Fleet):
    GATEWAY_ARGS = ("--ssh-port", str(GATEWAY_SSH))
    node_ssh: dict[str, int]

    def node_args(self, name: str, port: int) -> list[str]:
        extra = ["--ssh-port", str(self.node_ssh.setdefault(name, free_port()))] if name == "a" else []
        return [*super().node_args(name, port), *extra]


SshFleet.node_ssh = {}


@pytest.fixture(scope="module")
def fleet() -> Iterator[SshFleet]:
    _need_openssh()
    yield from run_fleet(SshFleet, "sbfs", ("a", "b"))  # type: ignore[misc]


def _keys(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandboxd", "host", "ssh-keys", *args, "--cluster", fleet.etcd.url],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.fixture(scope="module")
def users(fleet: SshFleet, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("fleetkeys")
    alice, bob = _keypair(d / "alice"), _keypair(d / "bob")
    for ns, key in (("default", alice), ("team-b", bob)):
        r = _keys(fleet, "add", "--namespace", ns, str(key.with_suffix(".pub")))
        assert r.returncode == 0, r.stderr
        assert "SHA256:" in r.stdout
    return alice, bob


def _host_key(port: int) -> str:
    r = subprocess.run(
        ["ssh-keyscan", "-t", "ed25519", "-p", str(port), "127.0.0.1"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    lines = [line for line in r.stdout.splitlines() if not line.startswith("#")]
    assert len(lines) == 1, (r.stdout, r.stderr)
    return lines[0].split(None, 1)[1]  # without the "[127.0.0.1]:PORT" part


def test_ssh_reaches_a_sandbox_on_another_node_through_any_front(
    fleet: SshFleet, users: tuple[Path, Path]
) -> None:
    alice, _ = users
    with only_on(fleet, "b"):
        r = create(fleet.gateway_url, name="far")
    assert r.status_code == 200, r.text
    sid = r.json()["sandbox_id"]
    try:
        assert describe(fleet.gateway_url, sid)["node"] == "b"
        fronts = {"gateway": GATEWAY_SSH, "node a": fleet.node_ssh["a"]}
        for front, port in fronts.items():
            r = _ssh(alice, port, "far", "hostname; exit 7")
            assert r.returncode == 7, (front, r.stderr)
            assert sid.encode() in r.stdout, front
            r = _ssh(alice, port, f"{sid}+default", "id -u")
            assert (r.returncode, r.stdout) == (0, b"0\n"), (front, r.stderr)
        # A stream through the gateway, b's proxy and the tunnel, and back, byte exact.
        blob = os.urandom(8 << 20)
        r = _ssh(alice, GATEWAY_SSH, sid, "cat", stdin=blob)
        assert r.returncode == 0, r.stderr
        assert len(r.stdout) == len(blob) and r.stdout == blob
        # What SSH wrote on b is what b's sandbox has, read through the API.
        r = _ssh(alice, fleet.node_ssh["a"], sid, "echo over-ssh > /tmp/mark")
        assert r.returncode == 0, r.stderr
        from tensorlake.sandbox import Sandbox

        sbx = Sandbox.connect(sid, api_url=fleet.gateway_url, api_key=None)
        assert bytes(sbx.read_file("/tmp/mark").value) == b"over-ssh\n"
    finally:
        terminate(fleet.gateway_url, sid)
    # Ended: the name leads nowhere, said as for any refused login.
    r = _ssh(alice, GATEWAY_SSH, "far", "true")
    assert r.returncode == 255 and b"Permission denied" in r.stderr


def test_every_front_shows_the_fleet_s_one_host_key(fleet: SshFleet) -> None:
    _need_openssh()
    assert _host_key(GATEWAY_SSH) == _host_key(fleet.node_ssh["a"])


def test_keys_are_the_fleet_s_and_refusals_tell_nothing(
    fleet: SshFleet, users: tuple[Path, Path], tmp_path: Path
) -> None:
    alice, bob = users
    listed = _keys(fleet, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert '"team-b"' in listed.stdout and '"default"' in listed.stdout
    r = create(fleet.gateway_url, name="mine")
    assert r.status_code == 200, r.text
    sid = r.json()["sandbox_id"]
    try:
        ok = _ssh(alice, GATEWAY_SSH, "mine", "echo in")
        assert ok.stdout == b"in\n", ok.stderr
        # Bob's key is team-b's: alice's sandbox and a missing one read the same.
        for user in ("mine", sid, f"{sid}+default", "no-such-sandbox", "../x"):
            r = _ssh(bob, GATEWAY_SSH, user, "true")
            assert r.returncode == 255 and b"Permission denied" in r.stderr, (user, r.stderr)
        # A key nobody added: refused on both fronts.
        stranger = _keypair(tmp_path / "stranger")
        for port in (GATEWAY_SSH, fleet.node_ssh["a"]):
            r = _ssh(stranger, port, "mine", "true")
            assert r.returncode == 255 and b"Permission denied" in r.stderr
        # Removed from the fleet: refused at the next login, on every front.
        fp = subprocess.run(
            ["ssh-keygen", "-l", "-E", "sha256", "-f", str(alice.with_suffix(".pub"))],
            capture_output=True, text=True, check=True,
        ).stdout.split()[1]  # fmt: skip
        rm = _keys(fleet, "rm", "--namespace", "default", fp)
        assert rm.returncode == 0, rm.stderr
        try:
            for port in (GATEWAY_SSH, fleet.node_ssh["a"]):
                r = _ssh(alice, port, "mine", "true")
                assert r.returncode == 255 and b"Permission denied" in r.stderr
            again = _keys(fleet, "rm", "--namespace", "default", fp)
            assert again.returncode == 2 and "no key" in again.stderr
        finally:
            assert _keys(fleet, "add", "--namespace", "default", str(alice.with_suffix(".pub"))).returncode == 0
        # Passwords and forwarding are refused here as on a lone host.
        r = subprocess.run(
            ["ssh", "-p", str(GATEWAY_SSH), *QUIET, "-o", "PubkeyAuthentication=no",
             "mine@127.0.0.1", "true"],
            capture_output=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 255
    finally:
        terminate(fleet.gateway_url, sid)
