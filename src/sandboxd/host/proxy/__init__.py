"""The ways into a sandbox: the HTTP proxy (``http_proxy``), exposed ports
(``ingress``), TCP tunnels (``tunnel``) and the SSH gateway (``sshgateway``,
``sshkeys``), under one set of reach rules (``reach``).
"""
