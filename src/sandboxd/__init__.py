"""sandboxd: a sandbox daemon that speaks the Tensorlake Sandbox API."""

__version__ = "0.1.0"
