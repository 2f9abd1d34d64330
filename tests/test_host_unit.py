"""``sandboxd host`` without sandboxes: validation, the record store, the bwrap command line."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request

from sandboxd.host import model
from sandboxd.host.images.image_store import UID_OFFSET, ImageError, ImageStore, shift_owners
from sandboxd.host.images.image_store import check_name as check_image_name
from sandboxd.host.model import ApiError, Record, info, parse_create, parse_update
from sandboxd.host.proxy.http_proxy import sandbox_id_of
from sandboxd.host.runtime.bubblewrap import DaemonRuntime, Layout, bwrap_argv
from sandboxd.host.store.records import NameTaken, Store

from .conftest import skip_with_reason


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
        ({"image": "Not An Image"}, "UNKNOWN_IMAGE"),
        ({"resources": {"cpus": 0}}, "INVALID_CPUS"),
        ({"resources": {"cpus": 64}}, "INVALID_CPUS"),
        ({"resources": {"cpus": True}}, "INVALID_CPUS"),
        ({"resources": {"memory_mb": 1}}, "INVALID_MEMORY_MB"),
        ({"resources": {"memory_mb": "512"}}, "INVALID_MEMORY_MB"),
        ({"resources": {"gpus": [{"count": 1, "model": "H100"}]}}, "GPUS_UNSUPPORTED"),
        ({"name": "sbx-mine"}, "INVALID_NAME"),
        ({"name": "has space"}, "INVALID_NAME"),
        ({"timeout_secs": -1}, "INVALID_TIMEOUT_SECS"),
        ({"snapshot_id": 7}, "INVALID_SNAPSHOT_ID"),
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
    # A resize is never mixed with other changes (resize.py applies it).
    with pytest.raises(ApiError):
        parse_update({"resources": {"cpus": 2.0}, "name": "x"})


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


def test_bwrap_argv_joins_the_mapped_user_namespace_and_roots_in_the_overlay() -> None:
    state = Path("/var/lib/sbx-test")
    layout = Layout(state, "sbx-1")
    rt = DaemonRuntime(
        "tag", {"py": "/root/.pyenv/versions/3.11.7", "p0": "/venv/site"}, "bin/python3.11"
    )
    argv = bwrap_argv(
        layout,
        "sbx-1",
        rt.argv(7),
        userns="/proc/self/fd/5",
        ro_binds=rt.binds(),
        netns=None,
    )
    # nsenter becomes root of the prepared user namespace; bwrap makes the rest.
    assert argv[:3] == ["nsenter", "--user=/proc/self/fd/5", "--"]
    assert "--unshare-user" not in argv
    for flag in ("--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net"):
        assert flag in argv
    i = argv.index("--bind")
    assert argv[i + 1 : i + 3] == [str(layout.root), "/"]
    assert argv.count("--bind") == 1  # nothing else of the host's is writable inside
    # Nothing of the host's root: only /sys read-only and the runtime binds.
    ro = [argv[j + 1] for j, a in enumerate(argv) if a == "--ro-bind"]
    assert ro == ["/sys", "/run/tag/rt/py", "/run/tag/rt/p0"]
    # The daemon serves the socket the host made, handed over as fd 7.
    assert argv[argv.index("--listen-fd") + 1] == "7"
    # Every writable tmpfs has a fixed size.
    tmpfs = [j for j, a in enumerate(argv) if a == "--tmpfs"]
    assert tmpfs and all(argv[j - 2] == "--size" for j in tmpfs)
    # The daemon runs through the loader with the bound interpreter's libraries,
    # isolated (-I) from PYTHON* variables; no LD_LIBRARY_PATH is set for it.
    inner = argv[argv.index("--", 3) + 1 :]
    assert (
        inner[:4]
        == [
            "/lib64/ld-linux-x86-64.so.2",
            "--library-path",
            "/run/sandboxd-rt/py/lib",
            "/run/sandboxd-rt/py/bin/python3.11",
        ]
        or platform.machine() != "x86_64"
    )
    assert "-I" in inner and "LD_LIBRARY_PATH" not in argv and "PYTHONPATH" not in argv
    # With a prepared network namespace, nsenter joins it and bwrap makes none.
    argv = bwrap_argv(layout, "sbx-1", ["d"], userns="/u", netns="/run/netns/x")
    assert argv[:4] == ["nsenter", "--user=/u", "--net=/run/netns/x", "--"]
    assert "--unshare-net" not in argv


def test_image_store_shifts_owners_and_keeps_setuid_bits(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        skip_with_reason("chown to another uid needs root")
    src = tmp_path / "tree"
    (src / "usr/bin").mkdir(parents=True)
    (src / "etc").mkdir()
    (src / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    tool = src / "usr/bin/tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o4755)
    os.chown(src / "etc", 1000, 1000)
    (src / "usr/bin/link").symlink_to("tool")
    store = ImageStore(tmp_path / "images")
    img = store.import_tree("mine", src)
    assert store.names() == ["mine"] and store.get("mine") == img
    assert img.rootfs.is_absolute() and img.uid_offset == UID_OFFSET
    st = (img.rootfs / "usr/bin/tool").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (UID_OFFSET, UID_OFFSET, 0o4755)
    assert (img.rootfs / "etc").stat().st_uid == UID_OFFSET + 1000
    assert os.lstat(img.rootfs / "usr/bin/link").st_uid == UID_OFFSET
    # Shifting twice changes nothing.
    assert shift_owners(img.rootfs, UID_OFFSET) == 0
    # The store's dir is traversable by the sandboxes' uid but not listable.
    assert (tmp_path / "images").stat().st_mode & 0o777 == 0o700
    assert store.remove("mine") and store.get("mine") is None and not store.remove("mine")


def test_image_names_and_unknown_images_are_refused(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    for bad_name in ("", "UP", "../x", "a/b", "-x", "x" * 64):
        with pytest.raises(ImageError):
            check_image_name(bad_name)
        assert store.get(bad_name) is None
    with pytest.raises(ImageError, match="root filesystem"):
        store.import_tree("empty", tmp_path)
    assert parse_create({"image": "python"}).image == "default"
    assert parse_create({"image": "tensorlake/ubuntu-minimal"}).image == "default"
    assert parse_create({"image": "node20"}).image == "node20"  # the store decides
    # issue 17: a registry reference is kept exactly as asked (pulled on create).
    assert parse_create({"image": "docker.io/library/python:3.12"}).image == (
        "docker.io/library/python:3.12"
    )


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


def test_the_proxy_keeps_the_hosts_token_out_of_the_sandbox(tmp_path: Path) -> None:
    """A real upstream on a unix socket (standing in for a sandbox's daemon) echoes its headers."""
    import asyncio
    import json

    from aiohttp import web

    from sandboxd.host.proxy.http_proxy import Sessions, forward

    async def echo(request: web.Request) -> web.StreamResponse:
        return web.json_response({k.lower(): v for k, v in request.headers.items()})

    async def main() -> dict[str, str]:
        sock = str(tmp_path / "d.sock")
        upstream = web.Application()
        upstream.router.add_route("*", "/{tail:.*}", echo)
        up_runner = web.AppRunner(upstream)
        await up_runner.setup()
        await web.UnixSite(up_runner, sock).start()
        sessions = Sessions(lambda sid: sock)

        async def front(request: web.Request) -> web.StreamResponse:
            return await forward(request, sessions.get("sbx-1"))

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", front)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        import aiohttp

        try:
            async with (
                aiohttp.ClientSession() as c,
                c.get(
                    f"http://127.0.0.1:{port}/api/v1/health",
                    headers={"Authorization": "Bearer host-secret", "X-Trace": "t1"},
                ) as r,
            ):
                return json.loads(await r.read())
        finally:
            await sessions.close()
            await runner.cleanup()
            await up_runner.cleanup()

    seen = asyncio.run(main())
    assert seen.get("x-trace") == "t1"  # other headers pass
    assert "authorization" not in seen


def test_a_state_dir_behind_a_closed_dir_is_refused_with_the_reason(tmp_path: Path) -> None:
    from sandboxd.host.manager import untraversable

    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    why = untraversable(closed / "state")
    assert why is not None and str(closed) in why and "mode 700" in why
    closed.chmod(0o711)
    # Opened, it is no longer the reason (pytest's own 0700 dir above it may be).
    again = untraversable(closed / "state" / "not-made-yet")
    assert again is None or f"{closed} " not in again


def test_the_proxy_does_not_follow_a_symlink_put_in_place_of_the_socket(tmp_path: Path) -> None:
    """The sandbox owns its socket's dir: a symlink there must not lead the host elsewhere."""
    import asyncio

    import aiohttp
    from aiohttp import web

    from sandboxd.host.proxy.http_proxy import Sessions

    async def main() -> tuple[int, str]:
        elsewhere = str(tmp_path / "host-only.sock")  # stands in for any socket of the host's
        app = web.Application()

        async def secret(request: web.Request) -> web.Response:
            return web.Response(text="host secret")

        app.router.add_get("/{tail:.*}", secret)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.UnixSite(runner, elsewhere).start()
        link = tmp_path / "d.sock"
        link.symlink_to(elsewhere)
        sessions = Sessions(lambda sid: str(tmp_path / sid))
        try:
            with contextlib.suppress(aiohttp.ClientConnectorError):
                async with sessions.get("d.sock").get("http://sandbox/x") as r:
                    return r.status, await r.text()
            # The real socket, named directly, still works through the same connector.
            async with sessions.get("host-only.sock").get("http://sandbox/x") as r:
                return -1, await r.text()
        finally:
            await sessions.close()
            await runner.cleanup()

    assert asyncio.run(main()) == (-1, "host secret")


def test_a_resume_restarts_the_lifetime_and_the_record_keeps_it() -> None:
    rec = Record.new("default", parse_create({"name": "n", "timeout_secs": 60}), 1000.0)
    assert rec.deadline() == 1060.0
    rec.lifetime_from = 5000.0  # set by a resume, stored with the record
    assert rec.deadline() == 5060.0
    rec.timeout_secs = 0
    assert rec.deadline() is None


def test_an_image_under_a_mounted_overlay_is_neither_replaced_nor_removed(tmp_path: Path) -> None:
    import subprocess

    if os.geteuid() != 0:
        skip_with_reason("mounting an overlay needs root")
    src = tmp_path / "tree"
    (src / "usr").mkdir(parents=True)
    store = ImageStore(tmp_path / "images")
    img = store.import_tree("busy", src)
    for d in ("upper", "work", "root"):
        (tmp_path / d).mkdir()
    opts = f"lowerdir={img.rootfs},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}"
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(tmp_path / "root")], check=True
    )
    try:
        with pytest.raises(ImageError, match="in use"):
            store.remove("busy")
        with pytest.raises(ImageError, match="in use"):
            store.import_tree("busy", src)
    finally:
        subprocess.run(["umount", str(tmp_path / "root")], check=True)
    assert store.remove("busy")
