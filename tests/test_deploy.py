"""Offline checks of deploy/: manifests, alert rules, dashboard, compose file and Dockerfile.

Nothing here talks to a cluster or a Docker engine. Kubernetes manifests are validated against
the Kubernetes JSON schemas shipped in the ``kubernetes-validate`` wheel; the Prometheus Operator
custom resources (no schema there) are checked field by field. Metric names and label names in
every alert and dashboard expression are checked against what ``worker.ops.metrics.Metrics``
really exports, so a renamed metric breaks this suite rather than a page at 3 a.m.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from cryptography.fernet import Fernet
from prometheus_client.metrics import MetricWrapperBase

from worker import cli
from worker.ops.metrics import Metrics
from worker.pipeline import topology
from worker.pipeline.outcome import Verdict
from worker.settings import Settings, SettingsError

Manifest = dict[str, Any]

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "kustomize" / "base"
OVERLAYS = DEPLOY / "kustomize" / "overlays"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
OPERATIONS = DEPLOY.parent / "README.md"

# The oldest Kubernetes minor the manifests promise to work on.
KUBERNETES_VERSION = "1.29.0"
CUSTOM_RESOURCES = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
# Labels Prometheus adds from the scrape target, not from the service's registry.
TARGET_LABELS = frozenset({"namespace", "pod", "job", "instance", "service", "container"})
# "skipped" is recorded when the endpoint was disabled or deleted before the attempt
# (worker/pipeline/attempts.py); the other outcomes are the verdicts of worker/pipeline/outcome.py.
OUTCOMES = frozenset({v.value for v in Verdict} | {"skipped"})
QUEUES = frozenset(
    {
        topology.EVENTS_QUEUE,
        topology.DELIVERIES_QUEUE,
        *(topology.deferred_queue_name(d) for d in topology.DEFER_TIERS),
        topology.DEAD_QUEUE,
        *(topology.retry_queue_name(d) for d in Settings.model_fields["retry_schedule"].default),
    }
)
KNOWN_LABEL_VALUES = {"outcome": OUTCOMES, "queue": QUEUES}
EXPECTED_ALERTS = {
    "SellfernWebhooksDeliveryFailureRatioHigh",
    "SellfernWebhooksDeadLetterGrowing",
    "SellfernWebhooksDeliveryLagHigh",
    "SellfernWebhooksNoConsumers",
    "SellfernWebhooksEndpointAutoDisabled",
    "SellfernWebhooksQueueBacklogGrowing",
    "SellfernWebhooksParkedBacklogGrowing",
}
# Private, cluster and metadata ranges that the internet egress rule must not reach.
EXCLUDED_FROM_INTERNET = {
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
}


# --- loading -------------------------------------------------------------------------------


def _yaml_documents(path: Path) -> list[Manifest]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert all(isinstance(doc, dict) for doc in docs), f"{path.name}: every document is a mapping"
    return docs


def _manifest_files() -> list[Path]:
    return sorted(p for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")


def _manifests() -> list[tuple[Path, Manifest]]:
    return [(path, doc) for path in _manifest_files() for doc in _yaml_documents(path)]


def _applied() -> list[Manifest]:
    """What `kubectl apply -k` creates: the resources listed in kustomization.yaml."""
    listed = _kustomization()["resources"]
    return [doc for name in listed for doc in _yaml_documents(BASE / name)]


def _kustomization() -> Manifest:
    (doc,) = _yaml_documents(BASE / "kustomization.yaml")
    return doc


def _one(kind: str, name: str) -> Manifest:
    found = [d for d in _applied() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"exactly one {kind} {name}"
    return found[0]


def _workloads() -> list[Manifest]:
    return [d for d in _applied() if d["kind"] in ("Deployment", "Job")]


def _containers(workload: Manifest) -> list[Manifest]:
    spec = workload["spec"]["template"]["spec"]
    containers: list[Manifest] = spec["containers"] + spec.get("initContainers", [])
    return containers


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels and In/NotIn/Exists) matches labels."""
    match_labels = selector.get("matchLabels", {})
    if any(labels.get(key) != value for key, value in match_labels.items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not ok:
            return False
    return True


def _pod_labels(workload: Manifest) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


# --- metrics the service exports -----------------------------------------------------------


def _exported_metrics() -> dict[str, frozenset[str]]:
    """Every sample name the service exports, with its label names (``le`` for buckets).

    Each labelled metric gets one child so that ``registry.collect()`` shows its samples as a
    scrape would: ``_total``/``_created`` for counters, ``_bucket``/``_sum``/``_count`` for
    histograms, the bare name for gauges.
    """
    metrics = Metrics()
    for collector in vars(metrics).values():
        if isinstance(collector, MetricWrapperBase) and collector._labelnames:
            collector.labels(*("x" for _ in collector._labelnames))
    exported: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in exported.items()}


