"""A fleet of ``sandboxd host`` nodes on etcd (docs/fleet.md).

etcd holds membership (a node's key under its lease), placement (a
reservation transaction per create), names (create-if-absent keys) and every
sandbox's record as its node last published it; each node's own store stays
the truth for what runs there.
"""
