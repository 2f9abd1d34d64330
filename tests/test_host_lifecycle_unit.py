"""Snapshots, pools and live resize without sandboxes: validation, shapes, archives, catalog."""

from __future__ import annotations

import os
import shutil
import stat
import types
from pathlib import Path

import pytest

from sandboxd.host import model, resize, snapshots
from sandboxd.host.model import ApiError, Record, info, parse_create, parse_resize, parse_update
from sandboxd.host.pools import Pool, Pools, parse_pool
from sandboxd.host.snapshots import Snapshot, Snapshots
from sandboxd.host.store.catalog import Catalog


def _code(fn, *args) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ApiError) as e:
        fn(*args)
    assert 400 <= e.value.status < 500
    return e.value.code


# -- resize ---------------------------------------------------------------------


def test_patch_resources_is_parsed_alone_and_checked() -> None:
    assert parse_update({"resources": {"cpus": 2.0, "memory_mb": 2048}}) == {
        "resources": {"cpus": 2.0, "memory_mb": 2048}
    }
    assert parse_resize({"disk_mb": 20480, "cpus": None}) == {"disk_mb": 20480}
    assert _code(parse_resize, {}) == "INVALID_RESOURCES"
    assert _code(parse_resize, {"cpus": 0}, 2) == "INVALID_CPUS"
    assert _code(parse_resize, {"cpus": 3}, 2) == "INVALID_CPUS"
    assert _code(parse_resize, {"memory_mb": 8}) == "INVALID_MEMORY_MB"
    assert _code(parse_resize, {"memory_mb": 1.5}) == "INVALID_MEMORY_MB"
    assert _code(parse_resize, {"gpus": [{"count": 1}]}) == "GPUS_UNSUPPORTED"
    assert _code(parse_resize, {"swap": 1}) == "UNKNOWN_FIELD"
    assert _code(parse_update, {"resources": {"cpus": 1.0}, "name": "x"}) == "INVALID_UPDATE"


def _fake_v1_cgroup(tmp_path: Path, mem_mb: int) -> types.SimpleNamespace:
    whole = tmp_path / "memory" / "sbx-1"
    kid = whole / "sandboxd-1-7"
    kid.mkdir(parents=True)
    (whole / "memory.limit_in_bytes").write_text(str((mem_mb + 64) << 20))
    (kid / "memory.limit_in_bytes").write_text(str(mem_mb << 20))
    (whole / "sandboxd-1-7-daemon").mkdir()  # the daemon's own: never capped
    h = types.SimpleNamespace(v2_controllers=frozenset())
    return types.SimpleNamespace(dirs={"memory": whole}, unified=None, h=h)


def test_memory_resize_moves_both_limits_and_rolls_back_on_failure(tmp_path: Path) -> None:
    cg = _fake_v1_cgroup(tmp_path, 256)
    whole = cg.dirs["memory"]
    kid = whole / "sandboxd-1-7"
    resize.set_memory(cg, 256, 512, 64)  # type: ignore[arg-type]
    assert int((kid / "memory.limit_in_bytes").read_text()) == 512 << 20
    assert int((whole / "memory.limit_in_bytes").read_text()) == (512 + 64) << 20
    # The parent refuses (as a real cgroup does with EBUSY): the child gets its old cap back.
    (whole / "memory.limit_in_bytes").unlink()
    (whole / "memory.limit_in_bytes").mkdir()
    with pytest.raises(resize.ResizeFailed):
        resize.set_memory(cg, 512, 128, 64)  # type: ignore[arg-type]
    assert int((kid / "memory.limit_in_bytes").read_text()) == 512 << 20


def test_resource_resize_in_sandbox_info_is_what_the_sdk_reads() -> None:
    from tensorlake.sandbox.models import SandboxInfo

    rec = Record.new("default", parse_create({}), 1.0)
    rec.status, rec.pool_id = model.RUNNING, "pool-1"
    rec.resource_resize = {
        "generation": 2,
        "requested": {"cpus": 1.0, "memory_mb": 64, "disk_mb": 10240},
        "status": "failed",
        "error_message": "memory_mb 64 is below what …",
    }
    got = SandboxInfo.model_validate(info(rec, "http://127.0.0.1:1"))
    assert got.pool_id == "pool-1"
    assert got.resource_resize is not None and got.resource_resize.generation == 2
    assert got.resource_resize.status.value == "failed"  # type: ignore[union-attr]


