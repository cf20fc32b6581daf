"""The deployment files that cannot run here (no container daemon, no systemd as init), checked
with the tools that can read them and against what the project runs and documents (`make
test-deploy`): hadolint on the Dockerfile, Debian's docker-compose on deploy/compose.yaml (`config`
validates and resolves it without a daemon), pychat's own config loader on every setting they
set, `systemd-analyze verify` on the unit, and the versions, limits and sysctls they carry against
services/, docs/operator.md and the server's stop bound."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from pychat.config import Config, Limits, load_config
from pychat.server import STOP_LIMIT_S
from services.cassandra import _YAML as CASSANDRA_YAML
from services.cassandra import CASSANDRA_VERSION
from services.kafka import _PROPERTIES as KAFKA_PROPERTIES
from services.kafka import KAFKA_VERSION
from services.nginx import NGINX_PACKAGE_VERSION
from services.redis import REDIS_VERSION
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
UNIT = DEPLOY / "pychat.service"
SYSCTLS = DEPLOY / "99-pychat.conf"
OPERATOR = ROOT / "docs" / "operator.md"
# What the compose file needs from whoever runs it.
COMPOSE_ENV = {"PYCHAT_SECRET_KEY": "k" * 64, "PYCHAT_PUBLIC_HOST": "chat.example.com"}
NODES = ("pychat1", "pychat2", "pychat3")


def pins(requirements: Path) -> dict[str, str]:
    found = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", requirements.read_text(), re.M)
    return {name.lower(): version for name, version in found}


def unit_settings() -> dict[str, list[str]]:
    """The unit's `Key=value` lines (comments skipped), each key's values in order."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def sysctls() -> dict[str, str]:
    """99-pychat.conf's settings by name (a leading - only lets a missing key pass)."""
    found = {}
    for line in SYSCTLS.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            found[key.strip().lstrip("-")] = " ".join(value.split())
    return found


def operator_section(title: str) -> str:
    text = OPERATOR.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


# -- Dockerfile -----------------------------------------------------------------------------------


