"""Volumes (issue 15 item 7): named host directories mounted into sandboxes.

Through the official SDK against a real ``sandboxd host``: ``file_systems=`` at
create, ``attach_file_system`` / ``detach_file_system`` live, read-only mounts
attacked from inside by the sandbox's root (remount, a new bind, the new
mount API, ``/proc/self/fd`` reopen), a symlink planted at the mount path,
sharing between sandboxes (one uid map for all), survival past the
sandboxes that used it, refusal to delete a volume in use, and a specific
code for every bad input.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tensorlake.sandbox import FileSystemMount, Sandbox, SandboxClient
from tensorlake.sandbox.exceptions import RemoteAPIError, SandboxError

from .test_host import NS, Host, _cleanup, assert_gone, make_state_root, start_host

VOLUMES = "/v1/namespaces/default/volumes"
UID_OFFSET = 100_000  # images/image_store.py: the sandboxes' root on the host


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    yield from make_state_root("sbv")


@pytest.fixture(scope="module")
def host(state_root: Path) -> Iterator[Host]:
    h = start_host(state_root / "s")
    yield h
    _cleanup(h)
    h.stop()


def _sdk(h: Host) -> dict[str, object]:
    return {"api_url": h.url, "api_key": None}


def _cli(h: Host, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandboxd", "host", "volumes", *args, "--url", h.url],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _sh(sbx: Sandbox, script: str) -> tuple[int | None, str]:
    r = sbx.run("sh", args=["-c", script])
    # The SDK hands the output back without its last newline.
    return r.exit_code, (r.stdout + r.stderr).strip()


def _host_mounts_of(state: Path) -> list[str]:
    """Mounts of the host's own namespace under its volumes dir (there must be none)."""
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if str(state / "volumes") in line]


def _new_volume(h: Host, name: str) -> Path:
    r = _cli(h, "create", name)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == name
    return h.state / "volumes" / "default" / name / "data"


def _rm_volume(h: Host, name: str) -> None:
    with h.http() as c:
        c.delete(f"{VOLUMES}/{name}")


def test_a_volume_is_shared_between_sandboxes_and_outlives_them(host: Host) -> None:
    data = _new_volume(host, "shared")
    try:
        a = Sandbox.create(
            file_systems=[FileSystemMount(file_system_id="shared", mount_path="/mnt/data")],
            **_sdk(host),
        )
        assert [(m.file_system_id, m.mount_path, m.read_only) for m in a.list_file_systems()] == [
            ("shared", "/mnt/data", False)
        ]
        # Root of sandbox A writes a private file (0600) and a dir.
        code, out = _sh(a, "umask 077; echo from-a > /mnt/data/note && mkdir /mnt/data/d")
        assert code == 0, out
        # On the host it is the sandboxes' root, not the host's.
        assert (data / "note").stat().st_uid == UID_OFFSET
        assert (data / "note").read_text() == "from-a\n"

        b = Sandbox.create(**_sdk(host))
        info = b.attach_file_system("shared", "/srv/shared").value
        assert [(m.file_system_id, m.mount_path) for m in info.file_systems] == [
            ("shared", "/srv/shared")
        ]
        # Root of sandbox B (another user namespace, the same map) reads and
        # writes A's private file, and A sees B's write at once.
        code, out = _sh(b, "cat /srv/shared/note && echo from-b >> /srv/shared/note")
        assert (code, out) == (0, "from-a"), out
        code, out = _sh(a, "cat /mnt/data/note; stat -c '%u %a' /mnt/data/note")
        assert out == "from-a\nfrom-b\n0 600", out

        # In use: deleting it is refused, by the API and by the CLI.
        with host.http() as c:
            r = c.delete(f"{VOLUMES}/shared")
        assert r.status_code == 409 and r.json()["code"] == "VOLUME_IN_USE", r.text
        assert a.sandbox_id in r.json()["error"]
        r2 = _cli(host, "rm", "shared")
        assert r2.returncode == 1 and "VOLUME_IN_USE" in r2.stderr, r2.stderr

        # Detach: gone from B's mounts and listing; A still has it.
        info = b.detach_file_system("/srv/shared").value
        assert info.file_systems == []
        code, out = _sh(b, "ls -A /srv/shared")
        assert (code, out) == (0, ""), out
        a.terminate()
        b.terminate()
        assert_gone(host, a.sandbox_id)
        assert_gone(host, b.sandbox_id)

        # Survives both: listed, and a new sandbox reads what they wrote.
        r3 = _cli(host, "ls", "--json")
        assert '"name": "shared"' in r3.stdout and '"used_by": []' in r3.stdout, r3.stdout
        c3 = Sandbox.create(
            file_systems=[FileSystemMount(file_system_id="shared", mount_path="/v")], **_sdk(host)
        )
        code, out = _sh(c3, "cat /v/note; test -d /v/d && echo dir")
        assert out == "from-a\nfrom-b\ndir", out
        c3.terminate()
        assert_gone(host, c3.sandbox_id)
        # Now free: deleted, with its files.
        r4 = _cli(host, "rm", "shared")
        assert r4.returncode == 0, r4.stderr
        assert not data.exists()
        assert _host_mounts_of(host.state) == []
    finally:
        _rm_volume(host, "shared")


