"""``sandboxd cp -r``: a directory tree copied as one tar stream, both ways.

Upload: a ``tar -x`` process is started in the sandbox with its stdin as a
pipe, and one ``POST …/stdin`` carries the whole archive, written here by
:mod:`tarfile` as it walks the tree (a thread writing into a pipe that the
event loop reads). Nothing is held whole in memory, and the tree travels in
one request, not one per file.

Download: the daemon has no endpoint that streams a process's stdout as raw
bytes (``…/stdout/raw`` answers what was retained, bounded by the daemon's
``--output-cap``; ``…/follow`` sends text lines). So ``tar -c`` writes the
archive into a temporary file in the sandbox, which is streamed with one
``GET /api/v1/files`` (sendfile on the daemon's side) into :mod:`tarfile`
extracting here, then deleted. The sandbox needs room for the archive once.

What comes out of a sandbox is not trusted: extraction uses tarfile's
``data`` filter (no absolute paths, no ``..``, nothing written through a
link to outside the destination, no device files), except that a symlink may
point anywhere, as ``cp -r`` would copy it: it is only a link, and nothing
is ever written through one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import secrets
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from .client import ApiError, Client, sse_events
from .common import EXIT_ERROR, EXIT_USAGE, CliError, read_chunks
from .progress import Progress

if TYPE_CHECKING:  # imported where used: `sandboxd serve` loads this module too
    import tarfile

CHUNK = 1 << 20
FILES = "/api/v1/files"
PROCESSES = "/api/v1/processes"
TAR_BLOCK = 512
# Lines of the remote tar's output kept for an error message.
KEEP_LINES = 20


async def is_remote_dir(client: Client, path: str) -> bool:
    try:
        await client.call("GET", f"{FILES}/list", params={"path": path})
    except ApiError:
        return False
    return True


def _tar_size(root: str) -> int:
    """About how long the tar of ``root`` is: for the progress bar's total."""
    total = 2 * TAR_BLOCK
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            total += TAR_BLOCK
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                if os.path.isfile(path) and not os.path.islink(path):
                    total += -(-os.path.getsize(path) // TAR_BLOCK) * TAR_BLOCK
    return total


# --- upload ---


async def upload_tree(client: Client, src: str, dest: str, progress_mode: str | None) -> str:
    """Copy local directory ``src`` to the sandbox; the sandbox path it landed at."""
    if dest.endswith("/") or await is_remote_dir(client, dest):
        dest = posixpath.join(dest, os.path.basename(os.path.normpath(src)))
    script = 'mkdir -p -- "$1" && exec tar -x --no-same-owner -f - -C "$1"'
    proc = await client.call(
        "POST",
        PROCESSES,
        json_body={"command": "sh", "args": ["-c", script, "sh", dest], "stdin_mode": "pipe"},
    )
    pid = int(proc["pid"])
    # The walk for the bar's total is only paid when a bar may be drawn.
    total = _tar_size(src) if Progress.wanted(progress_mode, None) else None
    bar = Progress(f"{src}/ -> :{dest}/", total, enabled=Progress.wanted(progress_mode, total))
    try:
        await _feed(client, pid, src, dest, bar)
    except asyncio.CancelledError:
        # Ctrl-C: the remote tar would wait for the rest of its stdin forever.
        with contextlib.suppress(CliError):
            await client.call("DELETE", f"{PROCESSES}/{pid}")
        raise
    return dest


async def _feed(client: Client, pid: int, src: str, dest: str, bar: Progress) -> None:
    """Stream the tar of ``src`` into process ``pid``'s stdin; raise unless it extracted it."""
    loop = asyncio.get_running_loop()
    rfd, wfd = os.pipe()
    writer = loop.run_in_executor(None, _write_tar, src, wfd)
    sent: CliError | None = None
    try:
        async with client.request(
            "POST",
            f"{PROCESSES}/{pid}/stdin",
            data=_pipe_chunks(rfd, bar),
            stream=True,
        ):
            pass
    except CliError as exc:
        sent = exc  # e.g. tar exited early: its own message says more, below
    finally:
        os.close(rfd)
        tar_error = await _join(writer)
    with contextlib.suppress(CliError):
        async with client.request("POST", f"{PROCESSES}/{pid}/stdin/close"):
            pass
    code, lines = await _wait_exit(client, pid)
    bar.close()
    if tar_error is not None:
        raise CliError(f"reading {src} failed: {tar_error}", EXIT_ERROR)
    if code != 0:
        raise CliError(
            f"extracting into :{dest} failed (tar exited {code}): " + "; ".join(lines[-5:]),
            EXIT_ERROR,
        )
    if sent is not None:
        raise sent


def _write_tar(src: str, wfd: int) -> None:
    """In a thread: the tar of ``src``'s contents into the pipe (closed at the end)."""
    import tarfile

    # A broken pipe (also when the last buffer is flushed at close) means the
    # upload stopped: its error, or the remote tar's, is the one to report.
    with (
        contextlib.suppress(BrokenPipeError),
        os.fdopen(wfd, "wb", buffering=CHUNK) as out,
        tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        tar.add(src, arcname=".", recursive=True)


async def _join(task: asyncio.Future[None]) -> BaseException | None:
    try:
        await task
    except Exception as exc:
        return exc
    return None


async def _pipe_chunks(rfd: int, bar: Progress) -> AsyncIterator[bytes]:
    async for data in read_chunks(rfd, CHUNK):
        bar.update(len(data))
        yield data


async def _wait_exit(client: Client, pid: int) -> tuple[int | None, list[str]]:
    """The process's exit code once it ended and its output drained, and its last lines."""
    lines: list[str] = []
    async with client.request("GET", f"{PROCESSES}/{pid}/output/follow", stream=True) as resp:
        async for event in sse_events(resp):
            if "line" in event.data:
                lines = [*lines[-KEEP_LINES:], str(event.data["line"])]
    info: dict[str, Any] = await client.call("GET", f"{PROCESSES}/{pid}")
    code = info.get("exit_code")
    return (int(code) if code is not None else None), lines


# --- download ---


async def download_tree(client: Client, src: str, dest: str, progress_mode: str | None) -> str:
    """Copy sandbox directory ``src`` here; the local path it landed at."""
    if os.path.isdir(dest):
        dest = os.path.join(dest, posixpath.basename(posixpath.normpath(src)) or "download")
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise CliError(f"{dest} exists and is not a directory", EXIT_USAGE)
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise CliError(f"{parent}: no such directory", EXIT_USAGE)
    archive = f"/tmp/.sandboxd-cp-{secrets.token_hex(8)}.tar"
    try:
        code, lines = await _run(
            client, ["sh", "-c", 'umask 077; exec tar -c -f "$1" -C "$2" .', "sh", archive, src]
        )
        # GNU tar exits 1 when a file changed while it was read: the copy is still usable.
        if code not in (0, 1):
            raise CliError(
                f"archiving :{src} failed (tar exited {code}): " + "; ".join(lines[-5:]),
                EXIT_ERROR,
            )
        os.makedirs(dest, exist_ok=True)
        async with client.request("GET", FILES, params={"path": archive}, stream=True) as resp:
            size = resp.content_length
            bar = Progress(
                f":{src}/ -> {dest}/", size, enabled=Progress.wanted(progress_mode, size)
            )
            await _extract(resp.content.iter_chunked(CHUNK), dest, bar)
            bar.close()
    finally:
        with contextlib.suppress(CliError):
            await client.call("DELETE", FILES, params={"path": archive})
    return dest


async def _run(client: Client, argv: list[str]) -> tuple[int | None, list[str]]:
    """Run ``argv`` in the sandbox to its end: (exit code, output lines)."""
    lines: list[str] = []
    code: int | None = None
    body = {"command": argv[0], "args": argv[1:]}
    async with client.request("POST", f"{PROCESSES}/run", json_body=body, stream=True) as resp:
        async for event in sse_events(resp):
            data = event.data
            if "line" in data:
                lines = [*lines[-KEEP_LINES:], str(data["line"])]
            elif "exit_code" in data and "reason" in data:
                code = data["exit_code"]
    return code, lines


async def _extract(chunks: AsyncIterator[bytes], dest: str, bar: Progress) -> None:
    loop = asyncio.get_running_loop()
    rfd, wfd = os.pipe()
    reader = loop.run_in_executor(None, _read_tar, rfd, dest)
    try:
        async for chunk in chunks:
            bar.update(len(chunk))
            try:
                await loop.run_in_executor(None, _write_all, wfd, chunk)
            except BrokenPipeError:
                break  # the extraction stopped: its error is below
    finally:
        os.close(wfd)
        error = await _join(reader)
    if error is not None:
        raise CliError(f"extracting into {dest} failed: {error}", EXIT_ERROR)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_tar(rfd: int, dest: str) -> None:
    import tarfile

    with os.fdopen(rfd, "rb", buffering=CHUNK) as src, tarfile.open(fileobj=src, mode="r|") as tar:
        tar.extractall(dest, filter=_member_filter)


def _member_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    import tarfile

    try:
        return tarfile.data_filter(member, dest)
    except tarfile.FilterError:
        # A symlink may point anywhere (the data filter refuses absolute and
        # outward ones, and one whose own path is already a link, as when a
        # tree is copied again): it is only a link, and the data filter still
        # refuses any later member whose path would resolve through it to
        # outside ``dest``. The link itself must land inside ``dest``.
        if not member.issym() or not _inside(dest, os.path.dirname(member.name)):
            raise
        return member.replace(uid=None, gid=None, uname=None, gname=None, deep=False)  # type: ignore[arg-type]


def _inside(dest: str, rel: str) -> bool:
    root = os.path.realpath(dest)
    return os.path.commonpath([root, os.path.realpath(os.path.join(root, rel))]) == root
