# One task runner for people and CI. `make help` lists the targets.
SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/pychat
# One Rust target dir outside the clone, so clean-clone CI builds are incremental.
export CARGO_TARGET_DIR ?= $(CACHE)/target
export PIP_CACHE_DIR ?= $(CACHE)/pip
# Locust (and gevent) in a virtualenv of their own, kept with the caches: never in the test venv.
LOADTEST_VENV ?= $(CACHE)/venv-loadtest
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PYTHON ?= python3
ARGS ?=
# Nodes of `make cluster`.
N ?= 3
# The stores the Python tests run pychat's servers on (every server test, on each).
export PYCHAT_TEST_STORES ?= sqlite,cassandra

# Tests and benchmarks hold thousands of sockets, and each recipe line runs in its own shell, so
# the line that runs them raises its open-files limit first: `$(call nofile,N) cmd` raises the soft
# limit to the hard one, or stops with a message when the hard limit is below N, the fewest files
# cmd needs (only root can raise a hard limit). N: 4,096 for the tests and the small runs, 16,384
# for the 15,000-socket reconnect storm, 19,500 for `make bench` (one process holds 19,000 sockets).
nofile = hard=$$(ulimit -Hn); \
	if [ "$$hard" != unlimited ] && [ "$$hard" -lt $(1) ]; then \
		echo "make $@: needs $(1) open files, but the hard limit (ulimit -Hn) is $$hard;" \
			"raise it as root (LimitNOFILE= in a systemd unit, nofile in /etc/security/limits.conf)" >&2; \
		exit 1; \
	fi; \
	if [ "$$hard" = unlimited ]; then hard=$(1); fi; \
	ulimit -Sn $$hard || { echo "make $@: could not raise the open-files soft limit to $$hard" >&2; exit 1; };

.PHONY: help serve test test-rust test-py test-cassandra services build-dev lint fmt clean fuzz chaos bench \
	bench-quick loadgen loadtest ext-current cassandra cassandra-stop kafka kafka-stop redis redis-stop s3 s3-stop \
	cluster cluster-stop test-cluster test-web autobahn test-autobahn wheel test-wheel test-deploy

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
# What the extension is built from, and the package's own files: a wheel older than any of these
# is stale (it would serve yesterday's Python too).
RUST_SOURCES := Cargo.toml Cargo.lock rust-toolchain.toml $(shell find core -name '*.rs' -o -name Cargo.toml)
PACKAGE_FILES := $(shell find pychat -type f -not -name '*.so' -not -path '*__pycache__*')

