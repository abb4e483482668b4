"""deploy/ agrees with the code: the bridge configs validate against the real
settings model, and ports, probes, grace periods, HAProxy backends and the Kafka
replication settings match those configs. No servers, no Docker: files only."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.cluster.cluster_config import parse_cluster_config
from bridge.config import ENV_PREFIX, NON_SETTING_ENV, SETTING_NAMES, Settings, build_settings
from bridge.errors import ConfigError

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
HAPROXY_CFG = COMPOSE_DIR / "haproxy.cfg"
K8S = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"

#: Bridge instance settings files (deploy/kubernetes' is inside the ConfigMap).
BRIDGE_CONFIGS = (COMPOSE_DIR / "bridge.yaml", DEPLOY / "config" / "bridge.example.yaml")
CLUSTER_CONFIGS = (DEPLOY / "config" / "cluster.example.yaml",)
CONFIGMAP_KEY = "bridge.yaml"

#: Margin on top of the stop's own bounds for flushing Kafka and leaving ZooKeeper.
STOP_MARGIN_S = 10.0


# --- helpers ------------------------------------------------------------------------------


def _mapping(value: object, what: str) -> dict[str, Any]:
    assert isinstance(value, dict), f"{what}: expected a mapping, got {type(value).__name__}"
    return {str(k): v for k, v in value.items()}


def _list(value: object, what: str) -> list[Any]:
    assert isinstance(value, list), f"{what}: expected a list, got {type(value).__name__}"
    return value


def _documents(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _seconds(text: str) -> float:
    """A duration as compose and HAProxy write it: ``60s``, ``1m30s``, ``1h``, ``500ms``."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _mebibytes(quantity: str) -> float:
    suffixes = {"Ki": 1 / 1024, "Mi": 1.0, "Gi": 1024.0, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    for suffix, factor in suffixes.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    return float(quantity) / 2**20


def _cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _stop_budget_s(settings: Settings) -> float:
    """What a graceful stop may take: the MLLP drain, FHIR requests in flight (each
    waits at most one publish timeout), the spool's drain (spool mode), a margin."""
    spool = settings.drain_timeout_s if settings.ack_mode == "spool" else 0.0
    return settings.drain_timeout_s + settings.kafka_publish_timeout_s + spool + STOP_MARGIN_S


def _host_ports(servers: str) -> set[str]:
    return {s.strip() for s in servers.split(",")}


# --- loaded once ---------------------------------------------------------------------------


def _k8s_objects() -> list[dict[str, Any]]:
    objects = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _documents(path):
            objects.append(_mapping(doc, str(path)))
    return objects


def _k8s(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o
        for o in _k8s_objects()
        if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _configmap_text() -> str:
    data = _mapping(_k8s("ConfigMap")["data"], "ConfigMap data")
    text = data[CONFIGMAP_KEY]
    assert isinstance(text, str)
    return text


def _pod_spec() -> dict[str, Any]:
    return _mapping(_k8s("Deployment")["spec"]["template"]["spec"], "pod spec")


def _container() -> dict[str, Any]:
    containers = _list(_pod_spec()["containers"], "containers")
    assert len(containers) == 1
    return _mapping(containers[0], "container")


def _container_port(name_or_number: object) -> int:
    """A probe's or Service's port (a name or a number) as the container's port number."""
    ports = {p["name"]: int(p["containerPort"]) for p in _container()["ports"]}
    if isinstance(name_or_number, int):
        assert name_or_number in ports.values()
        return name_or_number
    assert name_or_number in ports, f"no container port named {name_or_number!r}"
    return ports[str(name_or_number)]


def _compose() -> dict[str, Any]:
    return _mapping(yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8")), str(COMPOSE_FILE))


def _services(pattern: str) -> dict[str, dict[str, Any]]:
    services = _mapping(_compose()["services"], "services")
    return {
        name: _mapping(service, name)
        for name, service in services.items()
        if re.fullmatch(pattern, name)
    }


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in _mapping(service["environment"], "environment").items()}


def _haproxy() -> dict[tuple[str, str], list[str]]:
    """haproxy.cfg as {(section kind, name): [directive lines]}, comments dropped."""
    sections: dict[tuple[str, str], list[str]] = {}
    current: list[str] = []
    for raw in HAPROXY_CFG.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not raw[0].isspace():
            kind, _, name = line.partition(" ")
            current = sections.setdefault((kind, name.strip()), [])
        else:
            current.append(line)
    return sections


def _directive(lines: list[str], prefix: str) -> str:
    found = [line for line in lines if line.startswith(prefix + " ") or line == prefix]
    assert len(found) == 1, f"expected one {prefix!r}, found {found}"
    return found[0][len(prefix) :].strip()


def _haproxy_servers(lines: list[str]) -> dict[str, list[str]]:
    """{server name: [address, options...]} of a backend."""
    return {
        words[1]: words[2:] for words in (line.split() for line in lines) if words[0] == "server"
    }


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, arguments = line.strip().partition(" ")
            result.append((instruction.upper(), " ".join(arguments.split())))
    return result


def _instructions(name: str) -> list[str]:
    return [arguments for instruction, arguments in _dockerfile() if instruction == name]


def _config_path_of(args: list[str]) -> str:
    assert "--config" in args, args
    return args[args.index("--config") + 1]


@pytest.fixture(scope="module")
def compose_settings() -> Settings:
    return build_settings(file=COMPOSE_DIR / "bridge.yaml", environ={})


@pytest.fixture(scope="module")
def k8s_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    path = tmp_path_factory.mktemp("configmap") / CONFIGMAP_KEY
    path.write_text(_configmap_text(), encoding="utf-8")
    return build_settings(file=path, environ={})


# --- every YAML file -----------------------------------------------------------------------


def test_every_yaml_file_under_deploy_parses_and_is_checked_here() -> None:
    found = sorted(DEPLOY.rglob("*.y*ml"))
    expected = {
        *BRIDGE_CONFIGS,
        *CLUSTER_CONFIGS,
        COMPOSE_FILE,
        *(K8S / f for f in ("namespace.yaml", "bridge-configmap.yaml")),
        *(K8S / f for f in ("bridge-deployment.yaml", "bridge-service.yaml", "bridge-pdb.yaml")),
    }
    assert set(found) == expected, "a YAML file under deploy/ that no test here checks"
    for path in found:
        documents = _documents(path)
        assert documents, f"{path} is empty"
        for doc in documents:
            _mapping(doc, str(path))


@pytest.mark.parametrize("path", BRIDGE_CONFIGS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_bridge_config_files_validate_against_the_settings_model(path: Path) -> None:
    settings = build_settings(file=path, environ={})
    assert settings.kafka_replication_factor == 3
    assert settings.kafka_idempotence is True


def test_the_configmap_bridge_config_validates_against_the_settings_model(
    k8s_settings: Settings,
) -> None:
    assert k8s_settings.cluster == "prod"
    assert k8s_settings.kafka_replication_factor == 3
    assert len(_host_ports(k8s_settings.zookeeper_servers)) == 3


@pytest.mark.parametrize("source", ["compose", "configmap"])
def test_a_misspelt_key_in_a_bridge_config_is_refused(source: str, tmp_path: Path) -> None:
    text = (
        (COMPOSE_DIR / "bridge.yaml").read_text(encoding="utf-8")
        if source == "compose"
        else _configmap_text()
    )
    path = tmp_path / "bridge.yaml"
    path.write_text(text + "\nkafka_replicaton_factor: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="kafka_replicaton_factor") as caught:
        build_settings(file=path, environ={})
    assert caught.value.key == "kafka_replicaton_factor"


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_cluster_config_examples_validate(path: Path) -> None:
    config = parse_cluster_config(path.read_text(encoding="utf-8"), where=str(path))
    assert config.channels


def test_production_bridge_configs_are_stateless_and_replicated(
    compose_settings: Settings, k8s_settings: Settings
) -> None:
    for settings, text in (
        (compose_settings, (COMPOSE_DIR / "bridge.yaml").read_text(encoding="utf-8")),
        (k8s_settings, _configmap_text()),
    ):
        # Every instance gets its own id from the orchestrator; one in the shared
        # file would make all instances the same ZooKeeper member.
        assert "instance_id" not in _mapping(yaml.safe_load(text), "bridge config")
        assert settings.ack_mode == "kafka"
        assert settings.kafka_provision_topics is True
        assert settings.kafka_replication_factor == 3
        assert settings.kafka_partitions % 3 == 0  # even leader spread over 3 brokers
        assert settings.drain_timeout_s >= settings.kafka_publish_timeout_s
        assert (settings.mllp_port, settings.http_port) == (2575, 8080)


# --- the image -----------------------------------------------------------------------------


def test_the_dockerfile_installs_the_package_and_runs_serve_as_non_root() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["name"] == "hl7bridge"
    assert "hl7bridge" in project["scripts"]

    assert _instructions("FROM") and all(
        f.split()[0] == "python:3.11-slim" for f in _instructions("FROM")
    )
    installs = [run for run in _instructions("RUN") if "pip install" in run]
    assert len(installs) == 1
    assert re.search(r"pip install \.(\s|$)", installs[0]), "pip install . (no extras)"
    assert "[" not in installs[0]
    copied = {word for c in _instructions("COPY") for word in c.split()[:-1]}
    assert {"pyproject.toml", "README.md", "bridge", "adapters"} <= copied

    user = _instructions("USER")[-1].split(":")[0]
    assert user not in ("root", "0")
    assert json.loads(_instructions("ENTRYPOINT")[-1]) == ["hl7bridge"]
    assert json.loads(_instructions("CMD")[-1]) == [
        "serve",
        "--config",
        "/etc/hl7bridge/bridge.yaml",
    ]
    exposed = {int(p) for e in _instructions("EXPOSE") for p in e.split()}
    for path in BRIDGE_CONFIGS:
        settings = build_settings(file=path, environ={})
        assert {settings.mllp_port, settings.http_port} <= exposed


# --- compose -------------------------------------------------------------------------------


def test_compose_bridges_are_built_from_the_dockerfile_with_the_compose_config(
    compose_settings: Settings,
) -> None:
    bridges = _services(r"bridge\d+")
    assert len(bridges) >= 2
    cmd_config = _config_path_of(json.loads(_instructions("CMD")[-1]))
    instance_ids = set()
    for name, service in bridges.items():
        build = _mapping(service["build"], f"{name}.build")
        context = (COMPOSE_DIR / build["context"]).resolve()
        assert context == REPO, f"{name}: the build context must be the repository root"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        assert f"./bridge.yaml:{cmd_config}:ro" in service["volumes"]
        env = _env(service)
        for key in env:
            if key.startswith(ENV_PREFIX) and key not in NON_SETTING_ENV:
                assert key[len(ENV_PREFIX) :].lower() in SETTING_NAMES, key
        instance_ids.add(env["HL7BRIDGE_INSTANCE_ID"])
        assert _seconds(service["stop_grace_period"]) > _stop_budget_s(compose_settings)
        needed = {*_services(r"zk\d+"), *_services(r"kafka\d+")}
        depends = _mapping(service["depends_on"], f"{name}.depends_on")
        assert set(depends) == needed
        assert all(d["condition"] == "service_healthy" for d in depends.values())
    assert len(instance_ids) == len(bridges)


def test_compose_zookeeper_is_an_ensemble_of_three_the_bridges_use(
    compose_settings: Settings,
) -> None:
    zookeepers = _services(r"zk\d+")
    assert len(zookeepers) == 3
    servers_lines = {_env(s)["ZOO_SERVERS"] for s in zookeepers.values()}
    assert len(servers_lines) == 1
    members = {}
    for entry in servers_lines.pop().split():
        match = re.fullmatch(r"server\.(\d+)=([\w.-]+):2888:3888;(\d+)", entry)
        assert match, entry
        members[match[1]] = (match[2], int(match[3]))
    for name, service in zookeepers.items():
        assert service["image"] == "zookeeper:3.8"
        assert members[_env(service)["ZOO_MY_ID"]][0] == name
    assert _host_ports(compose_settings.zookeeper_servers) == {
        f"{host}:{port}" for host, port in members.values()
    }


def test_compose_kafka_replicates_three_times_with_two_in_sync(
    compose_settings: Settings,
) -> None:
    brokers = _services(r"kafka\d+")
    assert len(brokers) == 3
    envs = {name: _env(service) for name, service in brokers.items()}
    assert len({env["CLUSTER_ID"] for env in envs.values()}) == 1
    node_ids = {name: env["KAFKA_NODE_ID"] for name, env in envs.items()}
    assert len(set(node_ids.values())) == 3
    voters = {f"{node_ids[name]}@{name}:9093" for name in brokers}
    advertised = set()
    for name, env in envs.items():
        assert brokers[name]["image"] == "apache/kafka:3.8.0"
        assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
        assert set(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == voters
        replication = int(env["KAFKA_DEFAULT_REPLICATION_FACTOR"])
        min_isr = int(env["KAFKA_MIN_INSYNC_REPLICAS"])
        assert (replication, min_isr) == (3, 2)
        assert int(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == 3
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
        assert env["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false"
        assert any(v.endswith(":" + env["KAFKA_LOG_DIRS"]) for v in brokers[name]["volumes"])
        listener = env["KAFKA_ADVERTISED_LISTENERS"]
        assert listener.startswith("PLAINTEXT://")
        advertised.add(listener.removeprefix("PLAINTEXT://"))
    # acks=all survives one broker down: replication minus min ISR is one.
    assert compose_settings.kafka_replication_factor == len(brokers)
    assert _host_ports(compose_settings.kafka) == advertised


def test_haproxy_balances_every_bridge_with_readyz_checks(compose_settings: Settings) -> None:
    sections = _haproxy()
    bridges = set(_services(r"bridge\d+"))
    mllp_port, http_port = compose_settings.mllp_port, compose_settings.http_port
    frontends = {name: lines for (kind, name), lines in sections.items() if kind == "frontend"}
    by_backend = {
        _directive(lines, "default_backend"): lines
        for lines in frontends.values()
        if any(line.startswith("default_backend") for line in lines)
    }
    assert len(by_backend) == 2
    modes = {}
    for backend, front in by_backend.items():
        back = sections[("backend", backend)]
        mode = _directive(back, "mode")
        assert _directive(front, "mode") == mode
        modes[mode] = (front, back)
        assert "option httpchk" in back
        assert _directive(back, "http-check send") == "meth GET uri /readyz"
        assert _directive(back, "http-check expect") == "status 200"

    front, back = modes["tcp"]
    assert _directive(front, "bind") == f":{mllp_port}"
    assert _directive(back, "balance") == "leastconn"
    servers = _haproxy_servers(back)
    assert set(servers) == bridges
    for name, words in servers.items():
        assert words[0] == f"{name}:{mllp_port}"
        assert "check" in words
        assert words[words.index("port") + 1] == str(http_port)
        # A PROXY header exactly when the bridges expect one (else every frame is lost).
        assert ("send-proxy-v2" in words) == compose_settings.mllp_proxy_protocol
    # The bridge, not the proxy, closes an idle MLLP connection.
    assert _seconds(_directive(front, "timeout client")) > compose_settings.idle_timeout_s
    assert _seconds(_directive(back, "timeout server")) > compose_settings.idle_timeout_s

    front, back = modes["http"]
    assert _directive(front, "bind") == f":{http_port}"
    assert "/fhir" in _directive(front, "http-request deny")
    # No request line in the log: FHIR paths carry resource ids.
    log_format = _directive(front, "log-format")
    assert not re.search(r"%(r|HU|HP|HPO|HQ)\b", log_format)
    servers = _haproxy_servers(back)
    assert set(servers) == bridges
    for name, words in servers.items():
        assert words[0] == f"{name}:{http_port}"
        assert "check" in words
    assert _seconds(_directive(back, "timeout server")) > (
        compose_settings.fhir_request_timeout_s + compose_settings.kafka_publish_timeout_s
    )

    haproxy = _services("haproxy")["haproxy"]
    assert "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in haproxy["volumes"]
    published = {int(str(p).rsplit(":", 1)[1]) for p in haproxy["ports"]}
    assert {mllp_port, http_port} <= published


# --- Kubernetes ----------------------------------------------------------------------------


def test_every_kubernetes_object_is_in_the_namespace() -> None:
    namespace = _k8s("Namespace")["metadata"]["name"]
    kinds = sorted(o["kind"] for o in _k8s_objects())
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Namespace",
        "PodDisruptionBudget",
        "Service",
        "Service",
    ]
    for obj in _k8s_objects():
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, obj["metadata"]["name"]


def test_probes_point_at_healthz_and_readyz_on_the_http_port(k8s_settings: Settings) -> None:
    container = _container()
    assert _container_port("http") == k8s_settings.http_port
    assert _container_port("mllp") == k8s_settings.mllp_port
    for probe, path in (
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
    ):
        get = _mapping(container[probe]["httpGet"], probe)
        assert get["path"] == path, probe
        assert _container_port(get["port"]) == k8s_settings.http_port, probe


def test_the_grace_period_outlasts_the_drain(k8s_settings: Settings) -> None:
    spec = _pod_spec()
    assert spec["terminationGracePeriodSeconds"] > _stop_budget_s(k8s_settings)
    deployment = _k8s("Deployment")["spec"]
    assert deployment["replicas"] >= 2
    assert deployment["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_pod_runs_the_configmap_config_as_non_root_read_only() -> None:
    spec = _pod_spec()
    container = _container()
    # Service links would inject HL7BRIDGE_MLLP_PORT=tcp://... (Service hl7bridge-mllp),
    # which the bridge reads as mllp_port and refuses.
    assert spec["enableServiceLinks"] is False
    dockerfile_user = int(_instructions("USER")[-1].split(":")[0])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == dockerfile_user
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]

    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    config_path = _config_path_of(container["args"])
    config_mount = mounts[config_path]
    assert config_mount["subPath"] == CONFIGMAP_KEY
    assert (
        volumes[config_mount["name"]]["configMap"]["name"]
        == (_k8s("ConfigMap")["metadata"]["name"])
    )
    # The only writable path: /tmp (multiprocessing's forkserver socket), per pod.
    writable = {path for path, m in mounts.items() if not m.get("readOnly")}
    assert writable == {"/tmp"}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


def test_the_instance_id_is_the_pod_name() -> None:
    env = {e["name"]: e for e in _container()["env"]}
    for name in env:
        assert name.startswith(ENV_PREFIX)
        assert name[len(ENV_PREFIX) :].lower() in SETTING_NAMES, name
    field = env["HL7BRIDGE_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.name"


def test_pods_spread_over_nodes() -> None:
    labels = _mapping(_k8s("Deployment")["spec"]["template"]["metadata"]["labels"], "labels")
    anti = _pod_spec()["affinity"]["podAntiAffinity"]
    terms = [
        t["podAffinityTerm"]
        for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])
    ] + list(anti.get("requiredDuringSchedulingIgnoredDuringExecution", []))
    assert terms
    for term in terms:
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"].items() <= labels.items()


def test_resources_cover_the_measured_footprint() -> None:
    resources = _container()["resources"]
    requests, limits = resources["requests"], resources["limits"]
    # docs/benchmarks.md soak: bridge process plus mapping worker up to ~145 MB,
    # ~0.75 core at 500 msgs/s.
    assert _mebibytes(requests["memory"]) >= 256
    assert _mebibytes(limits["memory"]) >= 2 * _mebibytes(requests["memory"])
    assert _cores(requests["cpu"]) >= 1
    assert _cores(limits["cpu"]) >= _cores(requests["cpu"])


def test_the_services_expose_the_configured_ports(k8s_settings: Settings) -> None:
    labels = _mapping(_k8s("Deployment")["spec"]["template"]["metadata"]["labels"], "labels")
    services = [o for o in _k8s_objects() if o["kind"] == "Service"]
    exposed = {}
    for service in services:
        spec = service["spec"]
        assert spec["selector"].items() <= labels.items()
        assert spec["sessionAffinity"] == "None"
        for port in spec["ports"]:
            assert port["protocol"] == "TCP"
            assert _container_port(port["targetPort"]) == port["port"]
            exposed[port["name"]] = (port["port"], spec["type"])
    assert exposed == {
        "mllp": (k8s_settings.mllp_port, "LoadBalancer"),
        "http": (k8s_settings.http_port, "ClusterIP"),
    }


def test_the_disruption_budget_keeps_one_instance() -> None:
    labels = _mapping(_k8s("Deployment")["spec"]["template"]["metadata"]["labels"], "labels")
    spec = _k8s("PodDisruptionBudget")["spec"]
    assert spec["minAvailable"] == 1
    assert spec["minAvailable"] < _k8s("Deployment")["spec"]["replicas"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
