"""``sandboxd host`` without sandboxes: validation, the record store, the bwrap command line."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request

from sandboxd.host import model
from sandboxd.host.model import ApiError, Record, info, parse_create, parse_update
from sandboxd.host.proxy import sandbox_id_of
from sandboxd.host.runtime import Layout, bwrap_argv
from sandboxd.host.store import NameTaken, Store


def _code(body: object) -> str:
    with pytest.raises(ApiError) as e:
        parse_create(body, host_cpus=2)
    assert 400 <= e.value.status < 500
    return e.value.code


def test_the_sdk_default_create_body_is_accepted() -> None:
    spec = parse_create({"image": "python", "resources": {"cpus": 1.0, "memory_mb": 512}})
    assert (spec.image, spec.cpus, spec.memory_mb, spec.wait) == ("default", 1.0, 512, True)
    assert parse_create({}).memory_mb == model.DEFAULT_MEMORY_MB


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ([], "INVALID_BODY"),
        ({"image": "ubuntu:24.04"}, "UNKNOWN_IMAGE"),
        ({"resources": {"cpus": 0}}, "INVALID_CPUS"),
        ({"resources": {"cpus": 64}}, "INVALID_CPUS"),
        ({"resources": {"cpus": True}}, "INVALID_CPUS"),
        ({"resources": {"memory_mb": 1}}, "INVALID_MEMORY_MB"),
        ({"resources": {"memory_mb": "512"}}, "INVALID_MEMORY_MB"),
        ({"resources": {"gpus": [{"count": 1, "model": "H100"}]}}, "GPUS_UNSUPPORTED"),
        ({"name": "sbx-mine"}, "INVALID_NAME"),
        ({"name": "has space"}, "INVALID_NAME"),
        ({"timeout_secs": -1}, "INVALID_TIMEOUT_SECS"),
        ({"snapshot_id": "snap-1"}, "SNAPSHOTS_UNSUPPORTED"),
        ({"exposed_ports": [0]}, "INVALID_EXPOSED_PORTS"),
        ({"bogus": 1}, "UNKNOWN_FIELD"),
    ],
)
def test_bad_create_bodies_get_a_specific_4xx_code(body: object, code: str) -> None:
    assert _code(body) == code


def test_update_accepts_name_and_ports_and_refuses_the_rest() -> None:
    assert parse_update({"name": "x", "exposed_ports": [80, 80, 3]}) == {
        "name": "x",
        "exposed_ports": [3, 80],
    }
    with pytest.raises(ApiError):
        parse_update({"resources": {"cpus": 2.0}})


def test_info_has_what_the_sdk_requires_and_only_known_statuses() -> None:
    rec = Record.new("default", parse_create({"name": "n"}), 1.0)
    out = info(rec, "http://127.0.0.1:1")
    assert out["status"] in model.STATUSES and out["status"] == "pending"
    assert {"id", "namespace", "status", "resources"} <= set(out)
    assert set(out["resources"]) == {"cpus", "memory_mb", "disk_mb"}
    assert "sandbox_url" not in out  # only once running
    rec.status = model.RUNNING
    assert info(rec, "http://127.0.0.1:1")["sandbox_url"] == "http://127.0.0.1:1"


def test_store_survives_reopen_and_names_are_unique_among_live(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    s = Store(db)
    a = Record.new("default", parse_create({"name": "agent"}), 1.0)
    s.put(a)
    with pytest.raises(NameTaken):
        s.put(Record.new("default", parse_create({"name": "agent"}), 2.0))
    s.put(Record.new("other", parse_create({"name": "agent"}), 2.0))  # other namespace
    s.close()
    s = Store(db)
    got = s.get("default", "agent")
    assert got is not None and got.id == a.id
    done = s.snapshot(a.id)
    assert done is not None
    done.status = model.TERMINATED
    s.put(done)
    assert s.get("default", "agent") is None  # the name is free once terminated
    s.put(Record.new("default", parse_create({"name": "agent"}), 3.0))
    s.close()


def test_bwrap_argv_isolates_and_hides_the_state_dir(tmp_path: Path) -> None:
    state = Path("/var/lib/sbx-test")
    argv = bwrap_argv(Layout(state, "sbx-1"), "sbx-1", ["daemon"], ["/root/.pyenv/x"])
    for flag in ("--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts"):
        assert flag in argv
    assert argv[argv.index("--ro-bind") + 1 : argv.index("--ro-bind") + 3] == ["/", "/"]
    assert ["--tmpfs", str(state)] == argv[argv.index(str(state)) - 1 : argv.index(str(state)) + 1]
    assert argv[-2:] == ["--", "daemon"]
    # The interpreter is bound back after /root is replaced, so it wins.
    assert argv.index("/root/.pyenv/x") > argv.index("/root")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Host": "sbx-1.local"}, "sbx-1"),
        ({"Host": "SBX-1.local:8900"}, "sbx-1"),
        ({"Host": "127.0.0.1:8900", "X-Tensorlake-Sandbox-Id": "sbx-2"}, "sbx-2"),
        ({"Host": "sbx-1.local", "X-Tensorlake-Sandbox-Id": "sbx-2"}, "sbx-2"),
        ({"Host": "127.0.0.1:8900"}, None),
        ({"Host": ".local"}, None),
    ],
)
def test_the_proxy_finds_the_sandbox_by_host_or_header(
    headers: dict[str, str], expected: str | None
) -> None:
    assert sandbox_id_of(make_mocked_request("GET", "/api/v1/health", headers=headers)) == expected