ATTACK = textwrap.dedent(
    r"""
    import ctypes, errno, os
    libc = ctypes.CDLL(None, use_errno=True)
    MS_REMOUNT, MS_BIND, MS_RDONLY = 32, 4096, 1
    def call(name, f):
        rc = f()
        print(name, "ok" if rc == 0 else errno.errorcode[ctypes.get_errno()])
    def write(path):
        try:
            with open(path, "w") as f:
                f.write("x")
            print("write", path, "ok")
        except OSError as e:
            print("write", path, errno.errorcode[e.errno])
    write("/ro/planted")
    call("remount-rw", lambda: libc.mount(None, b"/ro", None, MS_REMOUNT | MS_BIND, None))
    call("remount-sb", lambda: libc.mount(None, b"/ro", None, MS_REMOUNT, None))
    os.makedirs("/tmp/again", exist_ok=True)
    call("rebind", lambda: libc.mount(b"/ro", b"/tmp/again", None, MS_BIND, None))
    call("rebind-rw", lambda: libc.mount(None, b"/tmp/again", None, MS_REMOUNT | MS_BIND, None))
    write("/tmp/again/planted")
    # mount_setattr(AT_FDCWD, "/ro", 0, {attr_clr: MOUNT_ATTR_RDONLY}, 32)
    attr = (ctypes.c_uint64 * 4)(0, 1, 0, 0)
    call("mount_setattr", lambda: libc.syscall(442, -100, b"/ro", 0, attr, 32))
    fd = os.open("/ro/seed", os.O_RDONLY)
    write(f"/proc/self/fd/{fd}")
    write("/rw/ok")
    """
)


def test_read_only_mounts_refuse_writes_even_to_the_sandboxs_root(host: Host) -> None:
    data = _new_volume(host, "ro-vol")
    (data / "seed").write_text("seed\n")
    try:
        sbx = Sandbox.create(
            file_systems=[
                FileSystemMount(file_system_id="ro-vol", mount_path="/ro", read_only=True),
                FileSystemMount(file_system_id="ro-vol", mount_path="/rw"),
            ],
            **_sdk(host),
        )
        sbx.write_file("/tmp/attack.py", ATTACK.encode())
        r = sbx.run("python3", args=["/tmp/attack.py"])
        lines = dict(line.rsplit(" ", 1) for line in r.stdout.splitlines())
        assert lines == {
            "write /ro/planted": "EROFS",
            "remount-rw": "EPERM",  # the read-only flag is locked
            "remount-sb": "EPERM",  # the host's filesystem is not the sandbox's to change
            "rebind": "ok",  # a new bind of it is allowed, and keeps the lock
            "rebind-rw": "EPERM",
            "write /tmp/again/planted": "EROFS",
            "mount_setattr": "EPERM",  # the seccomp filter
            "write /proc/self/fd/3": "EROFS",
            "write /rw/ok": "ok",
        }, r.stdout + r.stderr
        assert not (data / "planted").exists()
        assert (data / "ok").read_text() == "x"
        # The mount is nosuid and nodev too.
        code, out = _sh(sbx, "grep ' /ro ' /proc/self/mountinfo")
        assert code == 0 and " ro,nosuid,nodev" in out, out
        sbx.terminate()
    finally:
        _rm_volume(host, "ro-vol")


