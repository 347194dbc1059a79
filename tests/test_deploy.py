"""The team deployment (deploy/): the compose file, the load balancer, Prometheus and Grafana,
read as files (no container engine here) and checked against each other, against the image's
Dockerfile, and against a real proxy's /metrics."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import KEYS, Config, env_name, load, parse_duration
from tests.deployfiles import (
    DEPLOY,
    GRAFANA,
    REPLICAS,
    ROOT,
    compose,
    dashboard,
    dashboard_targets,
    haproxy_sections,
    parse,
    prometheus,
)
from tests.servers import ServerThread
from tests.test_image import steps

SERVICES: dict[str, Any] = compose()["services"]
BASE_CONFIG = ROOT / "config.container.toml"
IMAGE = load(env={}, base=BASE_CONFIG)
#: Settings of the shared tier (issue #14), named by the compose file before they exist on main.
SHARED_TIER_KEYS = {"redis_url", "secret_file"}
#: Labels Prometheus attaches to every series of a target (deploy/prometheus.yml).
TARGET_LABELS = {"job", "instance", "replica"}


def interpolated(value: object) -> str:
    """A compose value with ``${NAME:-default}`` replaced by its default (no other form used)."""
    text = re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(value))
    assert "$" not in text, f"unexpected interpolation in {value!r}"
    return text


def environment(service: str) -> dict[str, str]:
    return {k: interpolated(v) for k, v in SERVICES[service].get("environment", {}).items()}


def container_port(mapping: str) -> int:
    """The container side of a compose ``ports`` entry (``host:port:container``)."""
    return int(mapping.rsplit(":", 1)[1])


# --- compose.yaml ----------------------------------------------------------------------------


def test_two_replicas_of_the_repository_image() -> None:
    """cache-a and cache-b are built from the repository's Dockerfile as one image, reached only
    through the balancer, on the port the image listens on."""
    assert {name for name, service in SERVICES.items() if "build" in service} == set(REPLICAS)
    for name in REPLICAS:
        replica = SERVICES[name]
        context = (DEPLOY / replica["build"]["context"]).resolve()
        assert context == ROOT and (context / replica["build"]["dockerfile"]).is_file()
        assert replica["image"] == SERVICES[REPLICAS[0]]["image"]
        assert "ports" not in replica, "replicas are reached through the balancer only"
        assert replica["expose"] == [str(IMAGE.port)] == steps("EXPOSE")


def test_each_replica_keeps_its_cache_in_a_volume_of_its_own() -> None:
    """One named volume per replica, mounted where the image keeps its cache (VOLUME and the
    base config's cache_dir)."""
    (image_volume,) = re.findall(r'"(/[^"]+)"', steps("VOLUME")[0])
    assert image_volume == IMAGE.cache_dir
    volumes = []
    for name in REPLICAS:
        (mount,) = SERVICES[name]["volumes"]
        volume, target = mount.split(":")
        assert target == IMAGE.cache_dir
        assert volume in compose()["volumes"], f"{volume} is not a named volume"
        volumes.append(volume)
    assert len(set(volumes)) == len(REPLICAS)


def test_replicas_share_redis_and_the_secret_file() -> None:
    """Both replicas name the same Redis (the redis service) and read the same secret file,
    mounted from a compose secret whose file git ignores."""
    first = environment(REPLICAS[0])
    assert all(environment(name) == first for name in REPLICAS)
    redis = urlsplit(first[env_name("redis_url")])
    assert (redis.scheme, redis.hostname, redis.port) == ("redis", "redis", 6379)
    assert redis.password is None, "a Redis password belongs in a file, not in the URL"
    secret_path = Path(first[env_name("secret_file")])
    assert secret_path.parent == Path("/run/secrets")
    for name in REPLICAS:
        assert SERVICES[name]["secrets"] == [secret_path.name]
    source = DEPLOY / compose()["secrets"][secret_path.name]["file"]
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(source)], cwd=ROOT, check=False, timeout=30
    )
    assert ignored.returncode == 0, f"{source} is not ignored by git"


