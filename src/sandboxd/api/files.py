"""``/api/v1/files``: a thin translation between the wire and :mod:`sandboxd.files`.

Bodies are raw bytes both ways and are streamed: a read goes out with
sendfile(2), an upload is written to disk batch by batch. Every filesystem
call runs in a worker pool owned by this module, so a slow disk delays file
requests but never the event loop (or the metadata GETs the SDK times out).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import Field

from .. import files
from ..engine import Identity, is_self
from ..files import errors as codes
from ..files import ranges
from ..files.identity import assume as assume_identity
from . import models, processes
from .error_map import FILES_STATUS, engine_errors
from .errors import ApiError, error_response

log = logging.getLogger("sandboxd.files")

routes = web.RouteTableDef()

BASE_DIR = web.AppKey("files_base_dir", str)
FILE_IO = web.AppKey("files_io", ThreadPoolExecutor)
IO_THREADS = 16
# Read size for files whose length is unknown (procfs): they are small, or unbounded.
STREAM_CHUNK = 256 << 10

# Status of each files code: kept with every other engine answer in error_map.py.
STATUS_OF_CODE = FILES_STATUS


async def lifespan(app: web.Application) -> AsyncIterator[None]:
    # Relative paths resolve against the directory the daemon was started in.
    app[BASE_DIR] = os.getcwd()
    pool = _file_pool(app[processes.TABLE].default_identity)
    app[FILE_IO] = pool
    yield
    pool.shutdown(wait=False, cancel_futures=True)


def _file_pool(identity: Identity | None) -> ThreadPoolExecutor:
    """The threads that touch files; with ``--default-user`` they act as that user."""
    if identity is None or is_self(identity):
        return ThreadPoolExecutor(IO_THREADS, thread_name_prefix="sandboxd-files")
    # Fail at start-up, not on the first request, if the identity cannot be taken.
    with ThreadPoolExecutor(1) as probe:
        probe.submit(assume_identity, identity).result()
    return ThreadPoolExecutor(
        IO_THREADS,
        thread_name_prefix="sandboxd-files",
        initializer=assume_identity,
        initargs=(identity,),
    )


_api_errors = engine_errors


class PathQuery(models.Strict):
    """The query of every ``/api/v1/files`` route."""

    path: Annotated[
        models.Text,
        Field(
            min_length=1,
            description="Absolute, or relative to the daemon's working directory. "
            "A `..` component is refused (403 PATH_TRAVERSAL); symlinks are followed.",
        ),
    ]


def _path(request: web.Request) -> str:
    # The first value of a repeated key, as request.query.get() gives.
    query = {key: request.query.getone(key) for key in request.query}
    raw = models.parse(PathQuery, query, {"path": codes.INVALID_PATH}).path
    base = request.app.get(BASE_DIR) or os.getcwd()
    with _api_errors():
        return files.resolve(raw, base)


def _worker(request: web.Request) -> files.Serial:
    return files.Serial(request.app.get(FILE_IO))


@routes.get("/api/v1/files")  # also answers HEAD
async def read_file(request: web.Request) -> web.StreamResponse:
    reader = files.FileReader(_path(request))
    worker = _worker(request)
    try:
        with _api_errors():
            await worker.run(reader.open)
        if not reader.size_known:
            return await _send_until_eof(request, reader, worker)
        return await _send(request, reader)
    finally:
        worker.then(reader.close)


def _validators(reader: files.FileReader) -> dict[str, str]:
    return {
        "Content-Type": "application/octet-stream",
        "ETag": ranges.etag(reader.size, reader.mtime_ns),
        "Last-Modified": ranges.http_date(reader.mtime_ns),
    }


async def _send(request: web.Request, reader: files.FileReader) -> web.StreamResponse:
    headers = {**_validators(reader), "Accept-Ranges": "bytes"}
    wanted = None
    if ranges.if_range_allows(request.headers.get("If-Range"), headers["ETag"], reader.mtime_ns):
        try:
            wanted = ranges.parse_range(request.headers.get("Range"), reader.size)
        except ranges.RangeNotSatisfiable as exc:
            resp = error_response(416, "RANGE_NOT_SATISFIABLE", f"{exc}: {reader.path}")
            resp.headers["Content-Range"] = exc.content_range
            return resp
    if wanted is None:
        resp = web.StreamResponse(status=200, headers=headers)
        offset, count = 0, reader.size
    else:
        resp = web.StreamResponse(status=206, headers=headers)
        resp.headers["Content-Range"] = wanted.content_range(reader.size)
        offset, count = wanted.start, wanted.length
    resp.content_length = count
    await resp.prepare(request)
    if request.method != "HEAD" and await _sendfile(request, reader, offset, count):
        await resp.write_eof()
    return resp


async def _sendfile(
    request: web.Request, reader: files.FileReader, offset: int, count: int
) -> bool:
    """Send ``count`` bytes from ``offset``; False if the body was cut short."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return False  # the client went away; nothing to report to it
    try:
        sent = await asyncio.get_running_loop().sendfile(transport, reader.file, offset, count)
    except ConnectionError:
        return False
    except OSError as exc:
        return _cut(request, f"reading {reader.path} failed mid-stream: {exc}")
    if sent < count:
        return _cut(request, f"{reader.path} shrank while being sent ({sent} of {count} bytes)")
    return True


def _cut(request: web.Request, why: str) -> bool:
    """Close the connection: with the headers sent, no error status is possible.

    The client then sees a short body rather than a complete-looking one.
    Returning (rather than raising) keeps aiohttp from logging a traceback.
    """
    log.warning("%s", why)
    if request.transport is not None:
        request.transport.close()
    return False


async def _send_until_eof(
    request: web.Request, reader: files.FileReader, worker: files.Serial
) -> web.StreamResponse:
    """A file whose size cannot be trusted: stream whatever reading it gives, chunked.

    Range is ignored for these.
    """
    resp = web.StreamResponse(status=200, headers=_validators(reader))
    if request.method == "HEAD":
        resp.content_length = 0
        await resp.prepare(request)
        return resp
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    try:
        while chunk := await worker.run(reader.read, STREAM_CHUNK):
            await resp.write(chunk)
    except files.FilesError as exc:
        _cut(request, f"reading {reader.path} failed mid-stream: {exc.message}")
        return resp
    except ConnectionError:
        return resp
    await resp.write_eof()
    return resp


@routes.put("/api/v1/files")
async def write_file(request: web.Request) -> web.Response:
    path = _path(request)
    # request.content is the raw stream: client_max_size (for JSON bodies) does
    # not apply, so uploads have no size cap. A PUT without Content-Length or
    # Transfer-Encoding (the SDK's write_file(path, b"")) has an empty body.
    try:
        with _api_errors():
            await files.receive(
                path,
                request.content.iter_any(),
                expected_length=request.content_length,
                executor=request.app.get(FILE_IO),
            )
    except HttpProcessingError as exc:
        raise ApiError(
            400, codes.INCOMPLETE_BODY, f"the request body could not be read ({exc.message})"
        ) from None
    return web.Response(status=204)


@routes.delete("/api/v1/files")
async def delete_file(request: web.Request) -> web.Response:
    path = _path(request)
    with _api_errors():
        await _worker(request).run(files.delete_file, path)
    return web.Response(status=204)


@routes.get("/api/v1/files/list")
async def list_directory(request: web.Request) -> web.Response:
    path = _path(request)
    with _api_errors():
        entries = await _worker(request).run(files.list_dir, path)
    # "path" echoes the request, as the original daemon did.
    return web.json_response(
        {"path": request.query["path"], "entries": [e.to_json() for e in entries]}
    )