def test_a_symlink_planted_at_the_mount_path_is_refused(host: Host) -> None:
    _new_volume(host, "sym")
    try:
        sbx = Sandbox.create(**_sdk(host))
        code, out = _sh(sbx, "ln -s /etc /mnt/evil && mkdir -p /mnt/real && ln -s /tmp /mnt/real/l")
        assert code == 0, out
        for path in ("/mnt/evil", "/mnt/evil/sub", "/mnt/real/l/x"):
            with pytest.raises(RemoteAPIError) as e:
                sbx.attach_file_system("sym", path)
            assert (e.value.status_code, e.value.code) == (400, "MOUNT_PATH_SYMLINK"), e.value
        assert sbx.list_file_systems() == []
        code, out = _sh(sbx, "test -f /etc/passwd && ls -A /tmp | grep -c x; true")
        assert "0" in out or out == "", out
        assert _host_mounts_of(host.state) == []
        # Still usable at a real directory.
        sbx.attach_file_system("sym", "/mnt/real/ok")
        assert [m.mount_path for m in sbx.list_file_systems()] == ["/mnt/real/ok"]
        sbx.terminate()
    finally:
        _rm_volume(host, "sym")


def test_a_filesystem_snapshot_does_not_copy_the_volume(host: Host) -> None:
    _new_volume(host, "snapvol")
    try:
        sbx = Sandbox.create(
            file_systems=[FileSystemMount(file_system_id="snapvol", mount_path="/mnt/v")],
            **_sdk(host),
        )
        code, out = _sh(sbx, "echo big > /mnt/v/inside && echo mine > /root/own")
        assert code == 0, out
        snap = sbx.checkpoint()
        restored = Sandbox.create(snapshot_id=snap.snapshot_id, **_sdk(host))
        code, out = _sh(restored, "cat /root/own; ls -A /mnt/v")
        assert (code, out) == (0, "mine"), out  # its own file, none of the volume's
        assert restored.list_file_systems() == []
        restored.terminate()
        sbx.terminate()
    finally:
        _rm_volume(host, "snapvol")


