"""The Files API logic without a server: paths, ranges, staging, uploads, listings."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sandboxd.files import (
    ByteRange,
    FileReader,
    FilesError,
    RangeNotSatisfiable,
    StagedFile,
    delete_file,
    list_dir,
    parse_range,
    receive,
    resolve,
)
from sandboxd.files.errors import from_os_error
from sandboxd.files.ranges import etag, http_date, if_range_allows

from .conftest import skip_with_reason


def temp_files(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if ".sandboxd-" in n]


def code_of(fn: object, *args: object) -> str:
    with pytest.raises(FilesError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.code


# --- paths -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/etc/hostname", "/etc/hostname"),
        ("notes.txt", "/base/notes.txt"),
        ("./a/./b", "/base/a/b"),
        ("a//b", "/base/a/b"),
        ("//etc", "/etc"),
        ("/tmp/dir/", "/tmp/dir/"),
        ("/", "/"),
        ("...", "/base/..."),
        ("..x/y..", "/base/..x/y.."),
    ],
)
def test_resolve(raw: str, expected: str) -> None:
    assert resolve(raw, "/base") == expected


@pytest.mark.parametrize("raw", ["..", "../x", "a/../b", "/tmp/..", "a/..", "/a/../../etc"])
def test_resolve_refuses_any_dotdot_component(raw: str) -> None:
    assert code_of(resolve, raw, "/base") == "PATH_TRAVERSAL"


@pytest.mark.parametrize("raw", [None, "", "a\x00b"])
def test_resolve_refuses_missing_empty_and_nul(raw: str | None) -> None:
    assert code_of(resolve, raw, "/base") == "INVALID_PATH"


# --- ranges ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-0", 10, ByteRange(0, 0)),
        ("bytes=2-5", 10, ByteRange(2, 5)),
        ("bytes=2-", 10, ByteRange(2, 9)),
        ("bytes=5-999", 10, ByteRange(5, 9)),
        ("bytes=-3", 10, ByteRange(7, 9)),
        ("bytes=-100", 10, ByteRange(0, 9)),
        ("BYTES = 1-1", 10, ByteRange(1, 1)),
        # Served whole (200), as RFC 9110 allows for anything not understood:
        ("bytes=5-2", 10, None),
        ("items=0-1", 10, None),
        ("bytes=0-1,4-5", 10, None),
        ("bytes=a-b", 10, None),
        ("bytes=-", 10, None),
        ("bytes 0-1", 10, None),
        ("bytes=١-٢", 10, None),  # noqa: RUF001  (non-ASCII digits)
    ],
)
def test_parse_range(header: str | None, size: int, expected: ByteRange | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"), [("bytes=10-", 10), ("bytes=10-20", 10), ("bytes=-0", 10), ("bytes=0-", 0)]
)
def test_parse_range_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable) as info:
        parse_range(header, size)
    assert info.value.content_range == f"bytes */{size}"


def test_content_range() -> None:
    assert ByteRange(2, 5).content_range(10) == "bytes 2-5/10"
    assert ByteRange(2, 5).length == 4


def test_if_range() -> None:
    mtime_ns = 1_700_000_000_123_456_789
    tag = etag(10, mtime_ns)
    assert if_range_allows(None, tag, mtime_ns)
    assert if_range_allows(tag, tag, mtime_ns)
    assert not if_range_allows('"other"', tag, mtime_ns)
    assert not if_range_allows("W/" + tag, tag, mtime_ns)
    assert if_range_allows(http_date(mtime_ns), tag, mtime_ns)
    assert not if_range_allows(http_date(mtime_ns - 5 * 10**9), tag, mtime_ns)
    assert not if_range_allows("not a date", tag, mtime_ns)


# --- errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (errno.ENOENT, "NOT_FOUND"),
        (errno.ENOTDIR, "NOT_FOUND"),
        (errno.EISDIR, "IS_DIRECTORY"),
        (errno.EACCES, "PERMISSION_DENIED"),
        (errno.EPERM, "PERMISSION_DENIED"),
        (errno.EROFS, "READ_ONLY_FILESYSTEM"),
        (errno.ENOSPC, "INSUFFICIENT_STORAGE"),
        (errno.EDQUOT, "INSUFFICIENT_STORAGE"),
        (errno.ENAMETOOLONG, "INVALID_PATH"),
        (errno.ELOOP, "INVALID_PATH"),
        (errno.EFBIG, "FILE_TOO_LARGE"),
        (errno.EBUSY, "FILE_BUSY"),
        (errno.EMFILE, "RESOURCE_EXHAUSTED"),
        (errno.EIO, "IO_ERROR"),
    ],
)
def test_from_os_error(err: int, code: str) -> None:
    error = from_os_error(OSError(err, os.strerror(err)), "/p")
    assert error.code == code
    assert "/p" in error.message


def test_every_code_has_a_status_the_sdk_does_not_retry() -> None:
    from sandboxd.api.files import STATUS_OF_CODE
    from sandboxd.files import errors

    defined = {v for k, v in vars(errors).items() if k.isupper() and isinstance(v, str)}
    assert defined == set(STATUS_OF_CODE)
    assert not {502, 503, 504} & set(STATUS_OF_CODE.values())


def test_error_messages_match_the_contract() -> None:
    assert from_os_error(FileNotFoundError(errno.ENOENT, "x"), "/p").message == (
        "File not found: /p"
    )
    assert from_os_error(IsADirectoryError(errno.EISDIR, "x"), "/p").message == (
        "Path is a directory, not a file: /p. Use /api/v1/files/list to list directory contents."
    )


# --- reading ---------------------------------------------------------------


def test_reader_reads_through_symlinks(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"abc")
    (tmp_path / "link").symlink_to("real")
    reader = FileReader(str(tmp_path / "link"))
    reader.open()
    try:
        assert (reader.size, reader.read(10)) == (3, b"abc")
    finally:
        reader.close()


def test_reader_refuses_directories_and_special_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    assert code_of(FileReader(str(tmp_path)).open) == "IS_DIRECTORY"
    # Would block forever if the FIFO were opened without a check.
    assert code_of(FileReader(str(tmp_path / "fifo")).open) == "NOT_A_REGULAR_FILE"
    assert code_of(FileReader(str(tmp_path / "missing")).open) == "NOT_FOUND"
    (tmp_path / "file").write_bytes(b"x")
    assert code_of(FileReader(str(tmp_path / "file") + "/").open) == "NOT_FOUND"


@pytest.mark.parametrize(
    "path", ["/proc/self/status", "/sys/kernel/mm/transparent_hugepage/enabled"]
)
def test_reader_flags_pseudo_files_as_unknown_size(path: str) -> None:
    if not os.path.exists(path):
        skip_with_reason(f"{path} does not exist here")
    reader = FileReader(path)
    reader.open()
    try:
        assert not reader.size_known
        assert reader.read(1 << 16)
    finally:
        reader.close()


def test_reader_trusts_the_size_of_ordinary_files(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    reader = FileReader(str(tmp_path / "f"))
    reader.open()
    reader.close()
    assert reader.size_known


# --- staging ---------------------------------------------------------------


def stage(path: Path, *chunks: bytes) -> StagedFile:
    staged = StagedFile(str(path))
    staged.open()
    staged.write(list(chunks))
    return staged


def test_staged_file_replaces_only_on_commit(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    staged = stage(target, b"new ", b"content")
    assert target.read_bytes() == b"old"
    assert len(temp_files(tmp_path)) == 1
    staged.commit()
    assert target.read_bytes() == b"new content"
    assert temp_files(tmp_path) == []


def test_discard_leaves_target_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    staged = stage(target, b"partial")
    staged.discard()
    staged.discard()  # idempotent
    assert target.read_bytes() == b"old"
    assert temp_files(tmp_path) == []


def test_temp_name_is_hidden_sibling(tmp_path: Path) -> None:
    staged = stage(tmp_path / "data.csv")
    try:
        (name,) = temp_files(tmp_path)
        assert name.startswith(".data.csv.sandboxd-") and name.endswith(".tmp")
    finally:
        staged.discard()


def test_long_names_fit_with_the_temp_suffix(tmp_path: Path) -> None:
    target = tmp_path / ("é" * 127)  # 254 bytes: the longest name most filesystems take
    stage(target, b"x").commit()
    assert target.read_bytes() == b"x"


def test_mode_and_owner_of_existing_file_are_kept(tmp_path: Path) -> None:
    target = tmp_path / "script.sh"
    target.write_bytes(b"old")
    os.chmod(target, 0o751)
    if os.geteuid() == 0:
        os.chown(target, 65534, 65534)
    stage(target, b"new").commit()
    st = target.stat()
    assert stat.S_IMODE(st.st_mode) == 0o751
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (65534, 65534)


def test_new_file_gets_0644_minus_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        stage(tmp_path / "a", b"").commit()
        os.umask(0o077)
        stage(tmp_path / "b", b"").commit()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o600


def test_missing_parents_are_created(tmp_path: Path) -> None:
    target = tmp_path / "x" / "y" / "z.txt"
    stage(target, b"deep").commit()
    assert target.read_bytes() == b"deep"


def test_symlink_target_is_replaced_and_link_kept(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    real = tmp_path / "sub" / "real"
    real.write_bytes(b"old")
    link = tmp_path / "link"
    link.symlink_to("sub/real")
    stage(link, b"new").commit()
    assert link.is_symlink() and os.readlink(link) == "sub/real"
    assert real.read_bytes() == b"new"
    assert temp_files(tmp_path) == [] and temp_files(tmp_path / "sub") == []


def test_dangling_symlink_creates_its_target(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to("made")
    stage(tmp_path / "link", b"x").commit()
    assert (tmp_path / "made").read_bytes() == b"x"


def test_refuses_what_rename_must_not_replace(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to("loop")
    assert code_of(StagedFile(str(tmp_path / "loop")).open) == "INVALID_PATH"
    assert code_of(FileReader(str(tmp_path / "loop")).open) == "INVALID_PATH"
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "file").write_bytes(b"x")
    assert code_of(StagedFile(str(tmp_path / "dir")).open) == "IS_DIRECTORY"
    assert code_of(StagedFile(str(tmp_path / "fifo")).open) == "NOT_A_REGULAR_FILE"
    assert code_of(StagedFile(str(tmp_path / "new") + "/").open) == "INVALID_PATH"
    assert code_of(StagedFile(str(tmp_path / "file" / "child")).open) == "NOT_A_DIRECTORY"
    assert code_of(StagedFile(str(tmp_path / "file" / "a" / "b")).open) == "NOT_A_DIRECTORY"
    assert temp_files(tmp_path) == []


def test_large_writes_are_resumed_across_iov_max(tmp_path: Path) -> None:
    chunks = [bytes([i % 256]) * 100 for i in range(3000)]  # more buffers than IOV_MAX
    stage(tmp_path / "f", *chunks).commit()
    assert (tmp_path / "f").read_bytes() == b"".join(chunks)


@pytest.fixture
def bind_mounted_file(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    source, target = tmp_path / "source", tmp_path / "target"
    source.write_bytes(b"source content, long")
    target.write_bytes(b"")
    done = subprocess.run(
        ["mount", "--bind", str(source), str(target)], capture_output=True, text=True
    )
    if done.returncode != 0:
        skip_with_reason(f"cannot bind-mount a file: {done.stderr.strip()}")
    yield source, target
    subprocess.run(["umount", str(target)], check=True)


def test_mount_point_target_is_rewritten_in_place(bind_mounted_file: tuple[Path, Path]) -> None:
    # Like Docker's /etc/hosts: rename(2) over a mount point fails with EBUSY.
    source, target = bind_mounted_file
    stage(target, b"new").commit()
    assert target.read_bytes() == b"new"
    assert source.read_bytes() == b"new"
    assert temp_files(target.parent) == []


# --- uploads ---------------------------------------------------------------


async def chunks_of(*parts: bytes, fail: BaseException | None = None) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(0)
        yield part
    if fail is not None:
        raise fail


def test_receive_batches_and_commits(tmp_path: Path) -> None:
    target = tmp_path / "f"
    parts = [os.urandom(1000) for _ in range(50)]
    n = asyncio.run(receive(str(target), chunks_of(*parts), batch_bytes=4096))
    assert n == 50_000
    assert target.read_bytes() == b"".join(parts)


def test_receive_empty_body_makes_empty_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    asyncio.run(receive(str(target), chunks_of(), expected_length=None))
    assert target.read_bytes() == b""


def test_receive_short_body_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(FilesError) as info:
        asyncio.run(receive(str(target), chunks_of(b"abc"), expected_length=10))
    assert info.value.code == "INCOMPLETE_BODY"
    assert target.read_bytes() == b"old"
    assert temp_files(tmp_path) == []


def test_receive_stream_error_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    body = chunks_of(b"x" * 5000, fail=ConnectionResetError("gone"))
    with pytest.raises(ConnectionResetError):
        asyncio.run(receive(str(target), body, batch_bytes=1000))
    assert target.read_bytes() == b"old"
    assert temp_files(tmp_path) == []


def test_cancelled_receive_cleans_up_after_the_running_write(tmp_path: Path) -> None:
    """The temp file goes only once the write in the worker thread has returned."""
    target = tmp_path / "f"
    target.write_bytes(b"old")
    release = threading.Event()
    writing = threading.Event()
    real_write = StagedFile.write

    def slow_write(self: StagedFile, chunks: list[bytes]) -> None:
        writing.set()
        release.wait(5)
        real_write(self, chunks)

    async def scenario() -> None:
        async def endless() -> AsyncIterator[bytes]:
            while True:
                await asyncio.sleep(0)
                yield b"y" * 1000

        task = asyncio.create_task(receive(str(target), endless(), batch_bytes=1000))
        while not writing.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(temp_files(tmp_path)) == 1, "must not be removed under a running write"
        release.set()
        for _ in range(500):
            if not temp_files(tmp_path):
                break
            await asyncio.sleep(0.01)

    StagedFile.write = slow_write  # type: ignore[method-assign]
    try:
        asyncio.run(scenario())
    finally:
        StagedFile.write = real_write  # type: ignore[method-assign]
    assert temp_files(tmp_path) == []
    assert target.read_bytes() == b"old"


# --- listing and deleting --------------------------------------------------


def test_list_dir_order_shape_and_symlinks(tmp_path: Path) -> None:
    (tmp_path / "b_dir").mkdir()
    (tmp_path / "A_dir").mkdir()
    (tmp_path / "a.txt").write_bytes(b"12345")
    (tmp_path / "B.txt").write_bytes(b"")
    (tmp_path / "link_to_dir").symlink_to("b_dir")
    (tmp_path / "link_to_file").symlink_to("a.txt")
    (tmp_path / "dangling").symlink_to("nowhere")
    entries = {e.name: e for e in list_dir(str(tmp_path))}
    names = [e.name for e in list_dir(str(tmp_path))]
    assert names == ["A_dir", "b_dir", "link_to_dir", "B.txt", "a.txt", "dangling", "link_to_file"]
    assert entries["A_dir"].is_dir and entries["A_dir"].size is None
    assert entries["link_to_dir"].is_dir and entries["link_to_dir"].size is None
    assert (entries["a.txt"].is_dir, entries["a.txt"].size) == (False, 5)
    assert entries["link_to_file"].size == 5
    assert (entries["dangling"].is_dir, entries["dangling"].size) == (False, None)
    assert entries["dangling"].modified_at is not None
    mtime_ms = (tmp_path / "a.txt").stat().st_mtime_ns // 1_000_000
    assert entries["a.txt"].modified_at == mtime_ms


def test_list_dir_shows_undecodable_names_with_replacement(tmp_path: Path) -> None:
    os.close(os.open(os.fsencode(tmp_path) + b"/bad\xffname", os.O_CREAT | os.O_WRONLY))
    (entry,) = [e.to_json() for e in list_dir(str(tmp_path))]
    assert entry["name"] == "bad\ufffdname"


def test_list_dir_errors(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    assert code_of(list_dir, str(tmp_path / "f")) == "NOT_A_DIRECTORY"
    assert code_of(list_dir, str(tmp_path / "missing")) == "NOT_FOUND"


def test_delete_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to("d")
    delete_file(str(tmp_path / "f"))
    assert not (tmp_path / "f").exists()
    delete_file(str(tmp_path / "link"))  # the link, not the directory it points at
    assert (tmp_path / "d").is_dir() and not (tmp_path / "link").exists()
    assert code_of(delete_file, str(tmp_path / "d")) == "IS_DIRECTORY"
    assert code_of(delete_file, str(tmp_path / "f")) == "NOT_FOUND"
