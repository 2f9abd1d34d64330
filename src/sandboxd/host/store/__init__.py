"""The host's durable state: sandbox records (``records``) and the catalog of
snapshots and pools (``catalog``), both SQLite served from memory.
"""
