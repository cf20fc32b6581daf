# pychat's container images (docs/operator.md, "Deploying"):
#   docker build -t pychat .                    the server: only the pychat wheel (and its
#                                               dependencies, pinned) in a slim Python image
#   docker build -t pychat-proxy --target proxy .   Debian's nginx with deploy/nginx/ (TLS in front)
# deploy/compose.yaml builds both for a three-node cluster.
#
# NOT TESTED on the project's machines: they have no container daemon, so these images have never
# been built there. What is checked (tests/test_deploy_files.py): hadolint lints this file, and the
# versions it pins are the ones the project builds and tests with (the Rust of rust-toolchain.toml,
# maturin and ziglang of requirements-dev.txt, Python 3.11, the nginx of services/nginx.py).
#
# Open files (systemd's LimitNOFILE in deploy/pychat.service): a container's limit is set by
# whoever runs it, not here: `docker run --ulimit nofile=1048576:1048576`, or `ulimits:` in
# compose. pychat sizes max_connections from the limit it starts with. Of the sysctls in
# deploy/99-pychat.conf, the net.* ones are per container (`--sysctl`, compose `sysctls:`); the
# fs.* ones belong to the host.

# ---- build: the abi3 wheel, as `make wheel` builds it (manylinux2014, linked with zig) ----------
FROM rust:1.95.0-slim-bookworm AS rust
FROM python:3.11-bookworm AS build
COPY --from=rust /usr/local/rustup /usr/local/rustup
COPY --from=rust /usr/local/cargo /usr/local/cargo
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
RUN pip install --no-cache-dir maturin==1.16.0 ziglang==0.13.0
WORKDIR /src
# What the wheel is built from (the workspace names benchmarks/loadgen: its manifest must be there).
COPY Cargo.toml Cargo.lock pyproject.toml README.md requirements.txt requirements-dev.txt ./
COPY core core
COPY benchmarks/loadgen benchmarks/loadgen
COPY api api
COPY pychat pychat
RUN cp api/openapi.json api/ws-frames.schema.json pychat/web/ \
    && maturin build --release --zig --compatibility manylinux2014 --strip --out /dist \
    && grep -hE '^[A-Za-z0-9_.-]+==' requirements.txt requirements-dev.txt > /dist/constraints.txt

# ---- proxy: Debian's nginx, pinned as services/nginx.py pins it, with deploy/nginx/ -------------
FROM debian:bookworm-slim AS proxy
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx=1.22.1-9+deb12u12 nginx-common=1.22.1-9+deb12u12 \
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/default
COPY deploy/nginx/nginx.conf /etc/nginx/nginx.conf
COPY deploy/nginx/pychat.conf /etc/nginx/conf.d/pychat.conf
# The upstreams (deploy/nginx/upstream.conf or upstream-cluster.conf) and the certificate
# (/etc/ssl/pychat/fullchain.pem, privkey.pem) are mounted by whoever runs it (deploy/compose.yaml).
EXPOSE 80 443
# SIGQUIT: finish the requests under way; WebSockets get nginx.conf's worker_shutdown_timeout.
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]

# ---- runtime (the default target): the wheel with the extras a cluster node uses ---------------
FROM python:3.11-slim-bookworm AS runtime
COPY --from=build /dist /tmp/dist
# The versions `make test` tests with (requirements*.txt) constrain the dependencies.
RUN pip install --no-cache-dir -c /tmp/dist/constraints.txt \
        "$(ls /tmp/dist/pychat-*.whl)[cassandra,cluster,s3,export]" \
    && rm -rf /tmp/dist \
    && groupadd --system --gid 10001 pychat \
    && useradd --system --uid 10001 --gid pychat --home-dir /var/lib/pychat --shell /usr/sbin/nologin pychat \
    && mkdir -p /var/lib/pychat /var/lib/pychat-media \
    && chown pychat:pychat /var/lib/pychat /var/lib/pychat-media \
    && chmod 0700 /var/lib/pychat
# Numeric, so that a runtime can tell it is not root (Kubernetes' runAsNonRoot).
USER 10001:10001
WORKDIR /var/lib/pychat
# Listen on the container's interfaces; the data (SQLite, secret.key, spooled uploads, the search
# index) in the volume. A cluster (deploy/compose.yaml) adds its store, Kafka, Redis and media.
ENV PYCHAT_HOST=0.0.0.0 \
    PYCHAT_DATA_DIR=/var/lib/pychat \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
VOLUME ["/var/lib/pychat"]
# REST, the web page and /docs; the WebSocket (/ws).
EXPOSE 8080 8081
# pychat stops within 20 s of SIGTERM (docs/operator.md, "Stopping"): give it 30
# (`docker stop -t 30`, compose `stop_grace_period: 30s`); Docker's default is 10.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["pychat"]
CMD ["serve"]
