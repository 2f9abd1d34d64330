"""``sandboxd host``: a self-hosted control plane that makes sandboxes and proxies to them.

One aiohttp app on one port serves the Tensorlake lifecycle API (localhost
mode, ``/v1/namespaces/{ns}/sandboxes``; domain mode, flat paths) and the
sandbox proxy (``/api/v1/*`` routed by ``Host: <id>.…`` or
``X-Tensorlake-Sandbox-Id``). Each sandbox is its own ``sandboxd serve`` on a
unix socket, started under bubblewrap (or gVisor) with per-sandbox cgroups.

Here, the lifecycle, one concern a module:

* :mod:`.model` — request validation and the JSON the SDK reads (no I/O);
* :mod:`.states` — every status of a sandbox and the changes between them;
* :mod:`.manager` — create (with warm spares), suspend/resume, terminate,
  timeouts, recovery;
* :mod:`.app`, :mod:`.lifecycle`, :mod:`.routing` — the routes;
* :mod:`.snapshots`, :mod:`.resize`, :mod:`.pools` — snapshots and restores,
  live ``PATCH resources``, warm pools and claims;
* :mod:`.apikeys`, :mod:`.domain`, :mod:`.tls` — who may call, under which
  names, over which certificate;
* :mod:`.observe`, :mod:`.usage`, :mod:`.labels`, :mod:`.logs`,
  :mod:`.archive` — what an operator and the SDK read back.

And below, the parts it is made of:

* :mod:`.runtime` — running a sandbox: bubblewrap, the zygote, gVisor,
  cgroups, seccomp, disks;
* :mod:`.network` — its netns, routed veth and nft egress policy;
* :mod:`.images` — the image store, pulls, imports and builds;
* :mod:`.store` — SQLite records of sandboxes, snapshots and pools;
* :mod:`.proxy` — the ways in: HTTP proxy, exposed ports, tunnels, SSH;
* :mod:`.volumes` — named volumes mounted into sandboxes.
"""
