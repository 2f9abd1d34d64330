"""What both SSH servers of sandboxd offer: public keys only, and no forwarding of any kind.

Mixed into the daemon's server (``server.py``) and the host's gateway
(``host/proxy/sshgateway.py``) ahead of ``asyncssh.SSHServer``. Without asyncssh
imports, so the daemon loads asyncssh only when SSH is enabled.
"""

from __future__ import annotations


class PublicKeyOnly:
    """asyncssh server callbacks: public-key login only; no port, unix or remote forwarding.

    The daemon's tunnels and the host's exposed ports reach a sandbox's ports,
    with the host's own auth; SSH forwarding would be a second door.
    """

    def begin_auth(self, username: str) -> bool:
        return True  # always authenticate

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return False  # ssh -R

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool:
        return False  # ssh -L, -W, -D

    def unix_connection_requested(self, dest_path: str) -> bool:
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        return False