def test_no_secret_is_written_in_the_compose_file() -> None:
    """No variable that carries a secret has a value of its own: secrets come as files."""
    secretive = re.compile(r"SECRET|PASSWORD|TOKEN|API_KEY|CREDENTIAL")
    for name, service in SERVICES.items():
        for variable in service.get("environment", {}):
            if secretive.search(variable):
                assert variable.endswith("_FILE"), f"{name}: {variable} holds a secret inline"
                assert str(service["environment"][variable]).startswith("/run/secrets/")
    for secret in compose()["secrets"].values():
        assert set(secret) == {"file"} and secret["file"].startswith("./secrets/")


def test_replica_environment_names_valid_settings() -> None:
    """Every VLMRUN_CACHE_ variable names a setting (an unknown one is silently ignored) and its
    default value loads over the image's base file."""
    env = environment(REPLICAS[0])
    names = {name.removeprefix("VLMRUN_CACHE_").lower() for name in env}
    assert all(name.startswith("VLMRUN_CACHE_") for name in env)
    assert names <= set(KEYS) | SHARED_TIER_KEYS, names - set(KEYS)
    known = {
        name: value
        for name, value in env.items()
        if name.removeprefix("VLMRUN_CACHE_").lower() in KEYS
    }
    config = load(env=known, base=BASE_CONFIG)
    assert config.proof_ttl <= 300, "a shared deployment bounds revocation (README)"


def test_redis_is_a_bounded_lru_only_the_replicas_reach() -> None:
    """Redis runs with maxmemory and allkeys-lru, persists nothing, publishes no port, and sits
    on an internal network that only it and the replicas join."""
    redis = SERVICES["redis"]
    command = [interpolated(word) for word in redis["command"]]
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert command[0] == "redis-server"
    assert options["--maxmemory-policy"] == "allkeys-lru"
    assert re.fullmatch(r"\d+(mb|gb)", options["--maxmemory"])
    assert options["--save"] == "" and options["--appendonly"] == "no"
    assert "ports" not in redis
    (network,) = redis["networks"]
    assert compose()["networks"][network]["internal"] is True
    members = {name for name, s in SERVICES.items() if network in s.get("networks", [])}
    assert members == {"redis", *REPLICAS}


def test_every_service_has_a_healthcheck_and_the_replicas_use_the_images() -> None:
    """Each service checks its own health; the replicas run the image's own HEALTHCHECK command
    (serve.json's address, 2 s per connect and read) with a timeout above its 2 s."""
    (image_check,) = steps("HEALTHCHECK")
    image_command = yaml.safe_load(image_check.split(" CMD ", 1)[1])
    for name, service in SERVICES.items():
        check = service["healthcheck"]
        assert check["test"][0] == "CMD" and parse_duration(check["timeout"]) >= 3, name
    for name in REPLICAS:
        assert SERVICES[name]["healthcheck"]["test"][1:] == image_command


def test_start_order() -> None:
    """Replicas wait for Redis to start but not to be healthy (they serve without it); the
    balancer and Prometheus start with the replicas; Grafana after Prometheus."""
    for name, service in SERVICES.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
    for name in REPLICAS:
        assert SERVICES[name]["depends_on"] == {"redis": {"condition": "service_started"}}
    assert set(SERVICES["lb"]["depends_on"]) == set(REPLICAS)
    assert set(REPLICAS) <= set(SERVICES["prometheus"]["depends_on"])
    assert "prometheus" in SERVICES["grafana"]["depends_on"]


def test_published_ports_are_on_loopback_only() -> None:
    """The balancer, Prometheus and Grafana publish on 127.0.0.1 only (clients' API keys must
    not cross the network in clear text; see the README for TLS)."""
    published = {name: s["ports"] for name, s in SERVICES.items() if "ports" in s}
    assert set(published) == {"lb", "prometheus", "grafana"}
    for ports in published.values():
        assert all(p.startswith("127.0.0.1:") for p in ports), ports


