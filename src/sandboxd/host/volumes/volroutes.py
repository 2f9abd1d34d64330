"""Routes of volumes (:mod:`.volumes`); ``{P}`` = ``/v1/namespaces/{ns}``.

* ``POST {P}/sandboxes/{id}/file_systems`` ``{"file_system_id", "mount_path",
  "read_only"?}`` (the SDK's ``attach_file_system``) and ``DELETE`` with
  ``{"mount_path"}`` (``detach_file_system``): done before the answer, which is
  the sandbox's SandboxInfo with its ``file_systems``.
* ``GET``/``POST {P}/volumes``, ``GET``/``DELETE {P}/volumes/{name}``: the
  host's own volume API (``sandboxd host volumes``).
* ``/artifact-storage/*``, where the SDK's ``create_file_system`` and friends
  go first: 501 ``ARTIFACT_STORAGE_UNSUPPORTED``, saying how to make a volume.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from ..model import ApiError, check_namespace, info
from ..routing import MANAGER, PREFIX, body_of, find, sandbox_url
from . import volspec
from .volume_store import ARTIFACT_STORAGE

VOLUMES = "/v1/namespaces/{ns}/volumes"


async def attach(request: web.Request) -> web.StreamResponse:
    m, rec = find(request)
    mount = volspec.parse_mount(await body_of(request))
    cur = await m.volumes.attach(rec, mount)
    return web.json_response(info(cur, sandbox_url(request)))


async def detach(request: web.Request) -> web.StreamResponse:
    m, rec = find(request)
    body = await body_of(request)
    if not isinstance(body, dict) or set(body) - {"mount_path"}:
        raise ApiError(400, "INVALID_BODY", 'the body must be {"mount_path": "/abs/path"}')
    path = volspec.check_mount_path(body.get("mount_path"))
    cur = await m.volumes.detach(rec, path)
    return web.json_response(info(cur, sandbox_url(request)))


async def list_volumes(request: web.Request) -> web.StreamResponse:
    m = request.app[MANAGER]
    ns = check_namespace(request.match_info["ns"])
    return web.json_response({"volumes": m.volumes.list(ns)})


async def create_volume(request: web.Request) -> web.StreamResponse:
    m = request.app[MANAGER]
    ns = check_namespace(request.match_info["ns"])
    body = await body_of(request)
    if not isinstance(body, dict) or set(body) - {"name"}:
        raise ApiError(400, "INVALID_BODY", 'the body must be {"name": "NAME"}')
    name = volspec.check_volume_name(body.get("name"))
    return web.json_response(await m.volumes.create(ns, name), status=201)


async def get_volume(request: web.Request) -> web.StreamResponse:
    m = request.app[MANAGER]
    ns = check_namespace(request.match_info["ns"])
    name = volspec.check_volume_name(request.match_info["name"])
    return web.json_response(m.volumes.get(ns, name))


async def delete_volume(request: web.Request) -> web.StreamResponse:
    m = request.app[MANAGER]
    ns = check_namespace(request.match_info["ns"])
    name = volspec.check_volume_name(request.match_info["name"])
    await m.volumes.delete(ns, name)
    return web.Response(status=200)


async def artifact_storage(request: web.Request) -> web.StreamResponse:
    raise ApiError(501, "ARTIFACT_STORAGE_UNSUPPORTED", ARTIFACT_STORAGE)


def claim_mounts(m: Any, ns: str, body: Any) -> list[dict[str, Any]]:
    """A pool claim's ``file_systems``, taken out of its body and checked (400s)."""
    if not isinstance(body, dict) or "file_systems" not in body:
        return []
    mounts = volspec.parse_mounts(body.pop("file_systems"))
    m.volumes.check_create(ns, mounts)
    return mounts


def claim_applied(resp: web.StreamResponse) -> web.StreamResponse:
    """With mounts the SDK wants ``claim_configuration_applied: true`` (else it deletes
    the sandbox): true once the sandbox runs with them mounted."""
    if not isinstance(resp, web.Response) or not isinstance(resp.body, bytes):
        return resp
    body = json.loads(resp.body)
    body["claim_configuration_applied"] = body.get("status") == "running"
    return web.json_response(body, status=resp.status)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post(PREFIX + "/{id}/file_systems", attach)
    r.add_delete(PREFIX + "/{id}/file_systems", detach)
    r.add_get(VOLUMES, list_volumes)
    r.add_post(VOLUMES, create_volume)
    r.add_get(VOLUMES + "/{name}", get_volume)
    r.add_delete(VOLUMES + "/{name}", delete_volume)
    r.add_route("*", "/artifact-storage/{tail:.*}", artifact_storage)
