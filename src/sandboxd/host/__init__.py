"""``sandboxd host``: a self-hosted control plane that makes sandboxes and proxies to them.

One aiohttp app on one port serves the Tensorlake lifecycle API (localhost
mode, ``/v1/namespaces/{ns}/sandboxes``) and the sandbox proxy (``/api/v1/*``
routed by ``Host: <id>.local`` or ``X-Tensorlake-Sandbox-Id``). Each sandbox is
its own ``sandboxd serve`` on a unix socket, started under bubblewrap with
per-sandbox cgroups. Modules, one concern each:

* :mod:`.model` — request validation and the JSON the SDK reads (no I/O);
* :mod:`.store` — the SQLite record store;
* :mod:`.cgroup` — one cgroup set per sandbox (v1, v2 and hybrid), freezer;
* :mod:`.disk` — ``disk_mb``: a loop-mounted ext4 for the writable dirs;
* :mod:`.runtime` — bubblewrap launch, health wait, teardown;
* :mod:`.manager` — the lifecycle: create (with warm spares), suspend/resume,
  terminate, timeouts, recovery;
* :mod:`.proxy` — ``/api/v1/*`` to the right sandbox, streams unbuffered;
* :mod:`.network` — per-sandbox netns, routed veth and nft egress policy;
* :mod:`.ingress` — exposed ports: ``Host: <port>-<id>.…`` into the sandbox's netns;
* :mod:`.app` — the routes;
* :mod:`.catalog` — snapshot and pool records (SQLite, ``catalog.db``);
* :mod:`.snapshots` — filesystem snapshots (frozen tar of the rw layer) and restores;
* :mod:`.resize` — live ``PATCH resources``: cgroup limits and online disk growth;
* :mod:`.pools` — warm pools and claims (the manager's spares, one shape per pool);
* :mod:`.warmpath` — a claimed sandbox's first command without a cgroup-lock wait;
* :mod:`.lifecycle` — the snapshot and pool routes.
"""
