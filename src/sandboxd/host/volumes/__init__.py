"""Volumes: named directories the host keeps (``volume_store``), their routes
(``volroutes``), the SDK's mounts validated (``volspec``) and mounted into a
running sandbox (``volmount``).
"""