def test_bad_volume_input_gets_a_specific_code(host: Host) -> None:
    _new_volume(host, "good")
    try:
        # Unknown volume at create: 400, never a lost sandbox.
        with pytest.raises(RemoteAPIError) as e:
            Sandbox.create(
                file_systems=[FileSystemMount(file_system_id="nope", mount_path="/x")],
                **_sdk(host),
            )
        assert (e.value.status_code, e.value.code) == (400, "FILE_SYSTEM_NOT_FOUND")
        assert "sandboxd host volumes create nope" in str(e.value)
        sbx = Sandbox.create(**_sdk(host))
        cases = [
            (("nope", "/x"), {}, "FILE_SYSTEM_NOT_FOUND"),
            (("good", "relative/path"), {}, "INVALID_MOUNT_PATH"),
            (("good", "/a/../b"), {}, "INVALID_MOUNT_PATH"),
            (("good", "/"), {}, "MOUNT_PATH_FORBIDDEN"),
            (("good", "/proc"), {}, "MOUNT_PATH_FORBIDDEN"),
            (("good", "/proc/self"), {}, "MOUNT_PATH_FORBIDDEN"),
            (("good", "/dev/shm"), {}, "MOUNT_PATH_FORBIDDEN"),
            (("good", "/run/sandboxd-rt/py"), {}, "MOUNT_PATH_FORBIDDEN"),
            (("bad name!", "/x"), {}, "INVALID_FILE_SYSTEM_ID"),
            (("good", "/x"), {"owner": "1000"}, "MOUNT_OWNER_UNSUPPORTED"),
            (
                ("good", "/x"),
                {"snapshot_id": "s1", "read_only": True},
                "FILE_SYSTEM_SNAPSHOTS_UNSUPPORTED",
            ),
            (("good", "/etc/hostname"), {}, "MOUNT_PATH_NOT_DIRECTORY"),
        ]
        for args, kw, code in cases:
            with pytest.raises(RemoteAPIError) as e:
                sbx.attach_file_system(*args, **kw)  # type: ignore[arg-type]
            assert (e.value.status_code, e.value.code) == (400, code), (args, e.value)
        sbx.attach_file_system("good", "/mnt/g")
        for path in ("/mnt/g", "/mnt/g/sub", "/mnt"):
            with pytest.raises(RemoteAPIError) as e:
                sbx.attach_file_system("good", path)
            assert (e.value.status_code, e.value.code) == (409, "MOUNT_PATH_IN_USE"), e.value
        with pytest.raises(RemoteAPIError) as e:
            sbx.detach_file_system("/not/mounted")
        assert (e.value.status_code, e.value.code) == (400, "FILE_SYSTEM_NOT_MOUNTED")
        sbx.terminate()
        # A terminated sandbox: 409 with a code (its id exists: not a 404).
        with warnings.catch_warnings():  # deprecated, but what reaches an ended sandbox
            warnings.simplefilter("ignore", DeprecationWarning)
            client = SandboxClient.for_localhost(api_url=host.url)
        with pytest.raises(RemoteAPIError) as e:
            client.attach_file_system(sbx.sandbox_id, "good", "/y")
        assert (e.value.status_code, e.value.code) == (409, "SANDBOX_NOT_RUNNING")

        with httpx.Client(base_url=host.url, timeout=30) as c:
            r = c.post(VOLUMES, json={"name": "good"})
            assert (r.status_code, r.json()["code"]) == (409, "VOLUME_EXISTS")
            r = c.post(VOLUMES, json={"name": "../x"})
            assert (r.status_code, r.json()["code"]) == (400, "INVALID_FILE_SYSTEM_ID")
            r = c.get(f"{VOLUMES}/missing")
            assert (r.status_code, r.json()["code"]) == (404, "VOLUME_NOT_FOUND")
            r = c.post(f"{NS}/{sbx.sandbox_id}/file_systems", json={"mount_path": "/x"})
            assert (r.status_code, r.json()["code"]) == (400, "INVALID_FILE_SYSTEM_ID")
            r = c.post(
                NS,
                json={"file_systems": [{"file_system_id": "good", "mount_path": "/proc/x"}]},
            )
            assert (r.status_code, r.json()["code"]) == (400, "MOUNT_PATH_FORBIDDEN")
            r = c.post(
                NS,
                json={
                    "file_systems": [
                        {"file_system_id": "good", "mount_path": "/a"},
                        {"file_system_id": "good", "mount_path": "/a/b"},
                    ]
                },
            )
            assert (r.status_code, r.json()["code"]) == (400, "MOUNT_PATH_IN_USE")
    finally:
        _rm_volume(host, "good")


def test_artifact_storage_calls_are_refused_with_the_way_forward(host: Host) -> None:
    """create/list/delete_file_system go to Tensorlake's Artifact Storage: 501, what to do."""
    script = textwrap.dedent(
        """
        from tensorlake.sandbox import file_system as fs
        for call in (lambda: fs.create_file_system("v"), fs.list_file_systems,
                     lambda: fs.delete_file_system("v")):
            try:
                call()
                print("ANSWERED")
            except Exception as e:
                print(type(e).__name__, str(e)[:1200].replace("\\n", " "))
        """
    )
    env = {**os.environ, "TENSORLAKE_API_URL": host.url, "TENSORLAKE_API_KEY": "k"}
    r = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    lines = r.stdout.splitlines()
    assert len(lines) == 3, r.stdout + r.stderr
    for line in lines:
        assert line.startswith("SandboxError"), line
        assert "501" in line and "ARTIFACT_STORAGE_UNSUPPORTED" in line, line
        assert "sandboxd host volumes create" in line, line


def test_gvisor_hosts_refuse_volumes_with_their_own_code(state_root: Path) -> None:
    h = start_host(state_root / "g", warm=0, extra_args=["--no-net", "--runtime", "gvisor"])
    try:
        with h.http() as c:
            assert c.post(VOLUMES, json={"name": "gv"}).status_code == 201
            with pytest.raises(SandboxError) as e:
                Sandbox.create(
                    file_systems=[FileSystemMount(file_system_id="gv", mount_path="/x")],
                    **_sdk(h),
                )
            assert isinstance(e.value, RemoteAPIError)
            assert (e.value.status_code, e.value.code) == (
                400,
                "FILE_SYSTEMS_UNSUPPORTED_ON_GVISOR",
            )
            assert "--runtime bwrap" in str(e.value)
            assert c.delete(f"{VOLUMES}/gv").status_code == 200
    finally:
        _cleanup(h)
        h.stop()