$(VENV)/.deps: requirements.txt requirements-dev.txt pyproject.toml
	@command -v cargo >/dev/null || { echo "cargo (Rust) is required: https://rustup.rs"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

build-dev: $(VENV)/.deps ## build the Rust extension (release profile) into the venv
	rm -f pychat/_core*.so
	VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/maturin develop --release -q

# `make serve` installs only what a server needs (requirements.txt). A wheel in dist/ (`make wheel`,
# or one downloaded) newer than the sources is installed as it is: no Rust toolchain needed.
# Otherwise the extension is built, and only when its sources changed since the last serve.
$(VENV)/.serve: requirements.txt pyproject.toml $(RUST_SOURCES) $(PACKAGE_FILES) $(wildcard dist/pychat-*.whl)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@wheel=$$(ls -t dist/pychat-$(VERSION)-*.whl 2>/dev/null | head -1); \
	if [ -n "$$wheel" ] && [ -z "$$(find $(RUST_SOURCES) $(PACKAGE_FILES) -newer $$wheel)" ]; then \
		echo "installing $$wheel"; \
		$(PY) -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$$wheel" && \
		rm -f pychat/_core*.so; \
	else \
		command -v cargo >/dev/null || { echo "no wheel in dist/ newer than the sources, and no cargo to build one:" \
			"install Rust (https://rustup.rs) or put a pychat wheel in dist/"; exit 1; }; \
		rm -f pychat/_core*.so; \
		VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/maturin develop --release -q; \
	fi
	touch $@

serve: $(VENV)/.serve ## install what a server needs, build the extension if its sources changed (or install dist/'s wheel), and start a server on the embedded defaults
	$(BIN)/pychat serve $(ARGS)

wheel: $(VENV)/.deps ## build the abi3 manylinux2014 wheel (Python 3.11+) and the sdist into dist/
	cp api/openapi.json api/ws-frames.schema.json pychat/web/
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/maturin build --release --zig --compatibility manylinux2014 --strip --out dist -q; \
		rc=$$?; [ $$rc != 0 ] || $(BIN)/maturin sdist --out dist >/dev/null; rc=$$?; \
		rm -f pychat/web/openapi.json pychat/web/ws-frames.schema.json; exit $$rc

test-wheel: wheel ## the wheel as a user gets it: a fresh venv outside the checkout, base install only, `pychat serve` and a smoke test
	$(PY) -m tests.wheel_check $$(ls -t dist/pychat-$(VERSION)-*.whl | head -1)

test: build-dev lint test-rust test-wheel test-autobahn test-py test-cluster ## install everything, build, lint, and run every test

test-rust: ## Rust unit tests
	cargo test -q

services: $(VENV)/.deps ## install the real servers the tests start (Cassandra 5.0 and Kafka 4.1 jars from Maven Central, cached; Debian's redis-server 7.0; versitygw, an S3 server built with go install; Debian's chromium 156 for the web page's tests; Debian's nginx 1.22 and docker-compose 1.29 for the deployment files' tests)
	PYCHAT_CACHE=$(CACHE) $(PY) -m services.cassandra install
	PYCHAT_CACHE=$(CACHE) $(PY) -m services.kafka install
	PYCHAT_CACHE=$(CACHE) $(PY) -m services.redis install
	PYCHAT_CACHE=$(CACHE) $(PY) -m services.s3 install
	PYCHAT_CACHE=$(CACHE) $(PY) -m services.chromium install
	PYCHAT_CACHE=$(CACHE) $(PY) -m services.nginx install
	PYCHAT_CACHE=$(CACHE) $(PY) -m services.compose install

test-py: loadgen services $(LOADTEST_VENV)/.deps ## Python tests against real servers on 127.0.0.1 (pychat on SQLite and on Cassandra)
	$(call nofile,4096) $(BIN)/pytest -q -m "not nodes" $(ARGS)

test-cluster: build-dev services ## the cluster tests: 3 pychat nodes on Kafka, Redis and Cassandra; a node SIGKILLed, Redis restarted, Kafka stopped
	$(call nofile,4096) $(BIN)/pytest -q -m nodes $(ARGS)

test-web: build-dev services ## the web page in Debian's Chromium driven by Playwright (screenshots in test-results/web/)
	$(call nofile,4096) $(BIN)/pytest -q tests/test_web.py $(ARGS)

test-deploy: build-dev ## the deployment files: deploy/nginx/ run by Debian's nginx over TLS in front of a real server (smoke test through it); the Dockerfile, deploy/compose.yaml and the systemd unit checked (hadolint, docker-compose config, systemd-analyze verify)
	PYCHAT_CACHE=$(CACHE) $(PY) -m services.nginx install
	PYCHAT_CACHE=$(CACHE) $(PY) -m services.compose install
	$(call nofile,4096) $(BIN)/pytest -q tests/test_deploy_proxy.py tests/test_deploy_files.py $(ARGS)

test-cassandra: loadgen services ## only the tests that run on Cassandra (the store contract, servers on Cassandra, crashes)
	$(call nofile,4096) $(BIN)/pytest -q -k cassandra $(ARGS)

lint: $(VENV)/.deps ## rustfmt, clippy, ruff, mypy --strict, stub check
	cargo fmt --check
	cargo clippy -q --all-targets -- -D warnings
	cargo clippy -q -p pychat-core --features python -- -D warnings
	$(BIN)/ruff check pychat tests benchmarks loadtest services
	$(BIN)/ruff format --check pychat tests benchmarks loadtest services
	$(BIN)/mypy
	$(BIN)/python -m mypy.stubtest pychat._core

loadgen: ## build the compiled load generator (benchmarks/loadgen)
	cargo build --release -q -p pychat-loadgen

$(VENV)/.bench: requirements-bench.txt $(VENV)/.deps
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-bench.txt
	touch $@

bench-quick: build-dev loadgen $(VENV)/.bench ## every benchmark scenario, small (about a minute), against the naive baseline
	$(call nofile,4096) $(PY) benchmarks/suite.py --quick

bench: build-dev loadgen $(VENV)/.bench ## the benchmark suite at the performance targets' sizes (about 10 minutes)
	$(call nofile,19500) $(PY) benchmarks/suite.py

$(LOADTEST_VENV)/.deps: requirements-loadtest.txt
	test -x $(LOADTEST_VENV)/bin/python || $(PYTHON) -m venv $(LOADTEST_VENV)
	$(LOADTEST_VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-loadtest.txt
	touch $@

# The checkout's extension as `make build-dev` left it, built again only when there is none or a
# Rust source is newer than it (build-dev itself always builds).
ext-current: $(VENV)/.deps
	@so=$$(ls -t pychat/_core*.so 2>/dev/null | head -1); \
	if [ -n "$$so" ] && [ -z "$$(find $(RUST_SOURCES) -newer "$$so" | head -1)" ]; then \
		echo "$$so is newer than the Rust sources: not rebuilt"; \
	else \
		$(MAKE) --no-print-directory build-dev; \
	fi

loadtest: ext-current $(LOADTEST_VENV)/.deps ## Locust users (WebSocket + REST) headless against a local server (Locust in its own venv under CACHE); latencies incl. send -> deliver, CSV stats and a JSON summary in test-results/loadtest/
	$(call nofile,4096) $(PY) loadtest/run.py --locust $(LOADTEST_VENV)/bin/locust $(ARGS)

autobahn: build-dev ## Autobahn's fuzzing client on a pychat server (cases 1-7, 9, 10; ARGS="--cases 7.*" for some), then its check; reports in test-results/autobahn/ (installs autobahntestsuite in a Python 2.7 virtualenv: pyenv's or Debian's python2.7)
	PYCHAT_CACHE=$(CACHE) $(PY) -m services.autobahn run $(ARGS)
	$(PY) -m tests.autobahn_check test-results/autobahn

test-autobahn: build-dev ## every Autobahn case of `make autobahn` and its check (about 2.5 minutes)
	PYCHAT_CACHE=$(CACHE) $(PY) -m services.autobahn run
	$(PY) -m tests.autobahn_check test-results/autobahn

fuzz: build-dev ## long fuzzing: Rust properties (frame parser, stitching), REST API (schemathesis), hypothesis
	PROPTEST_CASES=$${PROPTEST_CASES:-100000} cargo test --release -q --test fuzz_protocol
	HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest -q tests/test_fuzz_python.py
	PYCHAT_FUZZ_EXAMPLES=$${PYCHAT_FUZZ_EXAMPLES:-300} PYCHAT_FUZZ_SEED= $(BIN)/pytest -q -s tests/test_fuzz_api.py

chaos: build-dev services ## long reliability runs: 25 SIGKILLs under load, 10 random node kills in a 3-node cluster, a 15,000-connection reconnect storm
	$(call nofile,4096) $(PY) -m tests.chaos --kills $${KILLS:-25}
	$(call nofile,4096) PYCHAT_CACHE=$(CACHE) $(PY) -m tests.chaos --kills $${NODE_KILLS:-10} --nodes 3
	$(call nofile,16384) $(PY) benchmarks/reconnect_storm.py --connections $${STORM:-15000}

fmt: $(VENV)/.deps ## format Rust and Python
	cargo fmt
	$(BIN)/ruff format pychat tests benchmarks loadtest services
	$(BIN)/ruff check --fix pychat tests benchmarks loadtest services

cassandra: $(VENV)/.deps ## install (first time) and start a development Cassandra 5.0 on 127.0.0.1:9042; prints host:port
	PYCHAT_CACHE=$(CACHE) $(PY) -m services.cassandra start --dir $(CACHE)/cassandra-dev $(ARGS)

cassandra-stop: ## stop the development Cassandra
	PYCHAT_CACHE=$(CACHE) $(PY) -m services.cassandra stop --dir $(CACHE)/cassandra-dev

kafka: $(VENV)/.deps ## install (first time) and start a development Kafka 4.1 (KRaft) on 127.0.0.1:9092; prints host:port
	PYCHAT_CACHE=$(CACHE) $(PY) -m services.kafka start --dir $(CACHE)/kafka-dev $(ARGS)

kafka-stop: ## stop the development Kafka
	PYCHAT_CACHE=$(CACHE) $(PY) -m services.kafka stop --dir $(CACHE)/kafka-dev

redis: $(VENV)/.deps ## install (first time) and start a development Redis 7.0 on 127.0.0.1:6379; prints host:port
	PYCHAT_CACHE=$(CACHE) $(PY) -m services.redis start --dir $(CACHE)/redis-dev $(ARGS)

redis-stop: ## stop the development Redis
	PYCHAT_CACHE=$(CACHE) $(PY) -m services.redis stop --dir $(CACHE)/redis-dev

s3: $(VENV)/.deps ## build (first time) and start a development S3 server (versitygw) on 127.0.0.1:7070; prints host:port
	PYCHAT_CACHE=$(CACHE) $(PY) -m services.s3 start --dir $(CACHE)/s3-dev $(ARGS)

s3-stop: ## stop the development S3 server
	PYCHAT_CACHE=$(CACHE) $(PY) -m services.s3 stop --dir $(CACHE)/s3-dev

cluster: build-dev services ## start Cassandra, Kafka, Redis and N pychat nodes (N=3) on their own ports; prints each node's URLs
	$(call nofile,16384) PYCHAT_CACHE=$(CACHE) $(PY) -m services.cluster start --nodes $(N) $(ARGS)

cluster-stop: ## stop the cluster's nodes, then its Cassandra, Kafka and Redis
	PYCHAT_CACHE=$(CACHE) $(PY) -m services.cluster stop

clean: ## remove the venv and built extension (the cargo cache stays)
	rm -rf $(VENV) pychat/_core*.so
