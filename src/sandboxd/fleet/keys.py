"""The fleet's key layout in etcd (values are JSON objects)."""

from __future__ import annotations

from .store import ROOT

NODES = ROOT + "nodes/"  # {node}: capacity and URL, under the node's lease
SANDBOXES = ROOT + "sandboxes/"  # {ns}/{id}: the record and its node
NAMES = ROOT + "names/"  # {ns}/{name}: which sandbox holds the name
RESERVED = ROOT + "reserved/"  # {node}/{rid}: room held for a create in flight (front's lease)
ALLOC = ROOT + "alloc/"  # {node}: bumped by every placement, so two never race unseen
DRAIN = ROOT + "drain/"  # {node}: present while the node takes no new placements
SNAPSHOTS = ROOT + "snapshots/"  # {ns}/{snapshot id}: the node that holds its data
POOLS = ROOT + "pools/"  # {ns}/{pool id}: the node the pool lives on
APIKEYS = ROOT + "apikeys/"  # {key id}: a namespace key's record (its hash, never the key)
# Present once a key was ever made: from then on the fleet requires keys (never deleted).
APIKEYS_MADE = ROOT + "apikeys-made"


def node(name: str) -> str:
    return NODES + name


def sandbox(ns: str, sid: str) -> str:
    return f"{SANDBOXES}{ns}/{sid}"


def name(ns: str, nm: str) -> str:
    return f"{NAMES}{ns}/{nm}"


def reserved(node_name: str, rid: str) -> str:
    return f"{RESERVED}{node_name}/{rid}"


def alloc(node_name: str) -> str:
    return ALLOC + node_name


def drain(node_name: str) -> str:
    return DRAIN + node_name


def snapshot(ns: str, snap: str) -> str:
    return f"{SNAPSHOTS}{ns}/{snap}"


def pool(ns: str, pool_id: str) -> str:
    return f"{POOLS}{ns}/{pool_id}"


def apikey(key_id: str) -> str:
    return APIKEYS + key_id
