"""observability/: Prometheus's configuration and alerting rules, checked and unit-tested with
promtool (Debian's prometheus package; test.sh installs it), and the compose service that runs
them in the `observability` profile."""

import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from settings import Settings
from tests.helpers import ROOT
from tests.test_compose import SERVICES, environment

OBSERVABILITY = Path(ROOT, "observability")
CONFIG_FILE = OBSERVABILITY / "prometheus.yml"
RULES_FILE = OBSERVABILITY / "rules.yml"
CONFIG: dict[str, Any] = yaml.safe_load(CONFIG_FILE.read_text())
RULES: dict[str, Any] = yaml.safe_load(RULES_FILE.read_text())
PROMETHEUS: dict[str, Any] = SERVICES["prometheus"]
# Where the compose service mounts the two files.
MOUNTS = {
    "./observability/prometheus.yml": "/etc/prometheus/prometheus.yml",
    "./observability/rules.yml": "/etc/prometheus/rules.yml",
}
PROMTOOL_INSTALL = "apt-get install -y prometheus"


def promtool(*arguments: str) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(f"The Prometheus configuration's test needs promtool: {PROMTOOL_INSTALL}")
    return subprocess.run(
        [found, *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def scrape_job(name: str) -> dict[str, Any]:
    (job,) = (job for job in CONFIG["scrape_configs"] if job["job_name"] == name)
    found: dict[str, Any] = job
    return found


def credentials_file() -> str:
    path = scrape_job("api")["authorization"]["credentials_file"]
    assert isinstance(path, str)
    return path


def entrypoint_script() -> str:
    """The shell script of the service's entrypoint, with compose's $$ read as $."""
    shell, flag, script, name = PROMETHEUS["entrypoint"]
    assert (shell, flag, name) == ("/bin/sh", "-c", "prometheus")
    assert isinstance(script, str)
    return script.replace("$$", "$")


# --- promtool ----------------------------------------------------------------------------------


def test_the_entrypoint_writes_the_token_where_the_configuration_reads_it(tmp_path: Path) -> None:
    """The entrypoint, run here with the token file in tmp_path and echo for Prometheus: the token
    exactly (no newline), readable only by Prometheus's user, then the service's flags."""
    token = tmp_path / "token"
    script = entrypoint_script()
    assert script.count(credentials_file()) == 1
    assert script.count("exec /bin/prometheus ") == 1
    script = script.replace(credentials_file(), str(token)).replace(
        "exec /bin/prometheus ", "exec echo "
    )
    result = subprocess.run(
        ["sh", "-c", script, "prometheus", *PROMETHEUS["command"]],
        env={"PATH": "/usr/bin:/bin", "PROMETHEUS_TOKEN": "a token's $value"},
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == PROMETHEUS["command"]
    assert token.read_text() == "a token's $value"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600


def test_promtool_accepts_the_configuration_and_its_rule_file(tmp_path: Path) -> None:
    # promtool checks that the credentials file exists: a copy of the configuration names one in
    # tmp_path instead of the container's (written by the service's entrypoint); rules.yml beside.
    token = tmp_path / "prometheus-token"
    token.write_text("dev-prometheus-token")
    text = CONFIG_FILE.read_text()
    assert text.count(credentials_file()) == 1
    (tmp_path / "prometheus.yml").write_text(text.replace(credentials_file(), str(token)))
    shutil.copy(RULES_FILE, tmp_path / "rules.yml")
    result = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", str(RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    count = sum(len(group["rules"]) for group in RULES["groups"])
    assert f"SUCCESS: {count} rules found" in result.stdout


def test_every_alert_has_a_summary_and_a_severity() -> None:
    rules = [rule for group in RULES["groups"] for rule in group["rules"]]
    assert all("alert" in rule for rule in rules), "alerting rules only"
    for rule in rules:
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
    assert {rule["alert"] for rule in rules} >= {
        "ApiServerErrorRateHigh",
        "ApiRefusalsHigh",
        "PetReportLate",
        "PetReportMissing",
        "HeartbeatLate",
        "HeartbeatMissing",
    }


# The series as Prometheus stores them: the target's labels job and instance; the worker's own
# label `job` renamed exported_job (it conflicts with the target's).
API = 'job="api", instance="api:8000"'
WORKER = 'job="worker", instance="worker:9101"'


def requests(status: str, per_minute: int) -> dict[str, str]:
    labels = f'{API}, method="GET", handler="/pets", status="{status}"'
    return {"series": f"http_requests_total{{{labels}}}", "values": f"0+{per_minute}x40"}


def last_success(job: str, values: str) -> dict[str, str]:
    labels = f'{WORKER}, exported_job="{job}"'
    return {"series": f"pets_worker_last_success_timestamp_seconds{{{labels}}}", "values": values}


def alert(name: str, at: str, *expected: dict[str, Any]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": name, "exp_alerts": list(expected)}


PET_REPORT_LATE = {
    "summary": "No pet report for 3 minutes",
    "description": "The worker's last successful pet report was 4m 0s ago.",
}
PET_REPORT_MISSING = {
    "summary": "No pet report for 3 minutes",
    "description": (
        "Prometheus has had no successful pet report from the worker for 3 minutes (worker down,"
        " not scraped, or every report failing)."
    ),
}

# promtool's clock starts at the Unix epoch: at eval_time 8m, time() is 480.
RULE_TESTS: list[dict[str, Any]] = [
    {
        "name": "9% of the answers are 5xx: pending for 5 minutes, then firing",
        "input_series": [requests("200", 600), requests("500", 60)],
        "alert_rule_test": [
            alert("ApiServerErrorRateHigh", "5m"),
            alert(
                "ApiServerErrorRateHigh",
                "10m",
                {
                    "exp_labels": {"severity": "critical"},
                    "exp_annotations": {
                        "summary": "More than 5% of the API's answers are 5xx errors",
                        "description": (
                            "9.091% of the API's answers over the last 5 minutes were 5xx."
                        ),
                    },
                },
            ),
        ],
    },
    {
        "name": "4% of the answers are 5xx (503s): no alert",
        "input_series": [requests("200", 960), requests("503", 40)],
        "alert_rule_test": [alert("ApiServerErrorRateHigh", "30m")],
    },
    {
        "name": "no requests: no alert",
        "input_series": [requests("200", 0), requests("500", 0)],
        "alert_rule_test": [alert("ApiServerErrorRateHigh", "30m")],
    },
    {
        "name": "the reports stop after the one at 4m: late from 7m on (age above 180 s)",
        "input_series": [last_success("pet_report", "_ 60 120 180 240 240+0x20")],
        "alert_rule_test": [
            alert("PetReportLate", "4m"),
            alert("PetReportLate", "7m"),
            alert(
                "PetReportLate",
                "8m",
                {
                    "exp_labels": {"severity": "critical", "exported_job": "pet_report"},
                    "exp_annotations": PET_REPORT_LATE,
                },
            ),
            alert("PetReportMissing", "8m"),
        ],
    },
    {
        "name": "a report each minute: no alert",
        "input_series": [last_success("pet_report", "0+60x30")],
        "alert_rule_test": [alert("PetReportLate", "30m"), alert("PetReportMissing", "30m")],
    },
    {
        "name": "no report since the worker started (0), then none scraped: missing after 3 min",
        "input_series": [last_success("pet_report", "0+0x10")],
        "alert_rule_test": [
            alert("PetReportLate", "10m"),
            alert("PetReportMissing", "2m"),
            alert(
                "PetReportMissing",
                "3m",
                {"exp_labels": {"severity": "critical"}, "exp_annotations": PET_REPORT_MISSING},
            ),
            alert(
                "PetReportMissing",
                "20m",
                {"exp_labels": {"severity": "critical"}, "exp_annotations": PET_REPORT_MISSING},
            ),
        ],
    },
    {
        "name": "the heartbeat of 1m and none since: late after 7 hours",
        "input_series": [last_success("heartbeat", "_ 60+0x500")],
        "alert_rule_test": [
            alert("HeartbeatLate", "7h1m"),
            alert(
                "HeartbeatLate",
                "7h2m",
                {
                    "exp_labels": {"severity": "warning", "exported_job": "heartbeat"},
                    "exp_annotations": {
                        "summary": "No worker heartbeat for 7 hours",
                        "description": "The worker's last successful heartbeat was 7h 1m 0s ago.",
                    },
                },
            ),
            alert("HeartbeatMissing", "8h"),
        ],
    },
    {
        # rate() counts a counter's first minutes over the whole 5 m range (0.04, 0.08, 0.12 at
        # 1m, 2m, 3m): above 0.1 from 3m, so firing from 13m.
        "name": "refusals: 0.2 a second for one reason fires after 10 minutes, 1 a minute never",
        "input_series": [
            {
                "series": f'pets_refused_total{{{API}, reason="metrics_queue_full"}}',
                "values": "0+12x40",
            },
            {"series": f'pets_refused_total{{{API}, reason="login_limit"}}', "values": "0+1x40"},
        ],
        "alert_rule_test": [
            alert("ApiRefusalsHigh", "12m"),
            alert(
                "ApiRefusalsHigh",
                "13m",
                {
                    "exp_labels": {"severity": "warning", "reason": "metrics_queue_full"},
                    "exp_annotations": {
                        "summary": "The API keeps refusing requests: metrics_queue_full",
                        "description": (
                            "0.20 refusals a second for reason metrics_queue_full over the last"
                            " 5 minutes, for 10 minutes."
                        ),
                    },
                },
            ),
        ],
    },
]


def test_the_alerts_fire_when_they_should(tmp_path: Path) -> None:
    tests = [{"interval": "1m", **case} for case in RULE_TESTS]
    unit = {"rule_files": [str(RULES_FILE)], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "rules_test.yml").write_text(yaml.safe_dump(unit, sort_keys=False))
    result = promtool("test", "rules", str(tmp_path / "rules_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


# --- the configuration against the compose file ------------------------------------------------


def test_prometheus_scrapes_the_api_and_the_worker_every_15_seconds() -> None:
    assert CONFIG["global"]["scrape_interval"] == "15s"
    assert CONFIG["global"]["evaluation_interval"] == "15s"
    api = scrape_job("api")
    assert api["static_configs"] == [{"targets": ["api:8000"]}]
    assert api["metrics_path"] == "/internal/metrics"
    assert api["authorization"]["type"] == "Bearer"
    assert "credentials" not in api["authorization"], "the token stays out of the file"
    worker = scrape_job("worker")
    port = Settings.model_validate(environment("worker")).WORKER_METRICS_PORT
    assert worker["static_configs"] == [{"targets": [f"worker:{port}"]}]
    assert worker.get("metrics_path", "/metrics") == "/metrics"
    assert "authorization" not in worker
    assert not worker.get("honor_labels", False), "the rules expect the worker's job renamed"
    assert {job["job_name"] for job in CONFIG["scrape_configs"]} == {"api", "worker"}


def test_the_rule_file_is_found_where_the_service_mounts_it() -> None:
    # Relative rule files are read from the configuration file's directory.
    assert CONFIG["rule_files"] == ["rules.yml"]
    config, rules = (MOUNTS[f"./observability/{name}"] for name in ("prometheus.yml", "rules.yml"))
    assert Path(config).parent == Path(rules).parent
    assert Path(rules).name == "rules.yml"


def test_prometheus_runs_only_in_the_observability_profile() -> None:
    assert PROMETHEUS["profiles"] == ["observability"]
    others = {name: service for name, service in SERVICES.items() if name != "prometheus"}
    assert not [name for name, service in others.items() if "profiles" in service]
    image, tag = PROMETHEUS["image"].split(":")
    assert image == "prom/prometheus"
    assert tag.startswith("v"), "a pinned release, not latest"
    assert PROMETHEUS["depends_on"] == {
        "api": {"condition": "service_started"},
        "worker": {"condition": "service_started"},
    }


def test_prometheus_mounts_both_files_read_only_and_publishes_its_ui() -> None:
    assert sorted(PROMETHEUS["volumes"]) == sorted(
        f"{source}:{target}:ro" for source, target in MOUNTS.items()
    )
    assert f"--config.file={MOUNTS['./observability/prometheus.yml']}" in PROMETHEUS["command"]
    assert PROMETHEUS["ports"] == ["${PROMETHEUS_PORT:-9090}:9090"]
    assert "/-/ready" in " ".join(PROMETHEUS["healthcheck"]["test"])
    assert PROMETHEUS["restart"] == "unless-stopped"
    # The token file lies on a tmpfs, not in the container's layer.
    assert PROMETHEUS["tmpfs"] == [str(Path(credentials_file()).parent)]


def test_prometheus_presents_the_token_the_api_requires() -> None:
    api = SERVICES["api"]["environment"]["PROMETHEUS_TOKEN"]
    assert api == PROMETHEUS["environment"]["PROMETHEUS_TOKEN"]
    assert api == "${PROMETHEUS_TOKEN:-dev-prometheus-token}"
    token = Settings.model_validate(environment("api")).PROMETHEUS_TOKEN
    assert token is not None
    assert token.get_secret_value() == "dev-prometheus-token"
    assert '"$PROMETHEUS_TOKEN"' in entrypoint_script()
    # The api keeps the rest of the shared environment.
    assert environment("api").items() >= environment("migrate").items()
    assert "PROMETHEUS_TOKEN" not in environment("worker")