# -- snapshots ------------------------------------------------------------------


def test_snapshot_types() -> None:
    assert Snapshots.parse_type({}) == "filesystem"
    assert Snapshots.parse_type({"snapshot_type": "filesystem"}) == "filesystem"
    with pytest.raises(ApiError) as e:
        Snapshots.parse_type({"snapshot_type": "memory"})
    assert e.value.code == "UNSUPPORTED_SNAPSHOT_TYPE" and "vDSO" in e.value.message
    assert _code(Snapshots.parse_type, {"snapshot_type": "disk"}) == "INVALID_SNAPSHOT_TYPE"
    assert _code(Snapshots.parse_type, {"x": 1}) == "INVALID_BODY"


def test_archive_command_keeps_owners_xattrs_and_skips_overlay_work(tmp_path: Path) -> None:
    for name in ("upper", "work", "lost+found", "-rf"):
        (tmp_path / name).mkdir()
    names = snapshots.members(tmp_path)
    assert names == ["./-rf", "./upper"]  # never taken for an option
    argv = snapshots.archive_argv(tmp_path, Path("/x.tar.zst"), "zst", names)
    for flag in ("--numeric-owner", "--xattrs", "--xattrs-include=*", "--zstd", "--sparse"):
        assert flag in argv
    assert argv[-2:] == names
    empty = snapshots.archive_argv(tmp_path, Path("/x.tar.gz"), "gz", [])
    assert "--gzip" in empty and empty[-1] == "--files-from=/dev/null"
    assert "--same-owner" in snapshots.extract_argv(Path("/x"), tmp_path, "zst")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("tar") is None, reason="needs root and tar")
