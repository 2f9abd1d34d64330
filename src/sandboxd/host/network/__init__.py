"""A sandbox's network: its namespace, its veth to the host's router, its policy.

``sandbox_network`` makes and removes one sandbox's network; ``netplan`` is
the names, addresses and rule text (no I/O); ``netns`` runs ``ip``/``nft`` in
a namespace; ``netpolicy`` reads the policy the SDK sends.
"""
