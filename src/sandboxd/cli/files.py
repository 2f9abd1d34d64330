"""File subcommands: ``cp`` (both directions) and ``ls``.

A path on the sandbox side starts with ``:`` (``:/etc/hostname``,
``:notes.txt`` relative to the daemon's working directory); any other path is
local, and ``-`` is stdin or stdout. Files are streamed both ways: nothing is
held in memory whole, and a download is written to a temporary file renamed
into place at the end, so an interrupted copy never leaves half a file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import posixpath
import sys
import tempfile
from collections.abc import AsyncIterator
from typing import Any, BinaryIO

from .client import ApiError, Client
from .common import (
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    add_json_flag,
    age_ms,
    human_bytes,
    print_json,
    print_table,
)
from .progress import Progress

CHUNK = 1 << 20
FILES = "/api/v1/files"
REMOTE_PREFIX = ":"


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "cp",
        parents=[parent],
        help="copy a file to or from the sandbox (:PATH is the sandbox side)",
        description="Copy one file between here and the sandbox. Prefix the sandbox path with ':'. "
        "Examples: `sandboxd cp ./app.tar.gz :/tmp/` uploads, `sandboxd cp :/etc/hostname .` "
        "downloads, `-` is stdin or stdout.",
    )
    p.add_argument("source", metavar="SRC")
    p.add_argument("dest", metavar="DEST")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--progress",
        dest="progress",
        action="store_const",
        const="on",
        help="always show a progress bar (default: on a terminal, for files of 1 MiB or more)",
    )
    g.add_argument(
        "--no-progress", dest="progress", action="store_const", const="off", help="never show it"
    )
    p.set_defaults(handler=cp, progress=None)

    p = sub.add_parser(
        "ls",
        parents=[parent],
        help="list a directory in the sandbox",
        description="List a directory in the sandbox (default: the daemon's working directory).",
    )
    p.add_argument("path", nargs="?", default=".", metavar="PATH")
    add_json_flag(p)
    p.set_defaults(handler=ls)


def remote(path: str) -> str | None:
    """The sandbox path of a ``:PATH`` argument, None for a local one."""
    return path[len(REMOTE_PREFIX) :] or "." if path.startswith(REMOTE_PREFIX) else None


async def cp(ns: argparse.Namespace, client: Client) -> int:
    src_remote, dst_remote = remote(ns.source), remote(ns.dest)
    if (src_remote is None) == (dst_remote is None):
        raise CliError(
            "exactly one of SRC and DEST must be a sandbox path, written with a leading ':' "
            "(e.g. `cp ./file :/tmp/file` or `cp :/tmp/file ./file`)",
            EXIT_USAGE,
        )
    if dst_remote is not None:
        await upload(client, ns.source, dst_remote, ns.progress)
    else:
        assert src_remote is not None
        await download(client, src_remote, ns.dest, ns.progress)
    return EXIT_OK


# --- upload ---


async def _is_remote_dir(client: Client, path: str) -> bool:
    try:
        await client.call("GET", f"{FILES}/list", params={"path": path})
    except ApiError:
        return False  # missing, or a file: either way the path names the file to write
    return True


async def upload(client: Client, src: str, dest: str, progress_mode: str | None) -> None:
    if src != "-":
        if os.path.isdir(src):
            raise CliError(f"{src} is a directory; cp copies one file", EXIT_USAGE)
        if not os.path.exists(src):
            raise CliError(f"{src}: no such file", EXIT_USAGE)
        if dest.endswith("/") or await _is_remote_dir(client, dest):
            dest = posixpath.join(dest, os.path.basename(src))
    elif dest.endswith("/"):
        raise CliError(
            "copying stdin needs a file name on the sandbox side, not a directory", EXIT_USAGE
        )
    f: BinaryIO = sys.stdin.buffer if src == "-" else open(src, "rb")  # noqa: SIM115
    try:
        size = None if src == "-" else os.fstat(f.fileno()).st_size
        bar = Progress(f"{src} -> :{dest}", size, enabled=Progress.wanted(progress_mode, size))
        # An exact Content-Length when the size is known (the contract's upload
        # shape); chunked transfer for a pipe.
        headers = {"Content-Length": str(size)} if size is not None else None
        async with client.request(
            "PUT",
            FILES,
            params={"path": dest},
            data=_chunks(f, bar),
            headers=headers,
            stream=True,
        ):
            pass
        bar.close()
    finally:
        if f is not sys.stdin.buffer:
            f.close()


async def _chunks(f: BinaryIO, bar: Progress) -> AsyncIterator[bytes]:
    while data := f.read(CHUNK):
        bar.update(len(data))
        yield data


# --- download ---


async def download(client: Client, src: str, dest: str, progress_mode: str | None) -> None:
    if dest != "-" and os.path.isdir(dest):
        dest = os.path.join(dest, posixpath.basename(src.rstrip("/")) or "download")
    async with client.request("GET", FILES, params={"path": src}, stream=True) as resp:
        size = resp.content_length
        bar = Progress(f":{src} -> {dest}", size, enabled=Progress.wanted(progress_mode, size))
        if dest == "-":
            out = sys.stdout.buffer
            async for chunk in resp.content.iter_chunked(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
            out.flush()
        else:
            await _save(resp.content.iter_chunked(CHUNK), dest, bar)
        bar.close()


async def _save(chunks: AsyncIterator[bytes], dest: str, bar: Progress) -> None:
    directory = os.path.dirname(os.path.abspath(dest))
    fd, tmp = tempfile.mkstemp(prefix=".sandboxd-cp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in chunks:
                out.write(chunk)
                bar.update(len(chunk))
        # mkstemp makes 0600; give the file the mode a plain create would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- ls ---


async def ls(ns: argparse.Namespace, client: Client) -> int:
    body: dict[str, Any] = await client.call("GET", f"{FILES}/list", params={"path": ns.path})
    entries = body.get("entries", [])
    if ns.json:
        print_json(body)
        return EXIT_OK
    rows = []
    for e in entries:
        is_dir = bool(e.get("is_dir"))
        size = e.get("size")
        rows.append(
            (
                "dir" if is_dir else "file",
                "-" if size is None else human_bytes(size),
                age_ms(e.get("modified_at")),
                str(e.get("name", "")) + ("/" if is_dir else ""),
            )
        )
    print_table(("TYPE", "SIZE", "MODIFIED", "NAME"), rows)
    return EXIT_OK
