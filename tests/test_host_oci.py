"""Image names, references and configs (issue 17): the pure parts, no registry needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandboxd.host.images import registry
from sandboxd.host.images.image_store import Image, ImageStore, dir_name, store_key
from sandboxd.host.images.oci import ImageConfig
from sandboxd.host.runtime import bubblewrap as runtime


@pytest.mark.parametrize(
    ("name", "host", "path", "key"),
    [
        ("python:3.12", None, "python", "python:3.12"),
        ("library/python", None, "library/python", "library/python:latest"),
        ("127.0.0.1:5000/team/app:v1", "127.0.0.1:5000", "team/app", "127.0.0.1:5000/team/app:v1"),
        ("localhost/app", "localhost", "app", "localhost/app:latest"),
        ("ghcr.io/org/img@sha256:" + "a" * 64, "ghcr.io", "org/img", None),
    ],
)
def test_references_parse_as_docker_reads_them(
    name: str, host: str | None, path: str, key: str | None
) -> None:
    ref = registry.parse(name)
    assert ref is not None and registry.is_reference(name)
    assert (ref.host, ref.path) == (host, path)
    assert ref.key == (key or name)


@pytest.mark.parametrize("name", ["default", "mine", "Bad Name", "UPPER/case:1", "a//b", ""])
def test_local_names_and_garbage_are_not_references(name: str) -> None:
    assert not registry.is_reference(name)


def test_store_dirs_are_local_names_or_hashed_references() -> None:
    assert dir_name("default") == "default"
    d = dir_name("127.0.0.1:5000/team/app:v1")
    assert d is not None and d.startswith("ref-127.0.0.1-5000-team-app-v1-")
    # An implied :latest is the same image; another tag is another.
    assert dir_name("127.0.0.1:5000/app") == dir_name("127.0.0.1:5000/app:latest")
    assert dir_name("127.0.0.1:5000/app:2") != dir_name("127.0.0.1:5000/app:latest")
    assert store_key("127.0.0.1:5000/app") == "127.0.0.1:5000/app:latest"
    assert dir_name("../etc") is None and dir_name("Bad Name") is None


def test_loopback_registries_are_plain_http_and_others_only_when_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert registry.parse("127.0.0.1:5000/a:1").insecure  # type: ignore[union-attr]
    assert not registry.parse("reg.example.test:5000/a:1").insecure  # type: ignore[union-attr]
    monkeypatch.setenv(registry.INSECURE_ENV, "reg.example.test:5000")
    assert registry.parse("reg.example.test:5000/a:1").insecure  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("reading manifest v1 in r/x: manifest unknown: manifest unknown", "IMAGE_NOT_FOUND"),
        ("unauthorized: authentication required", "REGISTRY_AUTH_REQUIRED"),
        ("dial tcp 127.0.0.1:1: connect: connection refused", "REGISTRY_UNREACHABLE"),
        ("unsupported MIME type for compression", "UNSUPPORTED_MEDIA_TYPE"),
        ("something else", "IMAGE_PULL_FAILED"),
    ],
)
def test_skopeo_failures_get_their_codes(text: str, code: str) -> None:
    assert registry.classify(text) == code


def test_the_oci_config_becomes_the_image_config() -> None:
    cfg = ImageConfig.from_oci(
        {
            "config": {
                "Env": ["A=1", "B=x=y", "junk"],
                "WorkingDir": "/w",
                "User": "1000:1000",
                "Entrypoint": ["/bin/app"],
                "Cmd": ["--serve"],
            }
        }
    )
    assert cfg.env_pairs() == [("A", "1"), ("B", "x=y")]
    assert (cfg.working_dir, cfg.user, cfg.entrypoint, cfg.cmd) == (
        "/w",
        "1000:1000",
        ("/bin/app",),
        ("--serve",),
    )
    assert ImageConfig.from_json(cfg.to_json()) == cfg
    assert ImageConfig.from_oci({}) == ImageConfig()


def test_the_sandbox_starts_in_the_images_workdir_with_its_env_and_user(tmp_path: Path) -> None:
    layout = runtime.Layout(tmp_path, "sbx-1")
    argv = runtime.bwrap_argv(
        layout, "h", ["daemon"], userns="/u", cwd="/srv", image_env=[("PATH", "/x"), ("A", "1")]
    )
    assert argv[argv.index("--chdir") + 1] == "/srv"
    sets = [tuple(argv[i + 1 : i + 3]) for i, a in enumerate(argv) if a == "--setenv"]
    # The image's PATH comes after ours: bwrap applies them in order, so it wins.
    assert sets.index(("PATH", "/x")) > sets.index(("PATH", runtime.PATH))
    assert ("A", "1") in sets
    rt = runtime.DaemonRuntime(tag="t", sources={"py": "/usr"}, python="bin/python3")
    daemon = rt.argv(3, user="app")
    assert daemon[daemon.index("--default-user") + 1] == "app"
    assert "--default-user" not in rt.argv(3)


def test_an_image_without_a_workdir_starts_in_root_or_slash(tmp_path: Path) -> None:
    (tmp_path / "rootfs").mkdir()
    img = Image("x", tmp_path / "rootfs", 100_000, 0.0, "")
    assert img.cwd == "/"
    (tmp_path / "rootfs/root").mkdir()
    assert img.cwd == "/root"


def test_the_missing_hint_names_this_store_and_the_command(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "imgs")
    hint = store.missing_hint("default")
    assert f"sandboxd image --images {tmp_path / 'imgs'} build" in hint
    hint = store.missing_hint("127.0.0.1:5000/a:1")
    assert f"sandboxd image --images {tmp_path / 'imgs'} pull 127.0.0.1:5000/a:1" in hint
    assert "--images" not in ImageStore(Path("/var/lib/sandboxd-host/images")).missing_hint("x")


def test_prune_keeps_what_records_snapshots_and_pools_name(tmp_path: Path) -> None:
    import time

    from sandboxd.host.images.image_use import names_in_use
    from sandboxd.host.model import Record, parse_create
    from sandboxd.host.pools import Pool
    from sandboxd.host.snapshots import Snapshot
    from sandboxd.host.states import Status
    from sandboxd.host.store.catalog import Catalog
    from sandboxd.host.store.records import Store

    store = Store(tmp_path / "sandboxes.db")
    live = Record.new("ns", parse_create({"image": "127.0.0.1:5000/live:1"}), time.time())
    store.put(live)
    gone = Record.new("ns", parse_create({"image": "gone-image"}), time.time())
    gone.status = Status.TERMINATED
    store.put(gone)
    store.close()
    catalog = Catalog(tmp_path / "catalog.db")
    snap = Snapshot("snap-1", "ns", "sbx-1", "completed", "snapped", 1.0, 256, 1024, 0.0, "zst")
    catalog.table("snapshots", Snapshot).put(snap)
    pool = Pool("pool-1", "ns", "pooled", 1.0, 256, 1024, 0, 1, None, 0.0, 0.0)
    catalog.table("pools", Pool).put(pool)
    catalog.close()
    assert names_in_use(tmp_path) == {"127.0.0.1:5000/live:1", "snapped", "pooled"}
    assert names_in_use(tmp_path / "nowhere") == set()
