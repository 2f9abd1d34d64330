"""Images: the read-only root filesystems sandboxes start from, and how they arrive.

``image_store`` is the store itself; ``registry`` and ``oci`` pull and unpack
(skopeo, umoci); ``dockerfile`` builds (buildah); ``pulls`` fetches on create;
``image_use`` says which images the host's state still refers to.
"""