EXPORTED = _exported_metrics()
_METRIC_TOKEN = re.compile(r"\bsellfern_\w*")
_SELECTOR = re.compile(r"\b(sellfern_\w+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def _value_problem(label: str, operator: str, raw: str) -> str | None:
    """A matcher on ``outcome`` or ``queue`` must be able to match a value the service uses."""
    value = raw.replace("\\\\", "\\")  # PromQL string escapes: "\\." is the regex \.
    if label not in KNOWN_LABEL_VALUES or "$" in value:
        return None
    values = KNOWN_LABEL_VALUES[label]
    if operator in ("=~", "!~"):
        matched = any(re.fullmatch(value, v) for v in values)
    else:
        matched = value in values
    return None if matched else f"{label}{operator}{raw!r} matches no {label} the service uses"


def _selector_problems(expr: str) -> Iterator[str]:
    for name, matchers in _SELECTOR.findall(expr):
        allowed = EXPORTED.get(name, frozenset()) | TARGET_LABELS
        for label, operator, raw in _MATCHER.findall(matchers):
            if label not in allowed:
                yield f"{name} has no label {label!r}"
            problem = _value_problem(label, operator, raw)
            if problem:
                yield problem


def expression_problems(expr: str) -> list[str]:
    """What in a PromQL expression does not match the service's metrics; empty when all does."""
    names = _METRIC_TOKEN.findall(expr)
    if not names:
        return ["uses no sellfern_webhooks metric"]
    problems = [f"{name} is not exported" for name in names if name not in EXPORTED]
    problems += _selector_problems(expr)
    labels_in_expr = TARGET_LABELS.union(*(EXPORTED[n] for n in names if n in EXPORTED))
    problems += [
        f"groups by {label!r}, which no metric here has"
        for grouping in _GROUPING.findall(expr)
        for label in (part.strip() for part in grouping.split(","))
        if label and label not in labels_in_expr
    ]
    return problems


def test_the_exported_metric_list_is_what_a_scrape_shows() -> None:
    assert "sellfern_webhooks_delivery_attempts_total" in EXPORTED
    assert "sellfern_webhooks_delivery_attempts" not in EXPORTED
    assert "le" in EXPORTED["sellfern_webhooks_delivery_lag_seconds_bucket"]
    assert EXPORTED["sellfern_webhooks_queue_consumers"] == {"queue"}


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("rate(sellfern_webhooks_delivery_attempts[5m])", "not exported"),
        ("rate(sellfern_webhook_dead_lettered_total[5m])", "not exported"),
        ('sellfern_webhooks_queue_messages{queue_name="x"}', "no label"),
        ('sellfern_webhooks_queue_messages{queue="webhooks.event"}', "matches no queue"),
        ('sellfern_webhooks_delivery_attempts_total{outcome=~"ok|error"}', "matches no outcome"),
        ("sum by (status) (sellfern_webhooks_delivery_attempts_total)", "groups by 'status'"),
        ("up == 0", "uses no sellfern_webhooks metric"),
    ],
)
def test_the_expression_check_catches_mistakes(expr: str, problem: str) -> None:
    assert any(problem in p for p in expression_problems(expr)), expression_problems(expr)


