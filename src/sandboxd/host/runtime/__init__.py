"""Running sandboxes: bubblewrap (with its zygote of daemons) or gVisor, their cgroups,
seccomp filter, disks and mounts, and memory checkpoints.

``bubblewrap`` starts a sandbox and is the default runtime; ``gvisor`` is the
other (``--runtime gvisor``); ``zygote``/``zygote_launch`` start the daemon
from a fork server; ``launcher`` holds what runs by descriptor; ``cgroup`` is
one cgroup set per sandbox; ``seccomp`` the system-call filter; ``disk`` the
per-sandbox ext4; ``checkpoint`` gVisor's memory snapshots.
"""
