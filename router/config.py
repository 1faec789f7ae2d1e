"""RouterConfig: every router setting, one frozen dataclass built once from flags (see ``cli``).

Field names are SGLang router flag names with dashes turned into underscores
(``--health-failure-threshold`` -> ``health_failure_threshold``). Derived, per-part configs
(``breaker``, ``health``, ``retry``, ``cache_aware``) are small frozen views of it, so each module
takes only what it uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

Role = Literal["regular", "prefill", "decode"]
ROLES: tuple[Role, ...] = ("regular", "prefill", "decode")
POLICIES = ("random", "round_robin", "power_of_two", "cache_aware")
DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's --disaggregation-bootstrap-port default
_NETLOC = re.compile(r"[A-Za-z0-9._\-]+(:\d+)?|\[[0-9A-Fa-f:.]+\](:\d+)?")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class WorkerSpec:
    """What the operator says about one worker; runtime state lives in ``worker.Worker``."""

    url: str  # normalised: scheme://host:port, no trailing slash
    role: Role
    bootstrap_port: int | None = None  # prefill only; None = let the worker use its default
    api_key: str | None = None  # sent to this worker as a Bearer token; None = the router's --api-key


def normalize_url(url: str) -> str:
    """'127.0.0.1:8000' / 'http://h:8000/' -> 'http://h:8000'; ValueError when it is not an http(s) URL."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"worker url must be a non-empty string, got {url!r}")
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or not _NETLOC.fullmatch(parts.netloc):
        raise ValueError(f"worker url must look like http://host:port, got {url!r}")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as e:
        raise ValueError(f"bad port in worker url {url!r}") from e
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def url_host(url: str) -> str:
    """The host part of a worker URL (the PD ``bootstrap_host``)."""
    return urlsplit(url).hostname or ""


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int
    success_threshold: int
    timeout_s: float  # open -> half-open after this long
    window_s: float  # failures further apart than this do not add up
    enabled: bool


@dataclass(frozen=True)
class HealthConfig:
    interval_s: float
    timeout_s: float
    failure_threshold: int  # consecutive failed probes before a healthy worker is ejected
    success_threshold: int  # consecutive good probes before an ejected worker is re-admitted
    endpoint: str


@dataclass(frozen=True)
class RetryConfig:
    max_retries: int  # attempts = 1 + max_retries
    initial_backoff_s: float
    max_backoff_s: float
    multiplier: float
    jitter: float  # +- this share of each backoff


