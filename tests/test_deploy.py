"""deploy/kubernetes/fleet.yaml: the fleet's manifests say what sandboxd can actually do.

No cluster here, so what can be checked without one is: every document is
well-formed Kubernetes (kind, metadata, a selector that matches its pods),
every sandboxd command line parses with sandboxd's own parser (a renamed or
missing flag fails here, not on someone's cluster), the nodes get what a host
needs (root, the machine's cgroups and /run, a state dir that outlives the
pod), and the secrets and etcd addresses the commands name are the ones the
manifests provide.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from sandboxd.cli import build_parser

MANIFESTS = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes" / "fleet.yaml"


def _docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d]


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _docs() if d["kind"] == kind]


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["spec"]["template"]["spec"]["containers"])


def _sandboxd_commands() -> list[tuple[str, list[str], dict[str, Any]]]:
    out = []
    for d in _docs():
        if d["kind"] not in ("Deployment", "DaemonSet", "StatefulSet"):
            continue
        for c in _containers(d):
            if c["command"][0] == "sandboxd":
                out.append((d["metadata"]["name"], c["command"], c))
    return out


def test_every_document_is_kubernetes_and_selects_its_own_pods() -> None:
    docs = _docs()
    assert {d["kind"] for d in docs} >= {"Namespace", "StatefulSet", "DaemonSet", "Deployment"}
    for d in docs:
        assert d["apiVersion"] and d["metadata"]["name"], d
        if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            want = d["spec"]["selector"]["matchLabels"]
            got = d["spec"]["template"]["metadata"]["labels"]
            assert want.items() <= got.items(), d["metadata"]["name"]
        if d["kind"] == "Service":
            selected = d["spec"]["selector"]
            assert any(
                selected.items() <= w["spec"]["template"]["metadata"]["labels"].items()
                for w in docs
                if "template" in w.get("spec", {})
            ), d["metadata"]["name"]


@pytest.mark.parametrize("name", ["sandboxd-node", "sandboxd-gateway"])
def test_the_sandboxd_command_lines_parse_with_sandboxd_s_own_flags(name: str) -> None:
    (cmd, container) = next((c, k) for n, c, k in _sandboxd_commands() if n == name)
    env = {e["name"] for e in container.get("env", [])}
    # Kubernetes fills $(VAR) from the container's env: each one must be there.
    for var in re.findall(r"\$\((\w+)\)", " ".join(cmd)):
        assert var in env, (name, var)
    argv = [re.sub(r"\$\((\w+)\)", "x", a) for a in cmd[1:]]
    ns = build_parser().parse_args(argv)  # exits (fails the test) on an unknown flag
    assert ns.cluster.startswith("etcd://") and ns.etcd_ca and ns.etcd_cert and ns.etcd_key
    assert int(ns.ssh_port) == 2222
    # The token comes from a secret, never a command line (the process list shows those).
    assert "SANDBOXD_HOST_TOKEN" in env and not any("token" in a for a in cmd)


def test_the_etcd_members_the_commands_name_are_the_statefulset_s() -> None:
    (sts,) = _by_kind("StatefulSet")
    members = {f"etcd-{i}.etcd.sandboxd.svc:2379" for i in range(sts["spec"]["replicas"])}
    for name, cmd, _ in _sandboxd_commands():
        cluster = next(a for a in cmd if a.startswith("--cluster="))
        assert set(cluster.split("=", 1)[1].removeprefix("etcd://").split(",")) == members, name


def test_nodes_get_what_a_host_needs() -> None:
    (ds,) = _by_kind("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (node,) = pod["containers"]
    assert node["securityContext"]["privileged"] is True  # namespaces, mounts, cgroups, nft
    assert pod["hostNetwork"] and pod["hostPID"]
    mounts = {m["mountPath"]: m for m in node["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    host_paths = {
        path: volumes[m["name"]].get("hostPath", {}).get("path") for path, m in mounts.items()
    }
    # Sandboxes outlive a node's restart: their state, cgroups and /run are the machine's.
    assert host_paths["/var/lib/sandboxd-host"] == "/var/lib/sandboxd-host"
    assert host_paths["/sys/fs/cgroup"] == "/sys/fs/cgroup"
    assert host_paths["/run"] == "/run" and mounts["/run"]["mountPropagation"] == "Bidirectional"
    cmd = node["command"]
    assert "--state-dir=/var/lib/sandboxd-host" in cmd
    assert any(a.startswith("--snapshot-dir=") for a in cmd)  # drain --move and restores anywhere
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
    secrets = {v["secret"]["secretName"] for v in volumes.values() if "secret" in v}
    assert secrets == {"etcd-tls"}


def test_the_nodes_readiness_probe_passes_on_a_token_host_and_only_with_its_token() -> None:
    """A host with a token answers /health 401 without it: an httpGet probe never passes."""
    import os
    import subprocess

    from .test_host import make_state_root, start_host

    (ds,) = _by_kind("DaemonSet")
    (node,) = _containers(ds)
    probe = node["readinessProbe"]["exec"]["command"]
    token = next(e for e in node["env"] if e["name"] == "SANDBOXD_HOST_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["name"] == "sandboxd-token"
    port = next(a for a in node["command"] if a.startswith("--port=")).split("=", 1)[1]
    roots = make_state_root("sbk")
    h = start_host(next(roots) / "probe", warm=0, token="probe-s3cret")
    try:
        here = [a.replace(f"127.0.0.1:{port}/", h.url.removeprefix("http://") + "/") for a in probe]

        def run(secret: str) -> int:
            env = {**os.environ, "SANDBOXD_HOST_TOKEN": secret}
            return subprocess.run(here, env=env, capture_output=True, timeout=30).returncode

        assert run("probe-s3cret") == 0
        assert run("not-the-token") != 0
    finally:
        h.stop()
        next(roots, None)  # its state dir goes


def test_nodes_and_gateways_answer_the_same_public_url() -> None:
    """Fronts forward with the client's Host: a node reads it against its own --public-url."""
    urls = {
        name: [a.split("=", 1)[1] for a in cmd if a.startswith("--public-url=")]
        for name, cmd, _ in _sandboxd_commands()
    }
    assert len({tuple(u) for u in urls.values()}) == 1 and all(urls.values()), urls