def test_replicas_run_as_the_images_user_with_nothing_more() -> None:
    """The image's unprivileged user (no `user:` override, which would not own /cache), a
    read-only root file system, no capabilities, and time to drain on stop."""
    for name in REPLICAS:
        replica = SERVICES[name]
        assert "user" not in replica and steps("USER") == ["cache"]
        assert replica["read_only"] is True and replica["tmpfs"] == ["/tmp"]
        assert replica["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in replica["security_opt"]
        assert parse_duration(replica["stop_grace_period"]) > IMAGE.shutdown_timeout


def test_mounted_files_exist() -> None:
    """Every file or directory a service mounts from deploy/ is in the repository."""
    for name, service in SERVICES.items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"


# --- the load balancer -----------------------------------------------------------------------


def test_balancer_round_robins_over_every_replica_checked_on_readyz() -> None:
    """Round robin over one server per replica, each health-checked with GET /readyz (which
    stays 200 while the API is down, so cached hits keep flowing), on the image's port."""
    backend = haproxy_sections()["backend replicas"]
    assert "balance roundrobin" in backend
    assert "option httpchk" in backend
    assert "http-check send meth GET uri /readyz" in backend
    assert "http-check expect status 200" in backend
    (defaults,) = [line for line in backend if line.startswith("default-server ")]
    assert " check " in f"{defaults} "
    servers = [line.split() for line in backend if line.startswith("server ")]
    assert [(s[1], s[2]) for s in servers] == [(r, f"{r}:{IMAGE.port}") for r in REPLICAS]
    (frontend_bind,) = [x for x in haproxy_sections()["frontend api"] if x.startswith("bind ")]
    assert [container_port(p) for p in SERVICES["lb"]["ports"]] == [
        int(frontend_bind.rsplit(":", 1)[1])
    ]


def test_balancer_gives_content_type_its_spelling_back() -> None:
    """HAProxy sends HTTP/1 header names in lower case; the Python SDK reads `Content-Type`
    case-sensitively, so the frontend restores that name (seen on the wire in
    test_deploy_live)."""
    assert "h1-case-adjust content-type Content-Type" in haproxy_sections()["global"]
    assert "option h1-case-adjust-bogus-client" in haproxy_sections()["frontend api"]


def test_balancer_timeouts_leave_the_decisions_to_the_proxy() -> None:
    """Idle timeouts above passthrough_timeout (SSE may stay silent for 10 minutes), a request
    head allowed as long as the proxy's header_timeout, no resend of a request a replica got."""
    timeouts = {
        line.split()[1]: parse_duration(line.split()[2])
        for line in haproxy_sections()["defaults"]
        if line.startswith("timeout ")
    }
    default = Config()
    assert timeouts["client"] > default.passthrough_timeout
    assert timeouts["server"] > default.passthrough_timeout
    assert timeouts["http-request"] == default.header_timeout
    assert not [line for line in haproxy_sections()["defaults"] if line.startswith("retry-on")]


def test_balancer_metrics_and_health_are_where_compose_and_prometheus_look() -> None:
    """The balancer's exporter and /healthz listen where Prometheus scrapes and compose checks."""
    frontend = haproxy_sections()["frontend metrics"]
    port = int(next(x for x in frontend if x.startswith("bind ")).rsplit(":", 1)[1])
    assert any("prometheus-exporter" in line for line in frontend)
    (job,) = [j for j in prometheus()["scrape_configs"] if j["job_name"] == "load-balancer"]
    assert job["static_configs"][0]["targets"] == [f"lb:{port}"]
    assert f"http://127.0.0.1:{port}/healthz" in SERVICES["lb"]["healthcheck"]["test"]


# --- Prometheus and Grafana ------------------------------------------------------------------


def test_prometheus_scrapes_every_replica_by_name() -> None:
    """One target per replica service on the image's port, labelled with its replica name."""
    (job,) = [j for j in prometheus()["scrape_configs"] if j["job_name"] == "vlmrun-cache"]
    assert job["metrics_path"] == "/metrics"
    targets = {
        target: group["labels"]["replica"]
        for group in job["static_configs"]
        for target in group["targets"]
    }
    assert targets == {f"{name}:{IMAGE.port}": name for name in REPLICAS}


def test_grafana_provisions_the_datasource_and_dashboard_it_queries() -> None:
    """The provisioned datasource is the compose Prometheus, every panel queries it by uid, and
    the dashboards provider reads the directory compose mounts the dashboard into."""
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning/datasources/prometheus.yaml").read_text(encoding="utf-8")
    )
    (source,) = datasources["datasources"]
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus"
    assert url.port in [container_port(p) for p in SERVICES["prometheus"]["ports"]]
    for panel in dashboard()["panels"]:
        for item in [panel, *panel.get("targets", [])]:
            if "datasource" in item:
                assert item["datasource"]["uid"] == source["uid"], panel["title"]
    providers = yaml.safe_load(
        (GRAFANA / "provisioning/dashboards/vlmrun-cache.yaml").read_text(encoding="utf-8")
    )
    mounts = dict(m.split(":")[:2] for m in SERVICES["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == providers["providers"][0]["options"]["path"]


def test_dashboard_layout() -> None:
    """Unique panel ids, panels inside the 24-column grid without overlap, every panel with a
    query, and the rows the deployment is watched by."""
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        area = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        assert panel["type"] == "row" or panel["targets"], panel["title"]
    rows = [p["title"].lower() for p in panels if p["type"] == "row"]
    for topic in (
        "hit rate by tier",
        "bytes saved",
        "upstream",
        "latency",
        "evictions",
        "errors",
        "circuit breaker",
        "load balancer",
        "shared tier",
    ):
        assert any(topic in row for row in rows), topic


# --- the dashboard's queries against a real proxy --------------------------------------------


def exposition(server: ServerThread) -> dict[str, dict[str, set[str]]]:
    """sample name -> label -> values seen, from a running proxy's /metrics."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    samples: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = samples.setdefault(sample.name, {})
            for label, value in sample.labels.items():
                labels.setdefault(label, set()).add(value)
    return samples


def test_every_metric_the_dashboard_queries_exists(proxy: ServerThread) -> None:
    """Each vlmrun_cache_ name in the dashboard's PromQL (histograms by their _bucket, _sum and
    _count series) is on a real proxy's /metrics, with every label it filters or groups by, and
    every value it compares with exists (but the shared tier's, which #14 adds); `up` is from
    a job of prometheus.yml; the balancer's names are checked against a real HAProxy in
    test_deploy_live."""
    exposed = exposition(proxy)
    jobs = {job["job_name"] for job in prometheus()["scrape_configs"]}
    checked = 0
    for title, expr in dashboard_targets():
        query = parse(expr)
        labels_in_query = set(TARGET_LABELS)
        for selector in query.selectors:
            if selector.metric == "up":
                assert selector.matchers["job"][1] in jobs, title
                continue
            if selector.metric.startswith("haproxy_"):
                continue
            assert selector.metric in exposed, f"{title}: {selector.metric} is not on /metrics"
            labels = exposed[selector.metric]
            labels_in_query |= set(labels)
            for label, (operator, value) in selector.matchers.items():
                assert label in labels or label in TARGET_LABELS, f"{title}: no label {label}"
                if label in TARGET_LABELS or (label, value) == ("tier", "redis"):
                    continue
                wanted = value.split("|") if operator == "=~" else [value]
                assert set(wanted) <= labels[label], f"{title}: {label}={value} never occurs"
            checked += 1
        assert query.grouping <= labels_in_query | {"server"}, f"{title}: {query.grouping}"
    assert checked >= 30


def test_replica_variable_and_shared_tier_row_use_existing_labels(proxy: ServerThread) -> None:
    """The $replica variable lists a label Prometheus sets on every replica; the shared tier row
    selects by the `tier` label of a metric that exists today (no name invented ahead of #14)."""
    exposed = exposition(proxy)
    (variable,) = dashboard()["templating"]["list"]
    match = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"])
    assert match is not None, variable["query"]
    metric, label = match.groups()
    assert metric in exposed and label == "replica" == variable["name"]
    panels = dashboard()["panels"]
    start = next(i for i, p in enumerate(panels) if p["title"] == "Shared tier")
    shared = [p for p in panels[start + 1 :]]
    assert shared and all(p["type"] != "row" for p in shared), "the shared tier row comes last"
    for panel in shared:
        for target in panel["targets"]:
            for selector in parse(target["expr"]).selectors:
                assert selector.metric in exposed and "tier" in exposed[selector.metric]
    assert any('tier="redis"' in t["expr"] for p in shared for t in p["targets"])