def test_archive_round_trip_keeps_whiteouts_owners_modes_links_and_xattrs(tmp_path: Path) -> None:
    rw, out = tmp_path / "rw", tmp_path / "out"
    d = rw / "upper" / "root"
    d.mkdir(parents=True)
    (rw / "work" / "work").mkdir(parents=True)
    (d / "f").write_text("kept")
    os.chown(d / "f", 100000, 100001)
    os.chmod(d / "f", 0o640)
    os.symlink("f", d / "l")
    os.mknod(d / "gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))  # an overlay whiteout
    (d / "opaque").mkdir()
    os.setxattr(d / "opaque", "trusted.overlay.opaque", b"y")
    kind = snapshots.compression()
    archive = tmp_path / f"a.tar.{kind}"
    assert snapshots.archive(rw, archive, kind) > 0
    assert not list(tmp_path.glob(".*.tmp"))
    out.mkdir()
    snapshots.extract(archive, out, kind)
    e = out / "upper" / "root"
    st = (e / "f").stat()
    assert (e / "f").read_text() == "kept" and (st.st_uid, st.st_gid) == (100000, 100001)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert os.readlink(e / "l") == "f"
    wh = (e / "gone").lstat()
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert os.getxattr(e / "opaque", "trusted.overlay.opaque") == b"y"
    assert not (out / "work").exists()


def test_snapshot_info_and_restore_inheritance(tmp_path: Path) -> None:
    from tensorlake.sandbox.models import SnapshotInfo

    cat = Catalog(tmp_path / "c.db")
    fake = types.SimpleNamespace(state_dir=tmp_path)
    snaps = Snapshots(fake, cat)  # type: ignore[arg-type]
    s = Snapshot("snap-1", "default", "sbx-1", "completed", "default", 2.0, 512, 4096, 1.0, "zst")
    s.size_bytes = 1234
    snaps.table.put(s)
    got = SnapshotInfo.from_response(snapshots.info(s))
    assert (got.snapshot_id, got.size_bytes, got.snapshot_type.value) == (  # type: ignore[union-attr]
        "snap-1",
        1234,
        "filesystem",
    )
    # Resources omitted (what the SDK sends): all inherited; given keys win.
    body = snaps.inherit("default", {"snapshot_id": "snap-1"})
    spec = parse_create(body, host_cpus=2)
    assert (spec.image, spec.cpus, spec.memory_mb, spec.disk_mb) == ("default", 2.0, 512, 4096)
    assert spec.snapshot_id == "snap-1"
    body = snaps.inherit("default", {"snapshot_id": "snap-1", "resources": {"memory_mb": 256}})
    assert body["resources"] == {"cpus": 2.0, "memory_mb": 256, "disk_mb": 4096}
    assert _code(snaps.inherit, "other", {"snapshot_id": "snap-1"}) == "SNAPSHOT_NOT_FOUND"
    assert _code(snaps.inherit, "default", {"snapshot_id": "snap-2"}) == "SNAPSHOT_NOT_FOUND"
    bad_image = {"snapshot_id": "snap-1", "image": "other"}
    assert _code(snaps.inherit, "default", bad_image) == "SNAPSHOT_IMAGE_MISMATCH"
    cat.close()
    # The catalog survives a reopen.
    cat = Catalog(tmp_path / "c.db")
    again = Snapshots(fake, cat)  # type: ignore[arg-type]
    assert again.get("default", "snap-1").size_bytes == 1234
    cat.close()


# -- pools ----------------------------------------------------------------------


def test_pool_requests_are_validated_like_creates() -> None:
    sdk_body = {
        "image": "python",
        "resources": {"cpus": 1.0, "memory_mb": 512},
        "timeout_secs": 0,
        "max_containers": 3,
        "warm_containers": 1,
    }
    got = parse_pool(sdk_body, host_cpus=2)
    assert (got["image"], got["memory_mb"], got["disk_mb"]) == ("default", 512, 10240)
    assert (got["max_containers"], got["warm_containers"]) == (3, 1)
    assert parse_pool({"image": "python"})["warm_containers"] == 0
    for body, code in (
        ({"image": "python", "warm_containers": 4, "max_containers": 3}, "INVALID_WARM_CONTAINERS"),
        ({"image": "python", "warm_containers": -1}, "INVALID_WARM_CONTAINERS"),
        ({"image": "python", "max_containers": 0}, "INVALID_MAX_CONTAINERS"),
        ({"image": "python", "resources": {"memory_mb": 1}}, "INVALID_MEMORY_MB"),
        ({"image": "python", "entrypoint": "sleep"}, "INVALID_ENTRYPOINT"),
        ({"image": "python", "bogus": 1}, "UNKNOWN_FIELD"),
    ):
        assert _code(parse_pool, body) == code, body


def test_pool_info_is_what_the_sdk_reads(tmp_path: Path) -> None:
    from tensorlake.sandbox.models import SandboxPoolInfo

    cat = Catalog(tmp_path / "c.db")
    store = types.SimpleNamespace(all=lambda: [])
    pools = Pools(types.SimpleNamespace(store=store), cat)  # type: ignore[arg-type]
    p = Pool("pool-1", "default", "default", 1.0, 256, 10240, 0, 1, None, 1.0, 2.0)
    got = SandboxPoolInfo.model_validate(pools.info(p, containers=True))
    assert (got.pool_id, got.max_containers, got.containers) == ("pool-1", None, [])
    pools.table.put(p)
    assert _code(pools.get, "other", "pool-1") == "POOL_NOT_FOUND"
    with pytest.raises(ApiError) as e:
        pools.get("default", "pool-2")
    assert e.value.status == 404
    cat.close()


# -- snapshots a restore could not make ----------------------------------------


def _deep(top: Path, levels: int, name: str = "d" * 200) -> Path:
    """``levels`` nested dirs made relative to each other, as a sandbox can (past PATH_MAX)."""
    top.mkdir(parents=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    return top


def test_a_path_past_path_max_is_found_and_refused_before_anything_is_archived(
    tmp_path: Path,
) -> None:
    rw = tmp_path / "rw"
    _deep(rw / "upper" / "root", 10)  # about 2 KB: fine
    assert snapshots.too_long(rw, snapshots.members(rw)) is None
    _deep(rw / "upper" / "home", 25)  # about 5 KB
    found = snapshots.too_long(rw, snapshots.members(rw))
    assert found is not None and found.startswith("./upper/home/ddd")
    assert len(found.encode()) >= snapshots.PATH_MAX > len(found.encode()) - 202
    dest = tmp_path / "snap.tar.gz"
    with pytest.raises(snapshots.Unrestorable) as e:
        snapshots.archive(rw, dest, "gz")
    assert e.value.code == "SNAPSHOT_UNRESTORABLE" and "/home/ddd" in str(e.value)
    assert "/upper/" not in str(e.value)  # the path as the sandbox sees it
    assert not dest.exists() and list(tmp_path.glob(".snap*")) == []
