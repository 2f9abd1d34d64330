# sandboxd in a container, as the container's PID 1.
#
#   docker build -t sandboxd .
#   docker run --rm -p 9501:9501 -e SANDBOXD_TOKEN=change-me sandboxd
#
# No tini or dumb-init: sandboxd is an init already. As PID 1 it installs its
# own SIGTERM/SIGINT handlers (the kernel gives PID 1 no default ones), shuts
# down cleanly on `docker stop` (every process tree killed, open streams
# ended, well inside the 10 s grace), and reaps every orphan reparented to it.
# Per-process cgroups need a writable cgroup tree (e.g. `--privileged`, or
# `--cgroupns=private` with a writable /sys/fs/cgroup); without one sandboxd
# falls back to process groups and says so in its log and in `sandboxd info`.

# --- build: a wheel from the source tree ---
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- run ---
FROM python:3.11-slim
# procps: ps/top for people inside the sandbox; util-linux (setsid, used for
# PTY sessions) is already in the base image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends procps \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENV SANDBOXD_HOST=0.0.0.0 \
    SANDBOXD_PORT=9501 \
    PYTHONUNBUFFERED=1
WORKDIR /workspace
EXPOSE 9501
STOPSIGNAL SIGTERM
# The CLI reads SANDBOXD_TOKEN from the container's environment, like the daemon.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD sandboxd health --url "http://127.0.0.1:${SANDBOXD_PORT}"
# Exec form: sandboxd itself is PID 1, not a shell that would swallow signals.
ENTRYPOINT ["sandboxd", "serve"]