@dataclass(frozen=True)
class CacheAwareConfig:
    cache_threshold: float  # matched share of the prompt above which the cached worker wins
    balance_abs_threshold: int  # load is unbalanced when max - min > this ...
    balance_rel_threshold: float  # ... and max > this * min
    max_tree_size: int  # prefix-tree blocks kept per worker (LRU beyond)


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 30000
    pd_disaggregation: bool = False
    worker_urls: tuple[str, ...] = ()
    prefill: tuple[tuple[str, int | None], ...] = ()  # (url, bootstrap port)
    decode: tuple[str, ...] = ()
    policy: str = "cache_aware"
    prefill_policy: str | None = None  # None: --policy
    decode_policy: str | None = None
    api_key: str | None = None
    admin_api_key: str | None = None  # management routes; also $SGLANG_ROUTER_ADMIN_API_KEY (cli)
    allow_remote_admin: bool = False  # no admin key: management routes open to non-loopback callers too
    cluster_secret_file: str | None = None  # else $SGLANG_DISAGGREGATION_CLUSTER_SECRET (pd_common.cluster_auth)
    max_concurrent_requests: int = 256  # <= 0: unbounded
    queue_size: int = 100
    queue_timeout_secs: float = 60.0
    request_timeout_secs: float = 1800.0
    max_payload_size: int = 256 * 1024 * 1024
    health_check_interval_secs: float = 10.0
    health_check_timeout_secs: float = 5.0
    health_failure_threshold: int = 3
    health_success_threshold: int = 2
    health_check_endpoint: str = "/health"
    retry_max_retries: int = 5
    retry_initial_backoff_ms: int = 50
    retry_max_backoff_ms: int = 30000
    retry_backoff_multiplier: float = 1.5
    retry_jitter_factor: float = 0.2
    disable_retries: bool = False
    cb_failure_threshold: int = 10
    cb_success_threshold: int = 3
    cb_timeout_duration_secs: float = 60.0
    cb_window_duration_secs: float = 120.0
    disable_circuit_breaker: bool = False
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    max_tree_size: int = 1 << 20
    request_id_headers: tuple[str, ...] = ("x-request-id",)
    shutdown_grace_period_secs: float = 30.0
    log_level: str = "info"
    seed: int | None = field(default=None)  # rooms, random policies; None: from the OS

    def __post_init__(self) -> None:
        _check(self.port >= 0 and self.port <= 65535, f"port must be in [0, 65535], got {self.port}")
        for name in ("policy", "prefill_policy", "decode_policy"):
            value = getattr(self, name)
            _check(value is None or value in POLICIES, f"{name} must be one of {', '.join(POLICIES)}; got {value!r}")
        _check(
            self.pd_disaggregation or not (self.prefill or self.decode), "--prefill/--decode need --pd-disaggregation"
        )
        _check(
            not (self.pd_disaggregation and self.worker_urls),
            "--worker-urls is for regular mode, not with --pd-disaggregation",
        )
        for name in ("queue_size", "retry_max_retries", "retry_initial_backoff_ms", "retry_max_backoff_ms"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in (
            "health_failure_threshold",
            "health_success_threshold",
            "cb_failure_threshold",
            "cb_success_threshold",
            "max_payload_size",
            "max_tree_size",
        ):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "queue_timeout_secs",
            "request_timeout_secs",
            "health_check_interval_secs",
            "health_check_timeout_secs",
            "cb_timeout_duration_secs",
            "cb_window_duration_secs",
        ):
            _check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        _check(0.0 <= self.cache_threshold <= 1.0, f"cache_threshold must be in [0, 1], got {self.cache_threshold}")
        _check(
            0.0 <= self.retry_jitter_factor <= 1.0,
            f"retry_jitter_factor must be in [0, 1], got {self.retry_jitter_factor}",
        )
        _check(
            self.retry_backoff_multiplier >= 1.0,
            f"retry_backoff_multiplier must be >= 1, got {self.retry_backoff_multiplier}",
        )
        _check(self.health_check_endpoint.startswith("/"), "health_check_endpoint must start with '/'")
        _check(self.log_level in LOG_LEVELS, f"log_level must be one of {', '.join(LOG_LEVELS)}")
        _check(self.shutdown_grace_period_secs >= 0, "shutdown_grace_period_secs must be >= 0")
        for name in ("api_key", "admin_api_key", "cluster_secret_file"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, str) and value != ""), f"{name} must be a non-empty string")
        _check(
            not self.admin_api_key or self.admin_api_key != self.api_key,
            "--admin-api-key must differ from --api-key (the inference key must not grant administration)",
        )

    # --- derived views -----------------------------------------------------------------------------
    def initial_workers(self) -> list[WorkerSpec]:
        """Workers named on the command line (ValueError on a malformed URL)."""
        specs = [WorkerSpec(normalize_url(u), "regular") for u in self.worker_urls]
        specs += [WorkerSpec(normalize_url(u), "prefill", p) for u, p in self.prefill]
        specs += [WorkerSpec(normalize_url(u), "decode") for u in self.decode]
        return specs

    def policy_for(self, role: Role) -> str:
        chosen = {"prefill": self.prefill_policy, "decode": self.decode_policy}.get(role)
        return chosen or self.policy

    @property
    def roles(self) -> tuple[Role, ...]:
        """The roles this router serves: requests need one worker of each."""
        return ("prefill", "decode") if self.pd_disaggregation else ("regular",)

    @property
    def breaker(self) -> BreakerConfig:
        return BreakerConfig(
            self.cb_failure_threshold,
            self.cb_success_threshold,
            self.cb_timeout_duration_secs,
            self.cb_window_duration_secs,
            not self.disable_circuit_breaker,
        )

    @property
    def health(self) -> HealthConfig:
        return HealthConfig(
            self.health_check_interval_secs,
            self.health_check_timeout_secs,
            self.health_failure_threshold,
            self.health_success_threshold,
            self.health_check_endpoint,
        )

    @property
    def retry(self) -> RetryConfig:
        retries = 0 if self.disable_retries else self.retry_max_retries
        return RetryConfig(
            retries,
            self.retry_initial_backoff_ms / 1000,
            self.retry_max_backoff_ms / 1000,
            self.retry_backoff_multiplier,
            self.retry_jitter_factor,
        )

    @property
    def cache_aware(self) -> CacheAwareConfig:
        return CacheAwareConfig(
            self.cache_threshold, self.balance_abs_threshold, self.balance_rel_threshold, self.max_tree_size
        )

    def public_dict(self) -> dict[str, object]:
        """Settings without secrets, for /get_server_info and the startup log."""
        from dataclasses import asdict

        d = asdict(self)
        for name in ("api_key", "admin_api_key"):
            if d.get(name):
                d[name] = "***"
        return d


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
