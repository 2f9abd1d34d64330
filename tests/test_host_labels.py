"""Labels on sandboxes and pools, and the list's server-side query, against a real host.

The SDK (0.5.163) has no labels: its create, pool and claim requests carry
none and its models drop the key. So labels are set over the HTTP API (and
``sandboxd sbx create --label``), and the SDK's own calls are checked to work
unchanged beside them: ``create``, ``list()`` (every live sandbox, no page),
``get``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import wait_for
from .test_host import NS, Host, _create, make_state_root, start_host

POOLS = "/v1/namespaces/default/sandbox-pools"


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    yield from make_state_root("sbl")


@pytest.fixture(scope="module")
def host(state_root: Path) -> Iterator[Host]:
    h = start_host(state_root / "s", warm=1)
    yield h
    with httpx.Client(base_url=h.url, timeout=30) as c:
        for s in c.get(NS, params={"status": "pending,running,suspended"}).json()["sandboxes"]:
            c.delete(f"{NS}/{s['id']}")
        for p in c.get(POOLS).json().get("pools", []):
            c.delete(f"{POOLS}/{p['id']}")
    h.stop()


def make(c: httpx.Client, **body: Any) -> dict[str, Any]:
    """A running sandbox made over the HTTP API: its SandboxInfo."""
    sid = str(_create(c, **body)["sandbox_id"])
    info: dict[str, Any] = c.get(f"{NS}/{sid}").json()
    return info


def ids(c: httpx.Client, *pairs: tuple[str, Any], **params: Any) -> list[str]:
    r = c.get(NS, params=[*pairs, *params.items()])
    assert r.status_code == 200, r.text
    return [s["id"] for s in r.json()["sandboxes"]]


def refused(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == code, body
    assert body["error"]


def test_labels_are_stored_reported_and_the_sdk_is_unchanged(host: Host) -> None:
    from tensorlake.sandbox import Sandbox

    with host.http() as c:
        labelled = make(c, labels={"team": "ml", "app.example.com/tier": "web", "empty": ""})
        sid = str(labelled["id"])
        assert labelled["labels"] == {"team": "ml", "app.example.com/tier": "web", "empty": ""}
        assert c.get(f"{NS}/{sid}").json()["labels"]["team"] == "ml"
        listed = {s["id"]: s for s in c.get(NS).json()["sandboxes"]}
        assert listed[sid]["labels"]["app.example.com/tier"] == "web"

        # The SDK's list() and get() read the labelled sandbox (its models drop the key).
        sdk = {"api_url": host.url, "api_key": None}
        plain = Sandbox.create(**sdk)
        try:
            seen = {i.sandbox_id for i in Sandbox.list(**sdk)}
            assert {sid, plain.sandbox_id} <= seen
            assert Sandbox.connect(sid, **sdk).info().sandbox_id == sid
            assert c.get(f"{NS}/{plain.sandbox_id}").json()["labels"] == {}
        finally:
            plain.terminate()

        # PATCH replaces them all; the store keeps them across a restart (below).
        r = c.patch(f"{NS}/{sid}", json={"labels": {"team": "infra"}})
        assert r.status_code == 200, r.text
        assert r.json()["labels"] == {"team": "infra"}
        refused(c.patch(f"{NS}/{sid}", json={"labels": {"bad key": "x"}}), 400, "INVALID_LABEL_KEY")
        assert c.get(f"{NS}/{sid}").json()["labels"] == {"team": "infra"}
        c.delete(f"{NS}/{sid}")
        # An ended sandbox keeps its labels in the archive.
        archived = c.get(f"/v1/namespaces/default/archived-sandboxes/{sid}").json()
        assert archived["labels"] == {"team": "infra"}


@pytest.mark.parametrize(
    ("labels", "code"),
    [
        (["a"], "INVALID_LABELS"),
        ({"a": 1}, "INVALID_LABEL_VALUE"),
        ({f"k{i}": "v" for i in range(65)}, "TOO_MANY_LABELS"),
        ({"": "v"}, "INVALID_LABEL_KEY"),
        ({"-start": "v"}, "INVALID_LABEL_KEY"),
        ({"a" * 64: "v"}, "INVALID_LABEL_KEY"),
        ({"Upper.Case/name": "v"}, "INVALID_LABEL_KEY"),  # a prefix is lowercase DNS
        ({"a/b/c": "v"}, "INVALID_LABEL_KEY"),
        ({"k": "has space"}, "INVALID_LABEL_VALUE"),
        ({"k": "v" * 64}, "INVALID_LABEL_VALUE"),
        ({"k": "end-"}, "INVALID_LABEL_VALUE"),
        ({"k": "v\n"}, "INVALID_LABEL_VALUE"),
        ({"k\n": "v"}, "INVALID_LABEL_KEY"),
    ],
)
def test_bad_labels_are_refused_with_their_code_and_make_nothing(
    host: Host, labels: Any, code: str
) -> None:
    with host.http() as c:
        before = ids(c)
        refused(c.post(NS, json={"labels": labels}), 400, code)
        assert ids(c) == before


def test_list_filters_by_label_and_status_on_the_server(host: Host) -> None:
    with host.http() as c:
        a = str(make(c, name="lab-a", labels={"team": "ml", "env": "prod"})["id"])
        b = str(make(c, name="lab-b", labels={"team": "ml", "env": "dev"})["id"])
        other = str(make(c, labels={"team": "web"})["id"])
        try:
            got = ids(c, label="team=ml")
            assert set(got) == {a, b}
            assert got == [a, b]  # oldest first
            # Repeated: all must match.
            assert ids(c, ("label", "team=ml"), ("label", "env=prod")) == [a]
            assert ids(c, ("label", "team=ml"), ("label", "env=nope")) == []
            assert set(ids(c, label="env")) == {a, b}  # the key alone: any value
            assert ids(c, label="team=nobody") == []
            # Status, server-side: a suspended one is found by it.
            assert c.post(f"{NS}/{a}/suspend").status_code == 200
            assert ids(c, status="suspended", label="team=ml") == [a]
            assert ids(c, status="running", label="team=ml") == [b]
            assert set(ids(c, status="running,suspended", label="team=ml")) == {a, b}
            c.delete(f"{NS}/{b}")
            # Ended ones only when asked for.
            assert b not in ids(c, label="team=ml")
            assert b in ids(c, status="terminated", label="team=ml")
            refused(c.get(NS, params={"status": "sleeping"}), 400, "INVALID_STATUS")
            refused(c.get(NS, params={"label": "=v"}), 400, "INVALID_LABEL_SELECTOR")
            refused(c.get(NS, params={"label": "k=bad value"}), 400, "INVALID_LABEL_SELECTOR")
        finally:
            for sid in (a, b, other):
                c.delete(f"{NS}/{sid}")


def test_pages_are_stable_while_sandboxes_come_and_go(host: Host) -> None:
    with host.http() as c:
        made = [
            str(c.post(NS, json={"wait": False, "labels": {"page": "t"}}).json()["sandbox_id"])
            for _ in range(5)
        ]
        try:
            seen: list[str] = []
            r = c.get(NS, params={"label": "page=t", "limit": 2})
            body = r.json()
            assert len(body["sandboxes"]) == 2 and body["next_cursor"], body
            seen += [s["id"] for s in body["sandboxes"]]
            # Meanwhile: one seen and one not yet seen are deleted, a new one is created.
            c.delete(f"{NS}/{made[0]}")
            c.delete(f"{NS}/{made[3]}")
            late = str(
                c.post(NS, json={"wait": False, "labels": {"page": "t"}}).json()["sandbox_id"]
            )
            made.append(late)
            cursor = body["next_cursor"]
            while cursor:
                body = c.get(NS, params={"label": "page=t", "limit": 2, "cursor": cursor}).json()
                seen += [s["id"] for s in body["sandboxes"]]
                cursor = body.get("next_cursor")
            assert len(seen) == len(set(seen)), seen  # nothing twice
            # Every sandbox that lived throughout is there, in creation order; the new one last.
            assert seen == [made[0], made[1], made[2], made[4], late]
            # Without limit: every match, no cursor (what the SDK's list() gets).
            whole = c.get(NS, params={"label": "page=t"}).json()
            assert "next_cursor" not in whole and len(whole["sandboxes"]) == 4
            refused(c.get(NS, params={"limit": 0}), 400, "INVALID_LIMIT")
            refused(c.get(NS, params={"limit": "x"}), 400, "INVALID_LIMIT")
            refused(c.get(NS, params={"cursor": "not-a-cursor"}), 400, "INVALID_CURSOR")
        finally:
            for sid in made:
                c.delete(f"{NS}/{sid}")


def test_pools_claims_restores_and_copies_carry_labels(host: Host) -> None:
    with host.http() as c:
        r = c.post(
            POOLS,
            json={
                "image": "default",
                "resources": {"cpus": 1, "memory_mb": 512},
                "labels": {"pool": "p1"},
            },
        )
        assert r.status_code == 200, r.text
        pool = r.json()["pool_id"]
        refused(
            c.post(POOLS, json={"image": "default", "resources": {"cpus": 1, "memory_mb": 512},
                                "labels": {"k": "bad value"}}),
            400, "INVALID_LABEL_VALUE",
        )  # fmt: skip
        try:
            assert c.get(f"{POOLS}/{pool}").json()["labels"] == {"pool": "p1"}
            claim = c.post(f"{POOLS}/{pool}/sandboxes", json={"labels": {"who": "me"}})
            assert claim.status_code == 200, claim.text
            claimed = claim.json()["sandbox_id"]
            wait_for(lambda: c.get(f"{NS}/{claimed}").json()["status"] == "running", timeout=60)
            assert c.get(f"{NS}/{claimed}").json()["labels"] == {"pool": "p1", "who": "me"}
            assert ids(c, label="pool=p1") == [claimed]
            c.delete(f"{NS}/{claimed}")
        finally:
            wait_for(lambda: c.delete(f"{POOLS}/{pool}").status_code in (200, 204, 404), timeout=30)

        src = str(make(c, labels={"origin": "src"})["id"])
        try:
            snap = c.post(f"{NS}/{src}/snapshot", json={}).json()["snapshot_id"]
            snaps = "/v1/namespaces/default/snapshots"
            wait_for(lambda: c.get(f"{snaps}/{snap}").json()["status"] == "completed", timeout=60)
            kept = make(c, snapshot_id=snap)  # no labels of its own: the source's
            own = make(c, snapshot_id=snap, labels={"origin": "mine"})
            assert kept["labels"] == {"origin": "src"}
            assert own["labels"] == {"origin": "mine"}
            copies = c.post(f"{NS}/{src}/copy", params={"times": 1}).json()["sandboxes"]
            copy_id = copies[0].get("sandbox_id") or copies[0]["id"]
            assert c.get(f"{NS}/{copy_id}").json()["labels"] == {"origin": "src"}
            for sid in (kept["id"], own["id"], copy_id):
                c.delete(f"{NS}/{sid}")
        finally:
            c.delete(f"{NS}/{src}")


def test_labels_survive_a_restart_of_the_host(state_root: Path) -> None:
    h = start_host(state_root / "r", warm=0)
    try:
        with h.http() as c:
            sid = str(make(c, labels={"keep": "me"})["id"])
    finally:
        h.stop()
    h = start_host(state_root / "r", warm=0)
    try:
        with h.http() as c:
            wait_for(lambda: c.get(f"{NS}/{sid}").json()["status"] == "running", timeout=30)
            assert c.get(f"{NS}/{sid}").json()["labels"] == {"keep": "me"}
            assert ids(c, label="keep=me") == [sid]
            c.delete(f"{NS}/{sid}")
    finally:
        h.stop()