# --- Kubernetes manifests ------------------------------------------------------------------


@pytest.mark.parametrize(
    "manifest",
    [
        pytest.param(doc, id=f"{path.name}:{doc['kind']}/{doc['metadata']['name']}")
        for path, doc in _manifests()
        if (doc["apiVersion"], doc["kind"]) not in CUSTOM_RESOURCES
    ],
)
def test_manifest_validates_against_the_kubernetes_schema(manifest: Manifest) -> None:
    # strict: unknown fields (a typo such as `readinesProbe`) are errors, as with kubectl.
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_exactly_the_manifests_present() -> None:
    kustomization = _kustomization()
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "no resource is listed twice"
    present = {p.name for p in _manifest_files()}
    templates = {name for name in present if name.endswith(".example.yaml")}
    # Templates are never applied: they would overwrite the real Secret with placeholders.
    assert templates == {"secret.example.yaml"}
    assert set(listed) == present - templates
    for image in kustomization["images"]:
        assert image["newTag"] not in ("", "latest")


def test_every_workload_runs_a_real_cli_command() -> None:
    expected = {
        "sellfern-webhooks-api": "api",
        "sellfern-webhooks-worker": "worker",
        "sellfern-webhooks-migrate": "migrate",
    }
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    images = {image["name"] for image in _kustomization()["images"]}
    seen = {}
    for workload in _workloads():
        (container,) = _containers(workload)
        assert container["image"] in images, "the image is the one kustomize pins"
        assert container["command"] == ["sellfern-webhooks"]
        assert container["command"][0] in scripts
        cli._parser().parse_args(container["args"])  # exits (fails the test) if unknown
        seen[workload["metadata"]["name"]] = container["args"][0]
    assert seen == expected


