"""The Files API end to end: the official SDK and raw HTTP against a real daemon."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from tensorlake.sandbox.exceptions import RemoteAPIError

from .conftest import Daemon, free_port, skip_with_reason, wait_for

FILES = "/api/v1/files"


def temp_files(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if ".sandboxd-" in n]


def sdk_error(call: Callable[[], object]) -> RemoteAPIError:
    with pytest.raises(RemoteAPIError) as info:
        call()
    return info.value


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set size of ``pid`` so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str = "1M") -> Iterator[Path]:
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        skip_with_reason(f"cannot mount a tmpfs ({done.stderr.strip()}); needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


# --- round trips through the SDK -------------------------------------------


def test_write_read_list_delete_round_trip(sbx, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "new" / "dir" / "data.bin")
    body = bytes(range(256)) * 64
    sbx.write_file(path, body)
    assert Path(path).read_bytes() == body
    assert sbx.read_file(path).value == body
    listing = sbx.list_directory(str(tmp_path / "new" / "dir"))
    assert [(e.name, e.is_dir, e.size) for e in listing.entries] == [("data.bin", False, len(body))]
    sbx.delete_file(path)
    assert not os.path.exists(path)
    err = sdk_error(lambda: sbx.read_file(path))
    assert (err.status_code, err.code) == (404, "NOT_FOUND")
    assert f"File not found: {path}" in str(err)


def test_empty_write_sent_without_content_length(sbx, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # The SDK sends write_file(p, b"") with neither Content-Length nor Transfer-Encoding.
    target = tmp_path / "f"
    target.write_bytes(b"old content")
    sbx.write_file(str(target), b"")
    assert target.read_bytes() == b""
    sbx.write_file(str(tmp_path / "brand-new"), b"")
    assert (tmp_path / "brand-new").read_bytes() == b""


def test_upload_file_streams_a_local_file(sbx, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    local = tmp_path / "local.bin"
    local.write_bytes(os.urandom(3 << 20))
    sbx.upload_file(local, str(tmp_path / "remote.bin"))
    assert (tmp_path / "remote.bin").read_bytes() == local.read_bytes()


def test_awkward_names_survive_the_query_encoding(sbx, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "a b+c&d=e%20f#g?h é.txt"
    sbx.write_file(str(path), b"x")
    assert path.read_bytes() == b"x"
    assert sbx.read_file(str(path)).value == b"x"


def test_relative_paths_resolve_against_the_daemon_cwd(sbx, daemon: Daemon) -> None:  # type: ignore[no-untyped-def]
    cwd = daemon.log_path.parent  # the fixture starts the daemon there
    sbx.write_file("rel-test/./x.txt", b"relative")
    try:
        assert (cwd / "rel-test" / "x.txt").read_bytes() == b"relative"
        assert sbx.read_file("rel-test/x.txt").value == b"relative"
        assert sbx.list_directory("rel-test").path == "rel-test"
    finally:
        shutil.rmtree(cwd / "rel-test")


def test_mode_kept_on_replace_and_0644_for_new_files(sbx, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    script = tmp_path / "run.sh"
    script.write_bytes(b"#!/bin/sh\n")
    script.chmod(0o750)
    sbx.write_file(str(script), b"#!/bin/sh\necho hi\n")
    assert stat.S_IMODE(script.stat().st_mode) == 0o750
    sbx.write_file(str(tmp_path / "new.txt"), b"x")
    # The test daemon runs with the usual umask 022.
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o644


def test_writes_go_through_a_symlink(sbx, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "real.txt").write_bytes(b"old")
    (tmp_path / "link.txt").symlink_to("real.txt")
    sbx.write_file(str(tmp_path / "link.txt"), b"new")
    assert (tmp_path / "link.txt").is_symlink()
    assert (tmp_path / "real.txt").read_bytes() == b"new"


def test_listing_shape_and_order(sbx, http: httpx.Client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "zdir").mkdir()
    (tmp_path / "Adir").mkdir()
    (tmp_path / "b.txt").write_bytes(b"123")
    (tmp_path / "B.txt").write_bytes(b"")
    (tmp_path / "to-dir").symlink_to("zdir")
    (tmp_path / "dangling").symlink_to("missing")
    before_ms = int(time.time() * 1000) - 5000

    raw = http.get(f"{FILES}/list", params={"path": str(tmp_path)})
    assert raw.status_code == 200
    body = raw.json()
    assert body["path"] == str(tmp_path)
    assert [e["name"] for e in body["entries"]] == [
        "Adir",
        "to-dir",
        "zdir",
        "B.txt",
        "b.txt",
        "dangling",
    ]
    by_name = {e["name"]: e for e in body["entries"]}
    assert by_name["zdir"] == {
        "name": "zdir",
        "is_dir": True,
        "size": None,
        "modified_at": by_name["zdir"]["modified_at"],
    }
    assert by_name["b.txt"]["size"] == 3
    assert by_name["to-dir"]["is_dir"] is True
    assert (by_name["dangling"]["is_dir"], by_name["dangling"]["size"]) == (False, None)
    assert all(isinstance(e["modified_at"], int) for e in body["entries"])
    assert by_name["b.txt"]["modified_at"] > before_ms

    listing = sbx.list_directory(str(tmp_path))
    assert [e.name for e in listing.entries] == [e["name"] for e in body["entries"]]
    assert listing.entries[0].modified_at.year >= 2024


def test_pseudo_files_are_read_to_eof(sbx) -> None:  # type: ignore[no-untyped-def]
    # procfs reports size 0, sysfs 4096: neither is what a read gives.
    assert b"MemTotal:" in sbx.read_file("/proc/meminfo").value
    sysfs = Path("/sys/class/net/lo/address")
    if sysfs.exists():
        assert sbx.read_file(str(sysfs)).value == sysfs.read_bytes()


def test_sparse_files_read_whole(sbx, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # No blocks looks like a pseudo-file: streamed to EOF, still every byte.
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(1 << 20)
    assert sbx.read_file(str(sparse)).value == bytes(1 << 20)


# --- error codes -------------------------------------------------------------


def test_error_codes_through_the_sdk(sbx, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "dir").mkdir()
    cases: list[tuple[Callable[[], object], int, str]] = [
        (lambda: sbx.read_file(str(tmp_path / "dir")), 400, "IS_DIRECTORY"),
        (lambda: sbx.list_directory(str(tmp_path / "file")), 400, "NOT_A_DIRECTORY"),
        (lambda: sbx.read_file(f"{tmp_path}/dir/../file"), 403, "PATH_TRAVERSAL"),
        (lambda: sbx.write_file("../escape.txt", b"x"), 403, "PATH_TRAVERSAL"),
        (lambda: sbx.list_directory(str(tmp_path / "missing")), 404, "NOT_FOUND"),
        (lambda: sbx.delete_file(str(tmp_path / "missing")), 404, "NOT_FOUND"),
        (lambda: sbx.delete_file(str(tmp_path / "dir")), 400, "IS_DIRECTORY"),
        (lambda: sbx.write_file(str(tmp_path / "dir"), b"x"), 400, "IS_DIRECTORY"),
        (lambda: sbx.write_file(str(tmp_path / "file" / "x"), b"x"), 400, "NOT_A_DIRECTORY"),
        (lambda: sbx.read_file("/dev/null"), 400, "NOT_A_REGULAR_FILE"),
        (lambda: sbx.write_file("/dev/null", b"x"), 400, "NOT_A_REGULAR_FILE"),
    ]
    for call, status, code in cases:
        err = sdk_error(call)
        assert (err.status_code, err.code) == (status, code), str(err)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert (tmp_path / "dir").is_dir()
    err = sdk_error(lambda: sbx.read_file(str(tmp_path / "dir")))
    assert (
        f"Path is a directory, not a file: {tmp_path / 'dir'}. "
        "Use /api/v1/files/list to list directory contents."
    ) in str(err)


@pytest.mark.parametrize(
    ("method", "query", "status", "code"),
    [
        ("GET", "", 400, "INVALID_PATH"),
        ("GET", "?path=", 400, "INVALID_PATH"),
        ("PUT", "?path=", 400, "INVALID_PATH"),
        ("DELETE", "", 400, "INVALID_PATH"),
        ("GET", "?path=/tmp/a%00b", 400, "INVALID_PATH"),
        ("PUT", "?path=/tmp/a%00b", 400, "INVALID_PATH"),
        ("GET", f"?path=/tmp/{'n' * 300}", 400, "INVALID_PATH"),
        ("PUT", f"?path=/tmp/{'n' * 300}", 400, "INVALID_PATH"),
        ("GET", "?path=/", 400, "IS_DIRECTORY"),
        ("PUT", "?path=/", 400, "IS_DIRECTORY"),
        ("DELETE", "?path=/", 400, "IS_DIRECTORY"),
        ("GET", "?path=/etc/hostname/", 404, "NOT_FOUND"),
        ("GET", "?path=..", 403, "PATH_TRAVERSAL"),
    ],
)
def test_raw_error_codes(
    http: httpx.Client, method: str, query: str, status: int, code: str
) -> None:
    r = http.request(method, f"{FILES}{query}", content=b"x" if method == "PUT" else None)
    assert (r.status_code, r.json()["code"]) == (status, code), r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]


@pytest.mark.parametrize("query", ["", "?path=", "?path=/dev/null", "?path=/etc/hostname"])
def test_listing_errors_are_json(http: httpx.Client, query: str) -> None:
    r = http.get(f"{FILES}/list{query}")
    assert r.status_code in (400, 404), r.text
    assert r.json()["code"] in ("INVALID_PATH", "NOT_A_DIRECTORY")


# --- Range and HEAD ----------------------------------------------------------


@pytest.fixture
def ten_bytes(tmp_path: Path) -> str:
    (tmp_path / "ten").write_bytes(b"0123456789")
    return str(tmp_path / "ten")


@pytest.mark.parametrize(
    ("range_", "status", "body", "content_range"),
    [
        ("bytes=2-5", 206, b"2345", "bytes 2-5/10"),
        ("bytes=7-", 206, b"789", "bytes 7-9/10"),
        ("bytes=-3", 206, b"789", "bytes 7-9/10"),
        ("bytes=8-100", 206, b"89", "bytes 8-9/10"),
        ("bytes=0-1,4-5", 200, b"0123456789", None),
        ("lines=1-2", 200, b"0123456789", None),
    ],
)
def test_range_reads(
    http: httpx.Client,
    ten_bytes: str,
    range_: str,
    status: int,
    body: bytes,
    content_range: str | None,
) -> None:
    r = http.get(FILES, params={"path": ten_bytes}, headers={"Range": range_})
    assert r.status_code == status
    assert r.content == body
    assert r.headers.get("content-range") == content_range
    assert r.headers["content-length"] == str(len(body))
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-type"] == "application/octet-stream"


@pytest.mark.parametrize("range_", ["bytes=10-", "bytes=50-60", "bytes=-0"])
def test_unsatisfiable_range(http: httpx.Client, ten_bytes: str, range_: str) -> None:
    r = http.get(FILES, params={"path": ten_bytes}, headers={"Range": range_})
    assert r.status_code == 416
    assert r.headers["content-range"] == "bytes */10"
    assert r.json()["code"] == "RANGE_NOT_SATISFIABLE"


def test_if_range_with_a_stale_validator_gets_the_whole_file(
    http: httpx.Client, ten_bytes: str
) -> None:
    fresh = http.head(FILES, params={"path": ten_bytes})
    headers = {"Range": "bytes=0-0", "If-Range": fresh.headers["etag"]}
    assert http.get(FILES, params={"path": ten_bytes}, headers=headers).status_code == 206
    headers["If-Range"] = '"stale"'
    r = http.get(FILES, params={"path": ten_bytes}, headers=headers)
    assert (r.status_code, r.content) == (200, b"0123456789")


def test_head(http: httpx.Client, ten_bytes: str) -> None:
    r = http.head(FILES, params={"path": ten_bytes})
    assert (r.status_code, r.content) == (200, b"")
    assert r.headers["content-length"] == "10"
    assert r.headers["etag"] and r.headers["last-modified"]
    r = http.head(FILES, params={"path": ten_bytes}, headers={"Range": "bytes=1-2"})
    assert (r.status_code, r.headers["content-range"]) == (206, "bytes 1-2/10")
    assert http.head(FILES, params={"path": ten_bytes + ".missing"}).status_code == 404


# --- atomicity -----------------------------------------------------------------


def test_interrupted_upload_leaves_the_old_file(daemon: Daemon, tmp_path: Path) -> None:
    target = tmp_path / "victim.bin"
    target.write_bytes(b"original")
    head = (
        f"PUT {FILES}?path={quote(str(target), safe='')} HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nContent-Length: {10 << 20}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        sock.sendall(head.encode())
        sock.sendall(b"z" * (1 << 20))
        # The upload really started: a temp file exists beside the target.
        wait_for(lambda: temp_files(tmp_path), timeout=5)
    wait_for(lambda: not temp_files(tmp_path), timeout=5)
    assert target.read_bytes() == b"original"


def test_half_closed_short_body_leaves_the_old_file(daemon: Daemon, tmp_path: Path) -> None:
    target = tmp_path / "victim.bin"
    target.write_bytes(b"original")
    head = (
        f"PUT {FILES}?path={quote(str(target), safe='')} HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        sock.settimeout(5)
        sock.sendall(head.encode() + b"short")
        sock.shutdown(socket.SHUT_WR)
        reply = sock.recv(4096)
    # Either an error answer or a closed connection; never a 2xx.
    assert not reply.startswith(b"HTTP/1.1 2")
    wait_for(lambda: not temp_files(tmp_path), timeout=5)
    assert target.read_bytes() == b"original"


def test_full_disk_is_507_and_the_old_file_survives(sbx, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with mounted_tmpfs(tmp_path / "small", "1M") as small:
        target = small / "keep.bin"
        good = os.urandom(100 << 10)
        sbx.write_file(str(target), good)
        err = sdk_error(lambda: sbx.write_file(str(target), os.urandom(2 << 20)))
        assert (err.status_code, err.code) == (507, "INSUFFICIENT_STORAGE")
        assert target.read_bytes() == good
        assert temp_files(small) == []
        # A new file that does not fit leaves nothing behind either.
        err = sdk_error(lambda: sbx.write_file(str(small / "new.bin"), os.urandom(2 << 20)))
        assert err.code == "INSUFFICIENT_STORAGE"
        assert sorted(os.listdir(small)) == ["keep.bin"]


def test_read_only_filesystem_is_403(sbx, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with mounted_tmpfs(tmp_path / "ro", "1M") as ro:
        (ro / "f").write_bytes(b"kept")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        for call in (
            lambda: sbx.write_file(str(ro / "f"), b"new"),
            lambda: sbx.write_file(str(ro / "new"), b"new"),
            lambda: sbx.delete_file(str(ro / "f")),
        ):
            err = sdk_error(call)
            assert (err.status_code, err.code) == (403, "READ_ONLY_FILESYSTEM"), str(err)
        assert sbx.read_file(str(ro / "f")).value == b"kept"


# --- EACCES: a daemon that is root but without the capabilities that bypass permissions


def start_daemon_without_dac(tmp_path: Path) -> Daemon:
    """Root minus CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH/CAP_FOWNER: permissions apply to it."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        skip_with_reason("setpriv (util-linux) is not installed; cannot drop capabilities")
    caps = "-dac_override,-dac_read_search,-fowner"
    check = subprocess.run([setpriv, "--bounding-set", caps, "true"], capture_output=True)
    if check.returncode != 0:
        skip_with_reason(f"setpriv cannot drop capabilities here: {check.stderr.decode().strip()}")
    port = free_port()
    log_path = tmp_path / f"sandboxd-nodac-{port}.log"
    cmd = [setpriv, "--bounding-set", caps, sys.executable, "-m", "sandboxd", "serve"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    daemon = Daemon(f"http://127.0.0.1:{port}", port, proc, log_path)

    def healthy() -> bool:
        assert proc.poll() is None, daemon.log()
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{daemon.url}/api/v1/health", timeout=1).status_code == 200
        return False

    try:
        wait_for(healthy, timeout=15, interval=0.05)
    except BaseException:
        daemon.stop()
        raise
    return daemon


@pytest.fixture
def daemon_without_dac(tmp_path: Path) -> Iterator[Daemon]:
    if os.geteuid() != 0:
        skip_with_reason("needs root to create files the daemon may not touch")
    daemon = start_daemon_without_dac(tmp_path)
    yield daemon
    daemon.stop()


def test_permission_denied_is_403(daemon_without_dac: Daemon, tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "secret").write_bytes(b"s")
    os.chown(private, 65534, 65534)  # owned by nobody: root without DAC override is locked out
    sbx = daemon_without_dac.sandbox()
    for call in (
        lambda: sbx.read_file(str(private / "secret")),
        lambda: sbx.list_directory(str(private)),
        lambda: sbx.write_file(str(private / "new"), b"x"),
        lambda: sbx.delete_file(str(private / "secret")),
    ):
        err = sdk_error(call)
        assert (err.status_code, err.code) == (403, "PERMISSION_DENIED"), str(err)
    assert (private / "secret").read_bytes() == b"s"


# --- big files: streaming, flat memory, a responsive daemon ---------------------


def test_big_file_round_trip_keeps_memory_flat(make_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    size = 128 << 20
    local = tmp_path / "big.local"
    digest = hashlib.sha256()
    with open(local, "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(size >> 20):
            chunk = bytes([i % 256]) + block[1:]
            digest.update(chunk)
            f.write(chunk)
    daemon = make_daemon()  # fresh: earlier tests must not have raised its peak already
    sbx = daemon.sandbox()
    remote = str(tmp_path / "big.remote")
    sbx.write_file(remote, b"warm-up")
    assert sbx.read_file(remote).value == b"warm-up"
    hwm_before = vm_hwm_kib(daemon.pid)

    latencies: list[float] = []
    stop = threading.Event()

    def probe_health() -> None:
        with daemon.http() as client:
            while not stop.is_set():
                t = time.perf_counter()
                client.get("/api/v1/health")
                latencies.append(time.perf_counter() - t)
                time.sleep(0.02)

    prober = threading.Thread(target=probe_health)
    prober.start()
    try:
        t0 = time.perf_counter()
        sbx.upload_file(local, remote)
        t_put = time.perf_counter() - t0
        t0 = time.perf_counter()
        received = hashlib.sha256()
        with daemon.http() as client, client.stream("GET", FILES, params={"path": remote}) as r:
            assert r.status_code == 200
            assert r.headers["content-length"] == str(size)
            for chunk in r.iter_bytes(1 << 20):
                received.update(chunk)
        t_get = time.perf_counter() - t0
        via_sdk = hashlib.sha256(sbx.read_file(remote).value).hexdigest()
    finally:
        stop.set()
        prober.join()
    assert received.hexdigest() == digest.hexdigest()
    assert via_sdk == digest.hexdigest()
    assert hashlib.sha256(Path(remote).read_bytes()).hexdigest() == digest.hexdigest()

    growth_mib = (vm_hwm_kib(daemon.pid) - hwm_before) / 1024
    mib = size / (1 << 20)
    print(
        f"\n{mib:.0f} MiB: PUT {mib / t_put:.0f} MiB/s, GET {mib / t_get:.0f} MiB/s, "
        f"daemon peak RSS growth {growth_mib:.1f} MiB, "
        f"slowest health probe {max(latencies) * 1000:.0f} ms over {len(latencies)}"
    )
    assert growth_mib < 50
    # The daemon kept answering throughout (how fast is a figure for `make bench`).
    assert latencies
