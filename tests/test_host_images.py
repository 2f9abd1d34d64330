"""Images end to end (issue 17): a real registry on loopback, skopeo and umoci, a real host.

Test images are built here with umoci and pushed to Debian's docker-registry
(registry_fixture.py); the host pulls them on create, the official SDK starts
sandboxes on them, and ``sandboxd image`` pulls, imports and prunes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from .conftest import free_port, skip_with_reason, stop_process, wait_for
from .registry_fixture import (
    Registry,
    add_manifest_list,
    add_odd_media_tag,
    build_images,
    missing_tools,
    run,
    start_registry,
)
from .test_host import IMAGES, NS, Host, _cleanup, make_state_root, start_host

# Until the lead moves the new default image into build/images, it is built beside it.
DEFAULT_STORE = IMAGES.parent / "images-new" if (IMAGES.parent / "images-new").is_dir() else IMAGES


@dataclass
class World:
    root: Path
    layout: Path
    public: Registry
    private: Registry
    store: Path  # the host's image store (pulled images only)
    host: Host

    def ref(self, tag: str = "v1", repo: str = "test/app") -> str:
        return f"{self.public.host}/{repo}:{tag}"

    def cli(self, *args: str, store: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "sandboxd",
                "image",
                "--images",
                str(store or self.store),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    reason = missing_tools()
    if reason:
        skip_with_reason(reason)
    gen = make_state_root("sbi")
    root = next(gen)
    started: list[Registry | Host] = []
    try:
        layout = build_images(root / "build", IMAGES / "default" / "rootfs")
        public = start_registry(root / "public")
        started.append(public)
        private = start_registry(root / "private", private=True)
        started.append(private)
        # The same image with zstd layers (the others are gzip).
        zlayout = root / "zstd-layout"  # its own dir: skopeo reuses blobs a dest has
        run(
            [
                "skopeo",
                "copy",
                "--dest-compress-format",
                "zstd",
                f"oci:{layout}:v1",
                f"oci:{zlayout}:zstd",
            ]
        )
        add_odd_media_tag(layout)
        for tag in ("base", "v1", "big", "odd"):
            public.push(layout, tag, "test/app")
        add_manifest_list(layout, mine="v1", other="base")
        public.push(layout, "multi", "test/app", "--all")
        public.push(zlayout, "zstd", "test/zstd", "--dest-compress-format", "zstd")
        private.push(layout, "v1", "secret/app")
        store = root / "images"
        host = start_host(
            root / "s",
            warm=0,
            extra_args=["--no-net", "--no-build-default", "--images", str(store)],
        )
        started.append(host)
        yield World(root, layout, public, private, store, host)
    finally:
        for proc in reversed(started):
            if isinstance(proc, Host):
                _cleanup(proc)
            proc.stop()
        next(gen, None)


def _create(w: World, image: str) -> tuple[int, dict[str, object]]:
    with w.host.http() as c:
        r = c.post(NS, json={"image": image, "resources": {"memory_mb": 256}})
        return r.status_code, r.json()


def test_the_sdk_starts_a_registry_image_with_its_env_workdir_user_and_layers(world: World) -> None:
    from tensorlake.sandbox import Sandbox

    ref = world.ref()
    sbx = Sandbox.create(image=ref, api_url=world.host.url, api_key=None, memory_mb=256)
    try:
        r = sbx.run(
            "sh",
            args=[
                "-c",
                'echo "$GREETING"; pwd; id -u; cat /etc/kept.txt hello.txt; '
                "test -e /etc/gone.txt && echo gone-is-present || echo gone-is-absent",
            ],
        )
        assert r.exit_code == 0, r.stderr
        assert r.stdout.split("\n")[:6] == [
            "hi from the image",  # Env
            "/srv/app",  # WorkingDir
            "1234",  # User (app)
            "still here",  # the lower layer
            "hello from layer 2",  # the upper layer
            "gone-is-absent",  # its whiteout
        ], r.stdout
        # A request naming its user still wins over the image's.
        assert sbx.run("id", args=["-u"], user="root").stdout.strip() == "0"
        with world.host.http() as c:
            info = c.get(f"{NS}/{sbx.sandbox_id}").json()
        assert info["image"] == ref  # read back exactly as asked
        # The create named no entrypoint: the image's Entrypoint + Cmd ran, as an
        # ordinary process with the image's defaults, and info reports it.
        assert info["entrypoint"] == ["sh", "-c", "echo entry"], info
        (entry,) = [p for p in sbx.list_processes() if p.args == ["-c", "echo entry"]]
        assert wait_for(lambda: sbx.get_stdout(entry.pid).lines) == ["entry"]
    finally:
        sbx.terminate()
    # Pulled once: a second create finds it in the store.
    listed = [json.loads(line)["name"] for line in world.cli("list", "--json").stdout.splitlines()]
    assert listed.count(ref) == 1


def test_zstd_layers_are_pulled_and_unpacked(world: World) -> None:
    manifest = httpx.get(
        f"http://{world.public.host}/v2/test/zstd/manifests/zstd",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    ).json()
    assert {la["mediaType"] for la in manifest["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    }
    r = world.cli("pull", world.ref("zstd", "test/zstd"))
    assert r.returncode == 0, r.stderr
    found = [json.loads(x) for x in world.cli("list", "--json").stdout.splitlines()]
    (img,) = [d for d in found if d["name"] == world.ref("zstd", "test/zstd")]
    rootfs = Path(str(img["rootfs"]))
    assert (rootfs / "srv/app/hello.txt").read_text() == "hello from layer 2\n"
    assert not (rootfs / "etc/gone.txt").exists()


def test_a_manifest_list_resolves_to_this_machines_architecture(world: World) -> None:
    index = httpx.get(
        f"http://{world.public.host}/v2/test/app/manifests/multi",
        headers={"Accept": "application/vnd.oci.image.index.v1+json"},
    ).json()
    assert len(index["manifests"]) == 2, index
    r = world.cli("pull", world.ref("multi"))
    assert r.returncode == 0, r.stderr
    (img,) = [
        json.loads(x)
        for x in world.cli("list", "--json").stdout.splitlines()
        if json.loads(x)["name"] == world.ref("multi")
    ]
    # This machine's entry is v1 (two layers, its config); the other one is base.
    assert (Path(str(img["rootfs"])) / "srv/app/hello.txt").exists()
    assert img["config"]["working_dir"] == "/srv/app"  # type: ignore[index]


def test_an_unknown_name_lists_the_images_and_the_command_on_this_store(world: World) -> None:
    status, body = _create(world, "no-such-image")
    assert (status, body["code"]) == (400, "UNKNOWN_IMAGE"), body
    msg = str(body["error"])
    assert f"sandboxd image --images {world.store} import no-such-image PATH" in msg
    assert "it has:" in msg


def test_a_missing_registry_image_is_refused_with_a_code_and_stores_nothing(
    world: World,
) -> None:
    before = sorted(p.name for p in world.store.iterdir())
    status, body = _create(world, world.ref("v9", "test/absent"))
    assert (status, body["code"]) == (400, "IMAGE_NOT_FOUND"), body
    assert sorted(p.name for p in world.store.iterdir()) == before


def test_an_unsupported_layer_media_type_is_refused_with_a_code(world: World) -> None:
    before = sorted(p.name for p in world.store.iterdir())
    status, body = _create(world, world.ref("odd"))
    assert (status, body["code"]) == (400, "UNSUPPORTED_MEDIA_TYPE"), body
    assert sorted(p.name for p in world.store.iterdir()) == before
    r = world.cli("import", "odd", f"{world.layout}:odd", store=world.root / "odd-store")
    assert r.returncode == 1 and "[UNSUPPORTED_MEDIA_TYPE]" in r.stderr, r.stderr


def test_a_private_image_needs_credentials(world: World) -> None:
    ref = f"{world.private.host}/secret/app:v1"
    status, body = _create(world, ref)  # the host has no credentials
    assert (status, body["code"]) == (400, "REGISTRY_AUTH_REQUIRED"), body
    r = world.cli("pull", ref)
    assert r.returncode == 1 and "[REGISTRY_AUTH_REQUIRED]" in r.stderr, r.stderr
    bad = world.private.auth_file(world.root / "bad-auth.json", password="wrong")
    r = world.cli("pull", ref, "--registry-auth", str(bad))
    assert r.returncode == 1 and "[REGISTRY_AUTH_REFUSED]" in r.stderr, r.stderr
    good = world.private.auth_file(world.root / "auth.json")
    r = world.cli("pull", ref, "--registry-auth", str(good))
    assert r.returncode == 0, r.stderr
    status, body = _create(world, ref)  # now in the store
    assert status == 200 and body["status"] == "running", body
    with world.host.http() as c:
        c.delete(f"{NS}/{body['sandbox_id']}")


def test_an_interrupted_pull_leaves_nothing_in_the_store(world: World) -> None:
    store = world.root / "interrupted"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sandboxd",
            "image",
            "--images",
            str(store),
            "pull",
            world.ref("big"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("Copying blob"):
                break  # half-way: the layers are coming
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 130, proc.stderr.read()
    finally:
        stop_process(proc)  # type: ignore[arg-type]
    assert list(store.iterdir()) == []


def test_docker_save_tarballs_and_oci_layouts_import_with_their_config(world: World) -> None:
    store = world.root / "imports"
    tar = world.root / "app.tar"
    run(["skopeo", "copy", f"oci:{world.layout}:v1", f"docker-archive:{tar}:test/app:v1"])
    r = world.cli("import", "from-tar", str(tar), store=store)
    assert r.returncode == 0, r.stderr
    r = world.cli("import", "from-layout", f"{world.layout}:v1", store=store)
    assert r.returncode == 0, r.stderr
    r = world.cli("import", "ambiguous", str(world.layout), store=store)
    assert r.returncode == 1 and "[IMAGE_TAG_REQUIRED]" in r.stderr, r.stderr
    images = {
        d["name"]: d
        for d in (json.loads(x) for x in world.cli("list", "--json", store=store).stdout.splitlines())
    }
    assert sorted(images) == ["from-layout", "from-tar"]
    for d in images.values():
        assert d["config"]["working_dir"] == "/srv/app"  # type: ignore[index]
        assert d["config"]["user"] == "app"  # type: ignore[index]
        rootfs = Path(str(d["rootfs"]))
        assert (rootfs / "srv/app/hello.txt").exists()
        assert not (rootfs / "etc/gone.txt").exists()
        assert (rootfs / "home/app").stat().st_uid == 100_000 + 1234  # shifted owners


def test_prune_removes_only_images_nothing_uses(world: World) -> None:
    # The registry image a live sandbox runs on stays; an unused import and a
    # dead pull's leftovers go.
    ref = world.ref()
    status, body = _create(world, ref)
    assert status == 200, body
    try:
        run(["skopeo", "copy", f"oci:{world.layout}:base", f"oci:{world.root}/unused:base"])
        r = world.cli("import", "unused", f"{world.root}/unused:base")
        assert r.returncode == 0, r.stderr
        leftover = world.store / ".build-x-999999999-1"
        leftover.mkdir()
        (world.store / ".buildah" / "root").mkdir(parents=True)  # a Dockerfile build's cache
        state = world.host.state
        r = world.cli("prune", "--state-dir", str(state), "--dry-run")
        assert r.returncode == 0 and "would remove unused" in r.stdout, r.stdout
        r = world.cli("prune", "--state-dir", str(state))
        assert r.returncode == 0, r.stderr
        removed = r.stdout.splitlines()
        assert "removed unused" in removed and "removed .build-x-999999999-1" in removed
        assert "removed .buildah" in removed and not (world.store / ".buildah").exists()
        assert f"removed {ref}" not in removed, r.stdout
        names = [json.loads(x)["name"] for x in world.cli("list", "--json").stdout.splitlines()]
        assert ref in names and "unused" not in names
        assert not leftover.exists()
        # rm of an image a sandbox runs on is refused.
        r = world.cli("rm", ref)
        assert r.returncode == 1 and "[IMAGE_IN_USE]" in r.stderr, r.stderr
    finally:
        with world.host.http() as c:
            c.delete(f"{NS}/{body['sandbox_id']}")


def test_the_default_image_can_install_things() -> None:
    if not (DEFAULT_STORE / "default" / "image.json").exists():
        skip_with_reason(f"no default image in {DEFAULT_STORE}: make image")
    gen = make_state_root("sbimg")
    root = next(gen)
    host = None
    try:
        host = start_host(
            root / "s", warm=0, extra_args=["--no-net", "--images", str(DEFAULT_STORE)]
        )
        from tensorlake.sandbox import Sandbox

        sbx = Sandbox.create(api_url=host.url, api_key=None, memory_mb=512)
        r = sbx.run(
            "sh",
            args=[
                "-c",
                "set -e; pip --version; git --version; curl --version | head -1; "
                "apt-get --version | head -1; python3 -m venv /tmp/v; /tmp/v/bin/pip --version; "
                "grep -c '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list",
            ],
        )
        assert r.exit_code == 0, r.stdout + r.stderr
        assert "/tmp/v/" in r.stdout
        assert sbx.run("id", args=["-un"], user="user").stdout.strip() == "user"
        sbx.terminate()
    finally:
        if host is not None:
            _cleanup(host)
            host.stop()
        next(gen, None)
    assert host is not None and host.proc.poll() is not None
    assert os.path.isdir(DEFAULT_STORE / "default" / "rootfs")


def test_a_first_start_on_an_empty_store_builds_the_default_image_or_says_why(
    world: World,
) -> None:
    # Without mmdebstrap on its PATH the build cannot run: the host says so and
    # names the flag; with the flag it starts, and a create names this store.
    # (The build itself is `sandboxd image build`, run by every `make test`.)
    tools = world.root / "no-mmdebstrap"
    tools.mkdir()
    for tool in ("bwrap", "nsenter", "unshare", "mount", "umount", "ip", "sleep"):
        found = shutil.which(tool)
        if found:
            (tools / tool).symlink_to(found)
    state = world.root / "first"
    r = subprocess.run(
        [
            *(sys.executable, "-m", "sandboxd", "host", "--state-dir", str(state)),
            *("--port", str(free_port()), "--no-net", "--warm", "0"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": str(tools)},
    )
    assert r.returncode != 0
    assert f"the image store {state / 'images'} is empty: building the default image" in r.stderr
    assert "mmdebstrap is not installed" in r.stderr and "--no-build-default" in r.stderr
    assert not (state / "images" / "default").exists()
    images = state / "images"
    host = start_host(
        state, warm=0, extra_args=["--no-net", "--no-build-default", "--images", str(images)]
    )
    try:
        with host.http() as c:
            r2 = c.post(NS, json={})
        assert r2.status_code == 400 and r2.json()["code"] == "UNKNOWN_IMAGE", r2.text
        assert f"sandboxd image --images {images} build`" in r2.json()["error"]
    finally:
        _cleanup(host)
        host.stop()


def test_a_dockerfile_from_a_registry_image_builds_and_runs(world: World) -> None:
    from tensorlake.sandbox import Sandbox

    ctx = world.root / "ctx-registry"
    ctx.mkdir()
    (ctx / "note.txt").write_text("copied in\n")
    (ctx / "Dockerfile").write_text(
        f"FROM {world.ref()}\n"
        "ARG WHO=nobody\n"
        "ENV BUILT_FOR=$WHO\n"
        "USER root\n"
        "RUN echo ran > /srv/ran.txt\n"
        "COPY note.txt /srv/note.txt\n"
        "WORKDIR /srv\n"
        "USER app\n"
    )
    r = world.cli(
        "build", "built", str(ctx), "--dockerfile", str(ctx / "Dockerfile"),
        "--build-arg", "WHO=tests",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    sbx = Sandbox.create(image="built", api_url=world.host.url, api_key=None, memory_mb=256)
    try:
        out = sbx.run(
            "sh", args=["-c", 'echo "$BUILT_FOR $GREETING"; pwd; id -u; cat ran.txt note.txt']
        )
        assert out.stdout.splitlines() == [
            "tests hi from the image",  # ARG -> ENV, and the base's Env kept
            "/srv",
            "1234",
            "ran",
            "copied in",
        ], out.stdout + out.stderr
    finally:
        sbx.terminate()
    # A failing RUN: a clear code, and no image.
    (ctx / "Dockerfile").write_text(f"FROM {world.ref()}\nRUN exit 3\n")
    r = world.cli("build", "broken", str(ctx), "--dockerfile", str(ctx / "Dockerfile"))
    assert r.returncode == 1 and "[BUILD_FAILED]" in r.stderr, r.stderr
    assert "broken" not in world.cli("list", "--json").stdout
    assert not [p for p in world.store.iterdir() if p.name.startswith(".build-")]


def _deb(root: Path) -> Path:
    """A tiny Debian package made here (dpkg-deb), so the RUN needs no mirror."""
    pkg = root / "hello-sbx"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr/share/hello-sbx").mkdir(parents=True)
    (pkg / "usr/share/hello-sbx/hello").write_text("installed by dpkg\n")
    (pkg / "DEBIAN/control").write_text(
        "Package: hello-sbx\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: tests <t@example.test>\nDescription: a test package\n"
    )
    run(["dpkg-deb", "--build", str(pkg), str(root / "hello-sbx.deb")])
    return root / "hello-sbx.deb"


def test_a_dockerfile_from_the_default_image_installs_a_debian_package(world: World) -> None:
    store = world.root / "df-store"
    store.mkdir()
    (store / "default").symlink_to(DEFAULT_STORE / "default")  # read only, never built here
    ctx = world.root / "ctx-default"
    ctx.mkdir()
    _deb(ctx)
    (ctx / "Dockerfile").write_text(
        "FROM default\n"
        "COPY hello-sbx.deb /tmp/\n"
        "RUN dpkg -i /tmp/hello-sbx.deb && rm /tmp/hello-sbx.deb\n"
        "ENV MODE=built\n"
        "WORKDIR /work\n"
        "USER user\n"
    )
    r = world.cli(
        "build", "withpkg", str(ctx), "--dockerfile", str(ctx / "Dockerfile"), store=store
    )
    assert r.returncode == 0, r.stderr
    (img,) = [
        json.loads(x)
        for x in world.cli("list", "--json", store=store).stdout.splitlines()
        if json.loads(x)["name"] == "withpkg"
    ]
    rootfs = Path(str(img["rootfs"]))
    assert (rootfs / "usr/share/hello-sbx/hello").read_text() == "installed by dpkg\n"
    assert "hello-sbx" in (rootfs / "var/lib/dpkg/status").read_text()
    assert (rootfs / "usr/bin/pip").exists()  # the base's files are there
    assert img["config"]["working_dir"] == "/work"  # type: ignore[index]
    assert img["config"]["user"] == "user"  # type: ignore[index]
    assert "MODE=built" in img["config"]["env"]  # type: ignore[index]
    # Owners are shifted like every image's: the user's home is 100000 + 1000.
    assert (rootfs / "home/user").stat().st_uid == 101_000