def test_every_container_has_resources_and_a_locked_down_security_context() -> None:
    for workload in _workloads():
        pod = workload["spec"]["template"]["spec"]
        name = workload["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False, name
        pod_security = pod["securityContext"]
        assert pod_security["runAsNonRoot"] is True, name
        assert pod_security["runAsUser"] != 0, name
        for container in _containers(workload):
            where = f"{name}/{container['name']}"
            resources = container["resources"]
            assert {"cpu", "memory"} <= resources["requests"].keys(), where
            assert {"cpu", "memory"} <= resources["limits"].keys(), where
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True, where
            assert security.get("runAsUser", pod_security["runAsUser"]) != 0, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in security["capabilities"], where
            assert security["seccompProfile"]["type"] == "RuntimeDefault", where
            # With a read-only root, the only writable place is an emptyDir.
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, where  # noqa: S108 - a path in the manifest, not a file here


@pytest.mark.parametrize(
    ("deployment", "port"),
    [
        ("sellfern-webhooks-api", Settings.model_fields["api_port"].default),
        ("sellfern-webhooks-worker", Settings.model_fields["metrics_port"].default),
    ],
)
def test_long_running_containers_probe_health_and_readiness(deployment: str, port: int) -> None:
    (container,) = _containers(_one("Deployment", deployment))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert set(ports.values()) == {port}
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == port, probe
    # A readiness probe that times out before the 5 s database check gives up flaps.
    assert container["readinessProbe"]["timeoutSeconds"] > 5


def test_worker_grace_period_outlasts_the_drain() -> None:
    pod = _one("Deployment", "sellfern-webhooks-worker")["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    default_drain = Settings.model_fields["shutdown_drain_seconds"].default
    configured = _one("ConfigMap", "sellfern-webhooks-config")["data"]
    drain = float(configured["SELLFERN_WEBHOOKS_SHUTDOWN_DRAIN_SECONDS"])
    assert grace > default_drain
    # PipelineWorker.stop drains for `drain`, then up to 5 s for the cancelled handlers; the
    # attempt writer's flush and the channel closes need time after that.
    assert grace >= drain + 5 + 10


def test_config_map_and_secret_make_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _one("ConfigMap", "sellfern-webhooks-config")["data"]
    (secret,) = _yaml_documents(BASE / "secret.example.yaml")
    secrets = secret["stringData"]
    design_section_7 = {
        "DATABASE_URL",
        "AMQP_URL",
        "API_HOST",
        "API_PORT",
        "METRICS_PORT",
        "RETRY_SCHEDULE",
        "DELIVERY_TIMEOUT",
        "ALLOWED_PRIVATE_NETWORKS",
        "LOG_FORMAT",
        "LOG_LEVEL",
    }
    keys = {k.removeprefix("SELLFERN_WEBHOOKS_") for k in [*config, *secrets]}
    assert design_section_7 <= keys
    assert keys <= {name.upper() for name in Settings.model_fields}, "no key the service ignores"
    assert not {"DATABASE_URL", "AMQP_URL"} & {k.removeprefix("SELLFERN_WEBHOOKS_") for k in config}
    for workload in _workloads():
        (container,) = _containers(workload)
        sources = container["envFrom"]
        assert {"configMapRef": {"name": "sellfern-webhooks-config"}} in sources
        assert {"secretRef": {"name": secret["metadata"]["name"]}} in sources

    for variable in [k for k in os.environ if k.startswith("SELLFERN_WEBHOOKS_")]:
        monkeypatch.delenv(variable)
    # The template's key is a placeholder on purpose; an operator puts a real one there.
    assert secrets["SELLFERN_WEBHOOKS_SECRET_KEYS"] == "CHANGE-ME"
    secrets = {**secrets, "SELLFERN_WEBHOOKS_SECRET_KEYS": Fernet.generate_key().decode()}
    for key, value in {**config, **secrets}.items():
        monkeypatch.setenv(key, value)
    try:
        settings = Settings.load()
    except SettingsError as exc:  # the message names the bad variable
        pytest.fail(str(exc))
    assert not settings.is_sqlite, "replicas share one PostgreSQL database"
    assert settings.api_port == 8080
    assert settings.metrics_port == 9090


def test_services_pdbs_and_hpa_point_at_real_pods() -> None:
    deployments = {d["metadata"]["name"]: d for d in _applied() if d["kind"] == "Deployment"}
    for service in (d for d in _applied() if d["kind"] == "Service"):
        selector = {"matchLabels": service["spec"]["selector"]}
        targets = [d for d in deployments.values() if _selects(selector, _pod_labels(d))]
        assert len(targets) == 1, service["metadata"]["name"]
        (container,) = _containers(targets[0])
        port_names = {p["name"] for p in container["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names
    for pdb in (d for d in _applied() if d["kind"] == "PodDisruptionBudget"):
        targets = [
            d for d in deployments.values() if _selects(pdb["spec"]["selector"], _pod_labels(d))
        ]
        assert len(targets) == 1, pdb["metadata"]["name"]

    hpa = _one("HorizontalPodAutoscaler", "sellfern-webhooks-worker")
    target = hpa["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment"
    worker = deployments[target["name"]]
    assert _pod_labels(worker)["app.kubernetes.io/component"] == "worker"
    assert "replicas" not in worker["spec"], "the HPA owns the worker's replica count"
    assert hpa["spec"]["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    for deployment in deployments.values():
        # The HPA's utilisation target is a share of the CPU request.
        (container,) = _containers(deployment)
        assert container["resources"]["requests"]["cpu"]


def _egress_policies() -> list[Manifest]:
    return [d for d in _applied() if d["kind"] == "NetworkPolicy"]


def _allowed_ports(policies: Iterable[Manifest], labels: Mapping[str, str]) -> Iterator[Manifest]:
    for policy in policies:
        if _selects(policy["spec"]["podSelector"], labels):
            yield from policy["spec"]["egress"]


def _within(inner: str, outer: str) -> bool:
    a, b = ipaddress.ip_network(inner), ipaddress.ip_network(outer)
    if isinstance(a, ipaddress.IPv4Network) and isinstance(b, ipaddress.IPv4Network):
        return a.subnet_of(b)
    if isinstance(a, ipaddress.IPv6Network) and isinstance(b, ipaddress.IPv6Network):
        return a.subnet_of(b)
    return False


def test_network_policy_lets_deliveries_out_but_not_inside() -> None:
    policies = _egress_policies()
    for policy in policies:
        assert policy["spec"]["policyTypes"] == ["Egress"]
        for rule in policy["spec"]["egress"]:
            # A rule without `to` or `ports` would allow every destination or every port.
            assert rule["to"], policy["metadata"]["name"]
            assert rule["ports"], policy["metadata"]["name"]

    for workload in ("sellfern-webhooks-api", "sellfern-webhooks-worker"):
        labels = _pod_labels(_one("Deployment", workload))
        rules = list(_allowed_ports(policies, labels))
        internet = [
            rule
            for rule in rules
            for peer in rule["to"]
            if peer.get("ipBlock", {}).get("cidr") == "0.0.0.0/0"
        ]
        assert len(internet) == 1, workload
        (rule,) = internet
        assert {p["port"] for p in rule["ports"]} == {443, 80}
        for peer in rule["to"]:
            block = peer["ipBlock"]
            # Kubernetes requires every exception to lie inside the block's CIDR.
            assert all(_within(e, block["cidr"]) for e in block["except"]), block
            if ipaddress.ip_network(block["cidr"]).version == 4:
                assert set(block["except"]) >= EXCLUDED_FROM_INTERNET, workload
        ports = {(p.get("protocol", "TCP"), p["port"]) for r in rules for p in r["ports"]}
        assert {("UDP", 53), ("TCP", 5432), ("TCP", 5672)} <= ports, workload

    # The migration Job needs the database but has no business on the internet.
    job_rules = list(
        _allowed_ports(policies, _pod_labels(_one("Job", "sellfern-webhooks-migrate")))
    )
    assert any(p["port"] == 5432 for r in job_rules for p in r["ports"])
    assert not any("ipBlock" in peer for r in job_rules for peer in r["to"])


def test_service_monitor_scrapes_both_services() -> None:
    (monitor,) = [d for d in _applied() if d["kind"] == "ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    spec = monitor["spec"]
    endpoints = spec["endpoints"]
    assert all(e["path"] == "/metrics" for e in endpoints)
    endpoint_ports = {e["port"] for e in endpoints}
    services = [d for d in _applied() if d["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {
        "sellfern-webhooks-api",
        "sellfern-webhooks-worker",
    }
    for service in services:
        assert _selects(spec["selector"], service["metadata"]["labels"])
        assert endpoint_ports & {p["name"] for p in service["spec"]["ports"]}


# --- overlays ------------------------------------------------------------------------------

RENDERED_FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources", "patches", "images"}


def _merge(base: Any, patch: Any) -> Any:  # noqa: ANN401 - any YAML value
    """A strategic-merge patch as the overlays here write them: maps merge key by key; any other
    value, lists included, replaces the one it patches."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: _merge(base[k], v) if k in base else v for k, v in patch.items()}}
    return patch


def _render(directory: Path) -> list[Manifest]:
    """What `kubectl kustomize directory` builds, for the fields these kustomizations use:
    resources (files, or directories with a kustomization), patches by kind and name, the
    namespace, metadata labels and images. Any other field fails, rather than being ignored."""
    (kustomization,) = _yaml_documents(directory / "kustomization.yaml")
    assert set(kustomization) <= RENDERED_FIELDS, f"{directory}: a field _render does not apply"
    docs: list[Manifest] = []
    for entry in kustomization["resources"]:
        path = directory / entry
        docs += _render(path) if path.is_dir() else _yaml_documents(path)
    for entry in kustomization.get("patches", []):
        assert set(entry) == {"path"}, entry
        (patch,) = _yaml_documents(directory / entry["path"])
        key = (patch["kind"], patch["metadata"]["name"])
        found = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) == key]
        assert len(found) == 1, f"{entry['path']} patches exactly one resource"
        docs[found[0]] = _merge(docs[found[0]], patch)
    images = {i["name"]: i for i in kustomization.get("images", [])}
    for doc in docs:
        metadata = doc["metadata"]
        if "namespace" in kustomization:
            metadata["namespace"] = kustomization["namespace"]
        for labels in kustomization.get("labels", []):
            metadata["labels"] = {**metadata.get("labels", {}), **labels["pairs"]}
        if doc["kind"] in ("Deployment", "Job"):
            for container in _containers(doc):
                if container["image"] in images:
                    image = images[container["image"]]
                    name = image.get("newName", image["name"])
                    container["image"] = f"{name}:{image['newTag']}"
    return docs


def _overlays() -> list[Path]:
    return sorted(path.parent for path in OVERLAYS.glob("*/kustomization.yaml"))


def test_rendering_the_base_applies_what_kustomize_would() -> None:
    rendered = _render(BASE)
    assert [(d["kind"], d["metadata"]["name"]) for d in rendered] == [
        (d["kind"], d["metadata"]["name"]) for d in _applied()
    ]
    assert {d["metadata"]["namespace"] for d in rendered} == {_kustomization()["namespace"]}
    worker = next(d for d in rendered if d["metadata"]["name"] == "sellfern-webhooks-worker")
    assert (
        _containers(worker)[0]["image"]
        == "sellfern-webhooks:" + _kustomization()["images"][0]["newTag"]
    )
    assert "egress-proxy" in {overlay.name for overlay in _overlays()}


@pytest.mark.parametrize(
    "manifest",
    [
        pytest.param(doc, id=f"{overlay.name}:{doc['kind']}/{doc['metadata']['name']}")
        for overlay in _overlays()
        for doc in _render(overlay)
        if (doc["apiVersion"], doc["kind"]) not in CUSTOM_RESOURCES
    ],
)
def test_overlay_renders_manifests_that_validate(manifest: Manifest) -> None:
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_egress_proxy_overlay_lets_the_worker_reach_only_the_proxy_and_its_backends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rendered = _render(OVERLAYS / "egress-proxy")
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in rendered}
    config = by_name["ConfigMap", "sellfern-webhooks-config"]["data"]
    base_config = _one("ConfigMap", "sellfern-webhooks-config")["data"]
    assert config.items() > base_config.items(), "the base's settings stay as they are"
    proxy = urlsplit(config["SELLFERN_WEBHOOKS_EGRESS_PROXY_URL"])
    policies = [d for d in rendered if d["kind"] == "NetworkPolicy"]
    for policy in policies:
        assert all(rule["to"] and rule["ports"] for rule in policy["spec"]["egress"])

    worker = _pod_labels(by_name["Deployment", "sellfern-webhooks-worker"])
    rules = list(_allowed_ports(policies, worker))
    assert not [peer for rule in rules for peer in rule["to"] if "ipBlock" in peer], (
        "the worker has no direct route to any address block, the internet included"
    )
    ports = {(p.get("protocol", "TCP"), p["port"]) for rule in rules for p in rule["ports"]}
    # DNS, PostgreSQL, RabbitMQ and the proxy (its Service exposes the container's port).
    assert ports == {("UDP", 53), ("TCP", 53), ("TCP", 5432), ("TCP", 5672), ("TCP", proxy.port)}
    (to_proxy,) = [r for r in rules if {p["port"] for p in r["ports"]} == {proxy.port}]
    assert all(peer["podSelector"]["matchLabels"] for peer in to_proxy["to"])
    assert all("namespaceSelector" in peer for peer in to_proxy["to"])

    # The API's test sends and redeliveries take the proxy as well.
    api = _pod_labels(by_name["Deployment", "sellfern-webhooks-api"])
    assert to_proxy in list(_allowed_ports(policies, api))
    # The migration Job still reaches nothing outside the cluster.
    job = _pod_labels(by_name["Job", "sellfern-webhooks-migrate"])
    assert not [
        p for r in _allowed_ports(policies, job) for p in r["ports"] if p["port"] == proxy.port
    ]

    for variable in [k for k in os.environ if k.startswith("SELLFERN_WEBHOOKS_")]:
        monkeypatch.delenv(variable)
    (secret,) = _yaml_documents(BASE / "secret.example.yaml")
    secrets = {
        **secret["stringData"],
        "SELLFERN_WEBHOOKS_SECRET_KEYS": Fernet.generate_key().decode(),
    }
    for key, value in {**config, **secrets}.items():
        monkeypatch.setenv(key, value)
    try:
        settings = Settings.load()
    except SettingsError as exc:  # the message names the bad variable
        pytest.fail(str(exc))
    assert settings.egress_proxy_url == config["SELLFERN_WEBHOOKS_EGRESS_PROXY_URL"]


# --- Prometheus rules and Grafana dashboard ------------------------------------------------


def _rules() -> list[Manifest]:
    (rule_file,) = _yaml_documents(ALERTS)
    assert rule_file["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule_file["kind"] == "PrometheusRule"
    assert rule_file["metadata"]["name"]
    groups = rule_file["spec"]["groups"]
    assert all(group["name"] and group["rules"] for group in groups)
    rules: list[Manifest] = [rule for group in groups for rule in group["rules"]]
    return rules


def test_alert_rules_are_complete() -> None:
    rules = _rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert set(names) == EXPECTED_ALERTS
    for rule in rules:
        assert rule["expr"].strip(), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert len(rule["annotations"]["runbook"]) > 40, rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


@pytest.mark.parametrize("rule", _rules(), ids=lambda rule: rule["alert"])
def test_alert_expression_uses_exported_metrics(rule: Manifest) -> None:
    assert expression_problems(rule["expr"]) == []


def test_lag_alert_is_a_histogram_quantile_and_no_consumer_alert_covers_no_worker() -> None:
    by_name = {rule["alert"]: rule["expr"] for rule in _rules()}
    lag = by_name["SellfernWebhooksDeliveryLagHigh"]
    assert "histogram_quantile" in lag
    assert "sellfern_webhooks_delivery_lag_seconds_bucket" in lag
    no_consumers = by_name["SellfernWebhooksNoConsumers"]
    # Only workers export the queue gauges: with no worker at all, only absent() fires.
    assert "absent(sellfern_webhooks_queue_consumers" in no_consumers
    for queue in (topology.EVENTS_QUEUE, topology.DELIVERIES_QUEUE):
        assert re.search(re.escape(queue.split(".")[1]), no_consumers)


def _dashboard() -> Manifest:
    dashboard: Manifest = json.loads(DASHBOARD.read_text())
    return dashboard


def _dashboard_expressions() -> list[str]:
    panels = _dashboard()["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def test_dashboard_is_well_formed() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"]
    assert dashboard["title"]
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace"} <= variables
    used = " ".join(_dashboard_expressions())
    for metric in (
        "sellfern_webhooks_delivery_attempts_total",
        "sellfern_webhooks_delivery_attempt_duration_seconds_bucket",
        "sellfern_webhooks_delivery_lag_seconds_bucket",
        "sellfern_webhooks_queue_messages",
        "sellfern_webhooks_deliveries_in_flight",
        "sellfern_webhooks_dead_lettered_total",
        "sellfern_webhooks_http_requests_total",
        "sellfern_webhooks_http_request_duration_seconds_bucket",
    ):
        assert metric in used


@pytest.mark.parametrize("expr", _dashboard_expressions())
def test_dashboard_expression_uses_exported_metrics(expr: str) -> None:
    assert expression_problems(expr) == []


# --- compose and Dockerfile ----------------------------------------------------------------


def _compose() -> Manifest:
    (compose,) = _yaml_documents(COMPOSE)
    return compose


def test_compose_builds_the_dockerfile_and_starts_in_order() -> None:
    services = _compose()["services"]
    assert {"rabbitmq", "postgres", "migrate", "api", "worker"} <= services.keys()
    commands = {"migrate": ["migrate"], "api": ["api"], "worker": ["worker"]}
    for name, command in commands.items():
        service = services[name]
        build = service["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        assert service["command"] == command
        cli._parser().parse_args(command)
        assert all(key.startswith("SELLFERN_WEBHOOKS_") for key in service["environment"])
        assert service["read_only"] is True
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["rabbitmq"]["condition"] == "service_healthy"
        assert services[name]["healthcheck"]["test"]
    for name, service in services.items():
        for dependency, how in service.get("depends_on", {}).items():
            assert dependency in services, name
            if how["condition"] == "service_healthy":
                assert services[dependency]["healthcheck"]["test"], dependency
    grace = services["worker"]["stop_grace_period"]
    assert int(grace.removesuffix("s")) > Settings.model_fields["shutdown_drain_seconds"].default


def test_compose_pins_its_images_and_its_settings_are_valid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = _compose()["services"]
    for name in ("rabbitmq", "postgres"):
        image = services[name]["image"]
        _, _, tag = image.partition(":")
        assert re.match(r"\d+\.\d+", tag), f"{name} is pinned to a version: {image}"
    assert services["postgres"]["image"].startswith("postgres:16.")
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.13.")
    for variable in [k for k in os.environ if k.startswith("SELLFERN_WEBHOOKS_")]:
        monkeypatch.delenv(variable)
    for key, value in services["worker"]["environment"].items():
        monkeypatch.setenv(key, str(value))
    settings = Settings.load()
    assert settings.database_url.startswith("postgresql+asyncpg://")
    assert "@postgres:5432/" in settings.database_url
    assert "@rabbitmq:5672/" in settings.amqp_url


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        instruction, _, rest = stripped.partition(" ")
        instruction = instruction.upper()
        if instruction == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        if instruction == "FROM":
            rest = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest)
            stages.append([])
        if stages:
            stages[-1].append((instruction, rest.strip()))
    return stages


def test_dockerfile_is_multi_stage_pinned_and_runs_as_non_root() -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        base = stage[0][1].split()[0]
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base
    build, final = stages[0], stages[-1]
    assert any(i == "RUN" and "pip install ." in a for i, a in build)
    final_text = " ".join(a for _, a in final)
    assert "--from=build" in final_text
    for tool in ("apt-get install", "gcc", "build-essential", "pip install"):
        assert tool not in final_text, f"no {tool} in the final stage"
    users = [a for i, a in final if i == "USER"]
    assert users, "the final stage sets a user"
    assert users[-1].split(":")[0] not in ("root", "0")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (entrypoint,) = [json.loads(a) for i, a in final if i == "ENTRYPOINT"]
    assert entrypoint == ["sellfern-webhooks"]
    assert entrypoint[0] in scripts
    (command,) = [json.loads(a) for i, a in final if i == "CMD"]
    assert command == ["serve"]
    exposed = {int(p) for i, a in final if i == "EXPOSE" for p in a.split()}
    assert exposed == {
        Settings.model_fields["api_port"].default,
        Settings.model_fields["metrics_port"].default,
    }
    # The workload user of the manifests is the image's user.
    uid = int(users[-1].split(":")[0])
    for workload in _workloads():
        assert workload["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid


# --- documentation -------------------------------------------------------------------------


def test_operations_guide_covers_every_metric_and_alert() -> None:
    guide = OPERATIONS.read_text()
    families = {family.name for family in Metrics().registry.collect()}
    for family in families:
        assert f"`{family}" in guide, f"{family} is in the metrics table"
    for alert in EXPECTED_ALERTS:
        assert alert in guide, f"{alert} has a runbook line"
