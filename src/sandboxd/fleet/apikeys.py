"""A fleet's namespace API keys: in etcd, seen by every node and gateway through a watch.

A lone host keeps its keys in its state dir (host/apikeys.py). In a fleet a
key must work on whichever front a client reaches and on the node a front
forwards to, so the same records (``{"id", "namespace", "sha256",
"created_at"}``: the key's SHA-256, never the key) live at ``apikeys/{id}`` in
etcd, written by ``sandboxd host keys ... --cluster``.

Every front holds them in memory (:class:`FleetKeys`): read once at start,
then kept current by a watch on the prefix, so a key checked per request costs
no etcd call, and a revoke reaches every front as soon as etcd delivers the
watch event (milliseconds on a healthy cluster). A watch that breaks is made
again after a fresh read, and every :data:`RESYNC_S` the keys are read again
whatever the watch said: a revoked key is refused everywhere within that bound
even if a watch stream stalled silently. Until the first read, no key is known
and keys are required (closed, not open).

``apikeys-made`` is written with the first key and never deleted: from then on
a fleet without ``--token`` requires a key, as a lone host does once its key
file exists (revoking the last key must not open the fleet to everyone).
"""

from __future__ import annotations

import dataclasses

from ..host.apikeys import KeyError_, StoredKey, match, new_key
from ..host.model import check_namespace
from . import keys
from .store import Entry, Etcd
from .watched import WatchedPrefix

WATCHED = keys.APIKEYS.rstrip("/")  # the records and the "made" mark, one prefix
RESYNC_S = 10.0  # a full read at least this often, whatever the watch says


def _stored(value: dict[str, object]) -> StoredKey | None:
    try:
        return StoredKey(
            str(value["id"]),
            str(value["namespace"]),
            str(value["sha256"]),
            float(value["created_at"]),  # type: ignore[arg-type]
        )
    except (KeyError, TypeError, ValueError):
        return None  # a record we cannot read grants nothing


class FleetKeys:
    """The fleet's keys as a host's :class:`~sandboxd.host.apikeys.KeyStore`."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self._digests: tuple[tuple[bytes, StoredKey], ...] = ()
        self._made = False
        self._loaded = False
        self._watched = WatchedPrefix(etcd, WATCHED, "api keys", RESYNC_S, self._load)

    # -- the KeyStore interface (called per request, no I/O) -----------------------

    def lookup(self, key: str) -> StoredKey | None:
        return match(self._digests, key)

    def in_use(self) -> bool:
        return self._made or not self._loaded

    # -- keeping current (fleet/watched.py) ------------------------------------------

    @property
    def reads(self) -> int:
        return self._watched.reads

    async def start(self) -> None:
        """The first read (a front that cannot read its keys does not serve), then the watch."""
        await self._watched.start()

    async def stop(self) -> None:
        await self._watched.stop()

    def _load(self, entries: list[Entry]) -> None:
        found = []
        made = False
        for e in entries:
            if e.key == keys.APIKEYS_MADE:
                made = True
            elif (k := _stored(e.value)) is not None:
                found.append(k)
        self._digests = tuple((bytes.fromhex(k.sha256), k) for k in found)
        self._made = made or bool(found)
        self._loaded = True


# -- the operator's side: sandboxd host keys ... --cluster ------------------------------


async def create(etcd: Etcd, namespace: str) -> tuple[StoredKey, str]:
    try:
        check_namespace(namespace)
    except Exception as exc:
        raise KeyError_(f"namespace {namespace!r} is not a valid name") from exc
    while True:
        stored, key = new_key(namespace)
        at = keys.apikey(stored.id)
        if await etcd.transaction(
            [etcd.absent(at)],
            [
                etcd.put_op(at, dataclasses.asdict(stored)),
                etcd.put_op(keys.APIKEYS_MADE, {"since": stored.created_at}),
            ],
        ):
            return stored, key
        # (an id already taken: 32 bits, so rarely; draw another)


async def listed(etcd: Etcd) -> list[StoredKey]:
    _, entries = await etcd.prefix(keys.APIKEYS)
    found = [k for e in entries if (k := _stored(e.value)) is not None]
    return sorted(found, key=lambda k: (k.created_at, k.id))


async def revoke(etcd: Etcd, key_id: str) -> StoredKey:
    at = keys.apikey(key_id)
    cur = await etcd.get(at)
    gone = None if cur is None else _stored(cur.value)
    if cur is None or gone is None:
        raise KeyError_(f"no key {key_id!r} in the fleet (sandboxd host keys list shows the ids)")
    await etcd.transaction([etcd.unchanged(at, cur.mod_revision)], [etcd.delete_op(at)])
    return gone
