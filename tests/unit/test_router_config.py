"""Router flags (SGLang names), --config YAML, and the frozen config's checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from router.cli import parse_router_args
from router.config import DEFAULT_BOOTSTRAP_PORT, RouterConfig, normalize_url

REPO = Path(__file__).resolve().parents[2]


def test_pd_flags():
    c = parse_router_args(
        [
            "--pd-disaggregation",
            "--prefill",
            "http://p1:30000",
            "9001",
            "--prefill",
            "p2:30000",
            "--prefill",
            "http://p3:1",
            "none",
            "--decode",
            "http://d1:30001",
            "--decode",
            "http://d2:1",
            "--prefill-policy",
            "cache_aware",
            "--decode-policy",
            "power_of_two",
        ]
    )
    assert c.pd_disaggregation and c.roles == ("prefill", "decode")
    specs = c.initial_workers()
    assert [(s.url, s.role, s.bootstrap_port) for s in specs] == [
        ("http://p1:30000", "prefill", 9001),
        ("http://p2:30000", "prefill", DEFAULT_BOOTSTRAP_PORT),
        ("http://p3:1", "prefill", None),
        ("http://d1:30001", "decode", None),
        ("http://d2:1", "decode", None),
    ]
    assert c.policy_for("prefill") == "cache_aware" and c.policy_for("decode") == "power_of_two"


def test_regular_flags_and_resilience_knobs():
    c = parse_router_args(
        [
            "--worker-urls",
            "http://a:1",
            "http://b:2",
            "--policy",
            "round_robin",
            "--api-key",
            "k",
            "--max-concurrent-requests",
            "8",
            "--queue-size",
            "2",
            "--queue-timeout-secs",
            "1.5",
            "--request-timeout-secs",
            "30",
            "--max-payload-size",
            "1000",
            "--health-check-interval-secs",
            "2",
            "--health-failure-threshold",
            "4",
            "--health-success-threshold",
            "1",
            "--retry-max-retries",
            "2",
            "--retry-initial-backoff-ms",
            "10",
            "--cb-failure-threshold",
            "3",
            "--cb-timeout-duration-secs",
            "5",
            "--log-level",
            "debug",
            "--port",
            "0",
        ]
    )
    assert c.worker_urls == ("http://a:1", "http://b:2") and c.policy_for("regular") == "round_robin"
    assert (c.max_concurrent_requests, c.queue_size, c.queue_timeout_secs) == (8, 2, 1.5)
    assert c.health.failure_threshold == 4 and c.retry.max_retries == 2 and c.retry.initial_backoff_s == 0.01
    assert c.breaker.failure_threshold == 3 and c.public_dict()["api_key"] == "***"
    assert parse_router_args(["--disable-retries"]).retry.max_retries == 0
    assert parse_router_args([]).worker_urls == ()  # no workers at all is fine


def test_yaml_config_with_cli_on_top(tmp_path):
    cfg = tmp_path / "router.yaml"
    cfg.write_text(
        "pd-disaggregation: true\nprefill:\n  - [http://p:1, 9000]\ndecode: [http://d:1]\npolicy: random\nport: 7000\n"
    )
    c = parse_router_args(["--config", str(cfg), "--port", "7001"])
    assert c.prefill == (("http://p:1", 9000),) and c.decode == ("http://d:1",) and c.policy == "random"
    assert c.port == 7001


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--policy", "fastest"], "--policy"),
        (["--port", "x"], "--port"),
        (["--decode", "http://d:1"], "--pd-disaggregation"),
        (["--pd-disaggregation", "--worker-urls", "http://a:1"], "--worker-urls"),
        (["--worker-urls", "ftp://a:1"], "http://host:port"),
        (["--pd-disaggregation", "--prefill", "http://p:1", "notaport"], "bootstrap port"),
        (["--health-failure-threshold", "0"], "health_failure_threshold"),
        (["--no-such-flag"], "--no-such-flag"),
        (["--cluster-secret-file", "/nonexistent/secret"], "cannot read the cluster secret file"),
        (["--api-key", "same", "--admin-api-key", "same"], "--admin-api-key must differ"),
    ],
)
def test_bad_flags_exit_2_with_one_line(flags, needle):
    out = subprocess.run(
        [sys.executable, "-m", "router.launch_router", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1 and needle in lines[0], out.stderr


def test_urls_are_normalised():
    assert normalize_url("127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert normalize_url("http://h:1/") == "http://h:1"
    with pytest.raises(ValueError):
        normalize_url("http://h:notaport")
    with pytest.raises(ValueError):
        RouterConfig(cache_threshold=2.0)


def test_router_imports_nothing_of_the_other_packages():
    code = (
        "import sys, router.launch_router, router.app;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('sglang_pd', 'transfer', 'pd_kernels', 'torch')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_admin_and_cluster_secret_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("SGLANG_ROUTER_ADMIN_API_KEY", raising=False)
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123\n")
    c = parse_router_args(
        ["--admin-api-key", "adm", "--api-key", "inf", "--allow-remote-admin", "--cluster-secret-file", str(secret)]
    )
    assert (c.admin_api_key, c.api_key, c.allow_remote_admin, c.cluster_secret_file) == (
        "adm",
        "inf",
        True,
        str(secret),
    )
    assert c.public_dict()["admin_api_key"] == "***" and c.public_dict()["api_key"] == "***"
    assert parse_router_args([]).admin_api_key is None and not parse_router_args([]).allow_remote_admin
    monkeypatch.setenv("SGLANG_ROUTER_ADMIN_API_KEY", "from-env")
    assert parse_router_args([]).admin_api_key == "from-env"
    assert parse_router_args(["--admin-api-key", "flag"]).admin_api_key == "flag"  # the command line wins
    short = tmp_path / "short"
    short.write_text("tiny")
    with pytest.raises(SystemExit) as e:
        parse_router_args(["--cluster-secret-file", str(short)])
    assert e.value.code == 2
