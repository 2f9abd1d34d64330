"""File subcommands: ``cp`` (both directions) and ``ls``.

A path on the sandbox side starts with ``:`` (``:/etc/hostname``,
``:notes.txt`` relative to the daemon's working directory); any other path is
local, and ``-`` is stdin or stdout. Files are streamed both ways: nothing is
held in memory whole, and a download is written to a temporary file renamed
into place at the end, so an interrupted copy never leaves half a file.
Directories (``cp -r``) travel as one tar stream: see :mod:`.tree`.
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
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
from .tree import download_tree, is_remote_dir, upload_tree

CHUNK = 1 << 20
FILES = "/api/v1/files"
REMOTE_PREFIX = ":"


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "cp",
        parents=[parent],
        help="copy files to or from the sandbox (:PATH is the sandbox side)",
        description="Copy a file, or with -r a directory, between here and the sandbox. "
        "Prefix the sandbox path with ':'. "
        "Examples: `sandboxd cp ./app.tar.gz :/tmp/` uploads, `sandboxd cp :/etc/hostname .` "
        "downloads, `sandboxd cp -r ./src :/work` copies a tree, `-` is stdin or stdout.",
    )
    p.add_argument("source", metavar="SRC")
    p.add_argument("dest", metavar="DEST")
    p.add_argument(
        "-r",
        "--recursive",
        action="store_true",
        help="copy directories (as one tar stream; symlinks are copied as links)",
    )
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
        help="list a directory in the sandbox, or show a file",
        description="List a directory in the sandbox (default: the daemon's working directory); "
        "for a file, show that file's line.",
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
        if ns.recursive and ns.source != "-" and os.path.isdir(ns.source):
            await upload_tree(client, ns.source, dst_remote, ns.progress)
        else:
            await upload(client, ns.source, dst_remote, ns.progress)
    else:
        assert src_remote is not None
        if ns.recursive and ns.dest != "-" and await is_remote_dir(client, src_remote):
            await download_tree(client, src_remote, ns.dest, ns.progress)
        else:
            await download(client, src_remote, ns.dest, ns.progress)
    return EXIT_OK


# --- upload ---


async def upload(client: Client, src: str, dest: str, progress_mode: str | None) -> None:
    if src != "-":
        if os.path.isdir(src):
            raise CliError(f"{src} is a directory; copy it with cp -r", EXIT_USAGE)
        if not os.path.exists(src):
            raise CliError(f"{src}: no such file", EXIT_USAGE)
        if dest.endswith("/") or await is_remote_dir(client, dest):
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
    try:
        body: dict[str, Any] = await client.call("GET", f"{FILES}/list", params={"path": ns.path})
    except ApiError as exc:
        if exc.code != "NOT_A_DIRECTORY":
            raise
        body = await _file_entry(client, ns.path)
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


async def _file_entry(client: Client, path: str) -> dict[str, Any]:
    """``ls FILE``: the file's own line, in the shape of a listing of one entry."""
    async with client.request("HEAD", FILES, params={"path": path}) as resp:
        size = resp.content_length
        modified = resp.headers.get("Last-Modified")
    modified_ms = None
    if modified:
        with contextlib.suppress(TypeError, ValueError):
            modified_ms = int(email.utils.parsedate_to_datetime(modified).timestamp() * 1000)
    entry = {"name": path, "is_dir": False, "size": size, "modified_at": modified_ms}
    return {"path": path, "entries": [entry]}