def test_a_pool_claim_mounts_its_file_systems(host: Host) -> None:
    data = _new_volume(host, "poolvol")
    (data / "hello").write_text("from the host\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client = SandboxClient.for_localhost(api_url=host.url)
    pool = client.create_pool(image="python", cpus=1, memory_mb=512, warm_containers=1)
    pool_id = pool.pool_id
    try:
        sbx = Sandbox.create(
            pool_id=pool_id,
            file_systems=[FileSystemMount(file_system_id="poolvol", mount_path="/mnt/p")],
            **_sdk(host),
        )
        assert [m.mount_path for m in sbx.list_file_systems()] == ["/mnt/p"]
        code, out = _sh(sbx, "cat /mnt/p/hello")
        assert (code, out) == (0, "from the host"), out
        # An unknown volume in a claim: 400 with its code, no sandbox claimed.
        with pytest.raises(RemoteAPIError) as e:
            Sandbox.create(
                pool_id=pool_id,
                file_systems=[FileSystemMount(file_system_id="nope", mount_path="/x")],
                **_sdk(host),
            )
        assert (e.value.status_code, e.value.code) == (400, "FILE_SYSTEM_NOT_FOUND")
        sbx.terminate()
    finally:
        with host.http() as c:
            for s in c.get(NS).json()["sandboxes"]:
                if s.get("pool_id") == pool_id:
                    c.delete(f"{NS}/{s['id']}")
        client.delete_pool(pool_id)
        _rm_volume(host, "poolvol")


def test_a_suspended_sandbox_keeps_its_volume_and_other_users_can_write(host: Host) -> None:
    data = _new_volume(host, "susp")
    try:
        sbx = Sandbox.create(
            name="vol-susp",
            file_systems=[FileSystemMount(file_system_id="susp", mount_path="/mnt/s")],
            **_sdk(host),
        )
        # Not only root: the volume's top dir is 1777, files keep their writer's uid.
        code, out = _sh(
            sbx, "setpriv --reuid=1000 --regid=1000 --clear-groups sh -c 'echo u > /mnt/s/u'"
        )
        assert code == 0, out
        assert (data / "u").stat().st_uid == UID_OFFSET + 1000
        sbx.suspend()
        with pytest.raises(RemoteAPIError) as e:
            sbx.attach_file_system("susp", "/other")
        assert (e.value.status_code, e.value.code) == (409, "SANDBOX_NOT_RUNNING")
        assert "resume" in str(e.value)
        sbx.resume()
        code, out = _sh(sbx, "cat /mnt/s/u")
        assert (code, out) == (0, "u"), out
        sbx.terminate()
    finally:
        _rm_volume(host, "susp")


def test_mounts_and_use_survive_a_restart_of_the_host(state_root: Path) -> None:
    state = state_root / "r"
    h = start_host(state, warm=0)
    try:
        _new_volume(h, "kept")
        sbx = Sandbox.create(
            file_systems=[FileSystemMount(file_system_id="kept", mount_path="/k")], **_sdk(h)
        )
        assert _sh(sbx, "echo before > /k/f")[0] == 0
        h.stop()
        h = start_host(state, warm=0)  # a new port: the records are what is kept
        again = Sandbox.connect(sbx.sandbox_id, **_sdk(h))
        assert _sh(again, "cat /k/f") == (0, "before")
        assert [m.mount_path for m in again.list_file_systems()] == ["/k"]
        with h.http() as c:
            assert c.delete(f"{VOLUMES}/kept").json()["code"] == "VOLUME_IN_USE"
        # The restarted host finds the sandbox's namespaces again.
        again.attach_file_system("kept", "/k2", read_only=True)
        assert _sh(again, "cat /k2/f") == (0, "before")
        again.detach_file_system("/k")
        again.terminate()
        with h.http() as c:
            assert c.delete(f"{VOLUMES}/kept").status_code == 200
    finally:
        _cleanup(h)
        h.stop()