def dockerfile_stages() -> dict[str, list[str]]:
    """The Dockerfile's instructions (continuation lines joined), by stage name, in order."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            current = stages.setdefault(line.split(" AS ")[-1].strip(), [])
        current.append(line)
    return stages


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint is missing: pip install -r requirements-dev.txt"
    done = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_the_dockerfile_builds_with_the_versions_the_project_tests() -> None:
    stages = dockerfile_stages()
    text = DOCKERFILE.read_text()
    assert list(stages) == ["rust", "build", "proxy", "runtime"], (
        "runtime must stay the default (last) target"
    )
    toolchain = tomllib.loads((ROOT / "rust-toolchain.toml").read_text())["toolchain"]["channel"]
    assert stages["rust"][0] == f"FROM rust:{toolchain}-slim-bookworm AS rust"
    python = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["python_version"]
    assert stages["build"][0] == f"FROM python:{python}-bookworm AS build"
    assert stages["runtime"][0] == f"FROM python:{python}-slim-bookworm AS runtime"
    dev = pins(ROOT / "requirements.txt") | pins(ROOT / "requirements-dev.txt")
    assert f"maturin=={dev['maturin']}" in text and f"ziglang=={dev['ziglang']}" in text
    # Built as `make wheel` builds it: the same flags, the contract copied into the package first.
    makefile = (ROOT / "Makefile").read_text()
    for same in (
        "maturin build --release --zig --compatibility manylinux2014 --strip",
        "cp api/openapi.json api/ws-frames.schema.json pychat/web/",
    ):
        assert same in makefile and same in text, same
    assert f"nginx={NGINX_PACKAGE_VERSION} nginx-common={NGINX_PACKAGE_VERSION}" in text


def test_the_runtime_image_holds_only_the_wheel_and_runs_as_a_user() -> None:
    runtime = dockerfile_stages()["runtime"]
    copies = [line for line in runtime if line.startswith(("COPY", "ADD"))]
    assert copies == ["COPY --from=build /dist /tmp/dist"], "nothing of the checkout but the wheel"
    user = next(line for line in runtime if line.startswith("USER ")).split()[1]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0
    config = Config()
    assert f"EXPOSE {config.port} {config.ws_port}" in runtime
    env = dict(
        re.findall(r"(PYCHAT_[A-Z_]+)=(\S+)", next(line for line in runtime if line.startswith("ENV ")))
    )
    loaded = load_config(env=env)
    assert loaded.host == "0.0.0.0"
    assert f'VOLUME ["{loaded.data_dir}"]' in runtime
    assert any(
        f"127.0.0.1:{config.port}/healthz" in line for line in runtime if line.startswith("HEALTHCHECK")
    )
    assert runtime[-2:] == ['ENTRYPOINT ["pychat"]', 'CMD ["serve"]']


def test_everything_the_dockerfile_copies_is_in_the_build_context() -> None:
    ignored = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    for stage in dockerfile_stages().values():
        for line in stage:
            if line.startswith("COPY ") and "--from=" not in line:
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), source
                    assert not any(source == i or source.startswith(i + "/") for i in ignored), source


# -- deploy/compose.yaml --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docker_compose() -> Path:
    from services.compose import install

    return install()  # the pinned Debian package (`make test-deploy` installs it first)


def compose_config(docker_compose: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`docker-compose config`: the file validated against the Compose schema, variables resolved."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("PYCHAT_", "COMPOSE_", "DOCKER_"))}
    return subprocess.run(
        [
            str(docker_compose),
            "--project-directory",
            str(DEPLOY),
            "-f",
            str(DEPLOY / "compose.yaml"),
            "config",
        ],
        capture_output=True,
        text=True,
        env={**keep, **env},
        cwd=DEPLOY,
    )


@pytest.fixture(scope="module")
def compose(docker_compose: Path) -> dict[str, Any]:
    done = compose_config(docker_compose, COMPOSE_ENV)
    assert done.returncode == 0, f"docker-compose config refused deploy/compose.yaml:\n{done.stderr}"
    resolved: dict[str, Any] = yaml.safe_load(done.stdout)
    return resolved


def test_compose_needs_the_secret_and_the_public_name(docker_compose: Path) -> None:
    for missing in COMPOSE_ENV:
        done = compose_config(docker_compose, {k: v for k, v in COMPOSE_ENV.items() if k != missing})
        assert done.returncode != 0 and f"set {missing}" in done.stderr, done.stderr


def test_each_node_loads_its_environment_as_a_cluster_node(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {*NODES, "nginx", "cassandra", "kafka", "redis"}
    known = {f.upper() for f in Config.__dataclass_fields__} | {
        f"LIMITS_{f.upper()}" for f in Limits.__dataclass_fields__
    }
    node_ids = set()
    for name in NODES:
        env = {k: str(v) for k, v in services[name]["environment"].items()}
        # pychat ignores an environment variable it does not know: a typo here would go unnoticed.
        unknown = {k for k in env if k.startswith("PYCHAT_") and k[len("PYCHAT_") :] not in known}
        assert not unknown, f"{name}: not pychat settings: {unknown}"
        config = load_config(env=env)
        assert config.clustered and config.store.startswith("cassandra://cassandra:")
        assert config.secret_key == COMPOSE_ENV["PYCHAT_SECRET_KEY"]
        assert config.public_ws_url == "wss://chat.example.com/ws"
        assert config.media_store == "file:///var/lib/pychat-media"
        assert any(v.endswith(":/var/lib/pychat-media:rw") for v in services[name]["volumes"])
        node_ids.add(config.node_id)
        # Stopping within the server's bound, and the open files of a node with many connections.
        assert services[name]["stop_grace_period"] == "30s" and STOP_LIMIT_S < 30
        limit = int(unit_settings()["LimitNOFILE"][0])
        assert services[name]["ulimits"]["nofile"] == {"soft": limit, "hard": limit}
        assert services[name]["build"]["context"] == str(ROOT)
    assert len(node_ids) == len(NODES)


def test_compose_runs_the_versions_the_project_tests(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["cassandra"]["image"] == f"cassandra:{CASSANDRA_VERSION}"
    assert services["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"
    assert services["redis"]["image"] == f"redis:{REDIS_VERSION}-bookworm"
    assert services["nginx"]["build"]["target"] == "proxy"


def test_compose_kafka_is_configured_as_services_kafka_runs_it(compose: dict[str, Any]) -> None:
    properties = set(re.findall(r"^([a-z.]+)=", KAFKA_PROPERTIES, re.M))
    env = compose["services"]["kafka"]["environment"]
    # The image turns KAFKA_FOO_BAR into foo.bar.
    settings = {
        k[len("KAFKA_") :].lower().replace("_", "."): str(v) for k, v in env.items() if k.startswith("KAFKA_")
    }
    assert not set(settings) - properties, set(settings) - properties
    assert settings["process.roles"] == "broker,controller"
    assert settings["advertised.listeners"] == "PLAINTEXT://kafka:9092"
    assert all(k in env for k in ("CLUSTER_ID",))


def test_compose_cassandra_acks_only_what_is_on_disk(compose: dict[str, Any], tmp_path: Path) -> None:
    """The entrypoint's edit of the image's cassandra.yaml, run on a stock-looking file, leaves
    the durability settings of services/cassandra.py, each once."""
    script = compose["services"]["cassandra"]["entrypoint"][-1].replace("$$", "$")
    conf = tmp_path / "cassandra.yaml"
    conf.write_text(
        "cluster_name: 'Test Cluster'\ncommitlog_sync: periodic\ncommitlog_sync_period: 10000ms\n"
        "# commitlog_sync_group_window: 1000ms\nconcurrent_reads: 32\nconcurrent_writes: 32\n"
    )
    script = script.replace("/etc/cassandra/cassandra.yaml", str(conf))
    script = script.replace("exec docker-entrypoint.sh cassandra -f", "exit 0")
    assert subprocess.run(["bash", "-ec", script], capture_output=True).returncode == 0
    edited = yaml.safe_load(conf.read_text())
    ours = yaml.safe_load(CASSANDRA_YAML.replace("{", "").replace("}", ""))
    for key in ("commitlog_sync", "commitlog_sync_group_window", "paxos_variant", "concurrent_writes"):
        assert edited[key] == ours[key] and conf.read_text().count(f"\n{key}:") == 1, key
    assert "commitlog_sync_period" not in edited


def test_the_proxy_of_the_cluster_reaches_every_node(compose: dict[str, Any]) -> None:
    upstreams = (DEPLOY / "nginx" / "upstream-cluster.conf").read_text()
    config = Config()
    for port in (config.port, config.ws_port):
        assert set(re.findall(rf"server (\w+):{port}\b", upstreams)) == set(NODES)
    volumes = compose["services"]["nginx"]["volumes"]
    assert f"{DEPLOY / 'nginx' / 'upstream-cluster.conf'}:/etc/nginx/conf.d/upstream.conf:ro" in volumes
    assert f"{DEPLOY / 'tls'}:/etc/ssl/pychat:ro" in volumes
    site = (DEPLOY / "nginx" / "pychat.conf").read_text()
    assert "/etc/ssl/pychat/fullchain.pem" in site and "/etc/ssl/pychat/privkey.pem" in site


# -- systemd and sysctls --------------------------------------------------------------------------


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "no systemd-analyze on this machine (Debian's systemd package has it)"
    # Its ExecStart must exist to verify: the checkout's pychat stands in for /opt/pychat's.
    unit = tmp_path / "pychat.service"
    unit.write_text(
        UNIT.read_text().replace("/opt/pychat/bin/pychat", str(Path(sys.executable).parent / "pychat"))
    )
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    # An unknown key is only a warning (exit 0): any output fails too.
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)], capture_output=True, text=True
    )
    exposure = re.search(r"Overall exposure level for pychat.service: ([\d.]+)", security.stdout)
    assert exposure is not None, security.stdout + security.stderr
    assert float(exposure.group(1)) <= 2.0, security.stdout


def test_the_unit_carries_the_documented_limits_and_sandbox() -> None:
    unit = unit_settings()
    doc = OPERATOR.read_text()
    assert f"LimitNOFILE={unit['LimitNOFILE'][0]}" in doc
    # A supervisor must wait past the server's own stop bound before it SIGKILLs.
    assert f"within **{STOP_LIMIT_S:g} s**" in doc
    stop_s = int(unit["TimeoutStopSec"][0].removesuffix("s"))
    assert STOP_LIMIT_S < stop_s <= STOP_LIMIT_S + 15
    assert unit["KillMode"] == ["mixed"] and unit["KillSignal"] == ["SIGTERM"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert unit[key] == [value], key
    assert unit["User"] == ["pychat"] and unit["StateDirectory"] == ["pychat"]
    # The one writable place is the data dir of the example config the unit starts with.
    config_file = re.search(r"--config (\S+)", unit["ExecStart"][0])
    assert config_file is not None and config_file.group(1) == "/etc/pychat/pychat.toml"
    config = load_config(DEPLOY / "pychat.toml", env={})
    assert unit["ReadWritePaths"] == [str(config.data_dir)] == ["/var/lib/pychat"]


def test_the_sysctls_are_the_operator_guides() -> None:
    section = operator_section("Many connections")
    named = dict(re.findall(r"`((?:fs|net|vm)\.[a-z0-9_.]+)(?:=(\d+))?`", section))
    assert named, "the operator guide's sysctls were not found"
    found = sysctls()
    for name, value in named.items():
        assert name in found, f"{SYSCTLS.name} lacks {name}"
        if value:  # the guide gives a value: at least that
            assert int(found[name]) >= int(value), name
    limit = int(unit_settings()["LimitNOFILE"][0])
    assert int(found["fs.nr_open"]) > limit and int(found["fs.file-max"]) > limit
    for buffers in ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"):
        assert found[buffers].split()[0] == "4096", buffers
    # Each is a real key of this kernel (not applied: the test changes nothing on the host).
    for name in found:
        optional = f"-{name}" in SYSCTLS.read_text()
        assert optional or Path("/proc/sys", *name.split(".")).exists(), name


def test_the_example_config_matches_the_proxy() -> None:
    config = load_config(DEPLOY / "pychat.toml", env={})
    site = (DEPLOY / "nginx" / "pychat.conf").read_text()
    name = re.search(r"server_name (\S+);", site)
    assert name is not None
    assert config.public_ws_url == f"wss://{name.group(1)}/ws" and config.origins == [
        f"https://{name.group(1)}"
    ]
    assert config.host == "127.0.0.1"
    upstreams = (DEPLOY / "nginx" / "upstream.conf").read_text()
    assert (
        f"server 127.0.0.1:{config.port};" in upstreams and f"server 127.0.0.1:{config.ws_port};" in upstreams
    )
