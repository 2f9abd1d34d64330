"""What a front does with a request's key before it reads etcd or forwards anything.

The host's ``routing.namespace_scope`` rules, for the fleet's front (a
gateway has no routes with a ``{ns}`` in them, and a node's front reads the
path, not the route):

* a flat path (domain mode: ``/sandboxes``, ``/snapshots``,
  ``/sandbox-pools``...) is the key's namespace's (the admin's: ``default``);
* ``/v1/namespaces/default/...`` with a namespace's key is that namespace
  (the SDK puts ``default`` in some paths even in domain mode);
* another namespace than the key's: 404 ``NAMESPACE_NOT_FOUND``, as the host
  answers (no answer tells a key what other namespaces hold).

The request comes back with the namespaced path (:func:`canonical`), which is
what the front reads and what it forwards: the node it reaches checks the
same key against the same namespace itself (the hop header does not vouch
for who the client is, only skips placement), so a front's mistake cannot
widen what a key reaches on a node.
"""

from __future__ import annotations

import re

from aiohttp import web

from ..edge.auth import grant_of
from ..host.domain import DEFAULT_NAMESPACE
from ..host.model import ApiError

# The SDK's flat paths the fleet answers for every node.
FLAT = re.compile(r"^/(sandboxes|snapshots|sandbox-pools|archived-sandboxes)(/.*)?$")
NAMESPACED = re.compile(r"^/v1/namespaces/([^/]+)(/.*)?$")


def namespace_for(request: web.Request, named: str | None) -> str:
    """The namespace a request names (None: a flat path), as its key may see it."""
    grant = grant_of(request)
    ns = named if named is not None else (grant.namespace or DEFAULT_NAMESPACE)
    if ns == DEFAULT_NAMESPACE and grant.namespace is not None:
        ns = grant.namespace
    if not grant.sees(ns):
        raise ApiError(404, "NAMESPACE_NOT_FOUND", f"no namespace {ns!r} for this key")
    return ns


def canonical(request: web.Request) -> web.Request:
    """The request at ``/v1/namespaces/{its namespace}/...`` (unchanged when it is already)."""
    path = request.path
    m = NAMESPACED.match(path)
    if m is not None:
        ns = namespace_for(request, m[1])
        if ns == m[1]:
            return request
        new = f"/v1/namespaces/{ns}{m[2] or ''}"
    else:
        flat = FLAT.match(path)
        if flat is None:
            return request
        new = f"/v1/namespaces/{namespace_for(request, None)}{path}"
    url = request.rel_url.with_path(new, encoded=False)
    if request.rel_url.raw_query_string:
        url = url.with_query(request.rel_url.query)
    return request.clone(rel_url=url)


def sees(request: web.Request, namespace: str) -> bool:
    return grant_of(request).sees(namespace)
