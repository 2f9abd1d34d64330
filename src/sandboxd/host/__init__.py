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
* :mod:`.app` — the routes.
"""
