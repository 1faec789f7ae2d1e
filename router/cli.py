"""Command line -> RouterConfig, with SGLang router flag names; ``--config FILE.yaml`` underneath, CLI on top.

``--prefill URL [BOOTSTRAP_PORT]`` and ``--decode URL`` repeat; a missing bootstrap port means
8998 (SGLang's default) and ``none`` means "send none, let the prefill worker use its own".
``$SGLANG_ROUTER_ADMIN_API_KEY`` gives ``--admin-api-key`` when neither the command line nor the
YAML does (a key in the environment stays out of ``ps``). The cluster secret (``--cluster-secret-file``
or ``$SGLANG_DISAGGREGATION_CLUSTER_SECRET``) is loaded once here, so a bad one fails at startup.
Invalid flags end the program with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from typing import Any, NoReturn

import yaml

from pd_common.cluster_auth import load_cluster_key
from router.config import DEFAULT_BOOTSTRAP_PORT, LOG_LEVELS, POLICIES, RouterConfig

ADMIN_KEY_ENV = "SGLANG_ROUTER_ADMIN_API_KEY"
_HELP = {
    "host": "address to bind",
    "port": "port to listen on",
    "pd_disaggregation": "prefill/decode mode: every request goes to one prefill and one decode worker",
    "worker_urls": "regular mode: colocated workers",
    "prefill": "PD: a prefill worker URL and its bootstrap port (repeatable)",
    "decode": "PD: a decode worker URL (repeatable)",
    "policy": "routing policy for every role",
    "prefill_policy": "policy for prefill workers (default: --policy)",
    "decode_policy": "policy for decode workers (default: --policy)",
    "api_key": "clients must send 'Authorization: Bearer KEY' (/health and /metrics stay open); also sent to workers",
    "admin_api_key": "management routes (/workers, /add_worker, /remove_worker, /flush_cache, /abort_request, "
    "/get_server_info) need 'Authorization: Bearer KEY'; the --api-key does not grant them "
    "(default: $SGLANG_ROUTER_ADMIN_API_KEY; none: loopback callers only)",
    "allow_remote_admin": "without --admin-api-key, let non-loopback callers use the management routes (unsafe)",
    "cluster_secret_file": "file holding the PD cluster secret (default: $SGLANG_DISAGGREGATION_CLUSTER_SECRET): "
    "signs the bootstrap fields sent to workers and verifies workers' registrations",
    "max_concurrent_requests": "requests dispatched at once (<= 0: unbounded)",
    "queue_size": "requests waiting for a slot before 429",
    "queue_timeout_secs": "longest wait for a slot before 408",
    "request_timeout_secs": "longest time one worker call may take",
    "max_payload_size": "largest request body in bytes (413 beyond)",
    "health_check_interval_secs": "seconds between health probes of a healthy worker",
    "health_check_timeout_secs": "timeout of one health probe",
    "health_failure_threshold": "failed probes in a row before ejection",
    "health_success_threshold": "good probes in a row before re-admission",
    "health_check_endpoint": "path probed on each worker",
    "retry_max_retries": "retries of a request before its first byte reached the client",
    "retry_initial_backoff_ms": "first backoff",
    "retry_max_backoff_ms": "largest backoff",
    "retry_backoff_multiplier": "backoff growth per retry",
    "retry_jitter_factor": "random +- share of each backoff",
    "disable_retries": "never retry",
    "cb_failure_threshold": "failures in a row that open a worker's circuit",
    "cb_success_threshold": "successes in half-open state that close it",
    "cb_timeout_duration_secs": "open -> half-open after this long",
    "cb_window_duration_secs": "failures further apart than this do not add up",
    "disable_circuit_breaker": "no circuit breaker",
    "cache_threshold": "cache_aware: matched share of the prompt that makes the cached worker win",
    "balance_abs_threshold": "cache_aware: load gap that counts as unbalanced ...",
    "balance_rel_threshold": "... together with max load > this x min load",
    "max_tree_size": "cache_aware: prefix blocks kept per worker",
    "request_id_headers": "headers read as the request id (echoed and sent to workers as x-request-id)",
    "shutdown_grace_period_secs": "SIGTERM: time given to in-flight requests",
    "log_level": "log level",
    "seed": "seed for bootstrap rooms and random policies (default: from the OS)",
}


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str = "sglang-pd-router") -> OneLineParser:
    p = OneLineParser(prog=prog, description="sglang-pd router: one address in front of PD pairs or worker pools")
    p.add_argument("--config", help="YAML file whose keys are flag names; the command line wins")
    s = argparse.SUPPRESS
    for f in dataclasses.fields(RouterConfig):
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "default": s, "help": _HELP.get(f.name)}
        if f.name == "worker_urls" or f.name == "request_id_headers":
            p.add_argument(flag, nargs="+", **kw)
        elif f.name == "prefill":
            p.add_argument(flag, nargs="+", action="append", metavar=("URL", "BOOTSTRAP_PORT"), **kw)
        elif f.name == "decode":
            p.add_argument(flag, action="append", metavar="URL", **kw)
        elif f.default is False:
            p.add_argument(flag, action="store_true", **kw)
        elif f.name in ("policy", "prefill_policy", "decode_policy"):
            p.add_argument(flag, choices=POLICIES, **kw)
        elif f.name == "log_level":
            p.add_argument(flag, choices=LOG_LEVELS, **kw)
        else:
            p.add_argument(flag, type=_type_of(f), **kw)
    return p


def _type_of(f: dataclasses.Field[Any]) -> Any:
    kind = str(f.type)
    if kind.startswith("int"):
        return int
    if kind.startswith("float"):
        return float
    return str


def parse_prefill(entries: Sequence[Any]) -> tuple[tuple[str, int | None], ...]:
    """[[url], [url, port], [url, 'none'], 'url port'] -> ((url, port | None), ...)."""
    out: list[tuple[str, int | None]] = []
    for entry in entries:
        parts = entry.split() if isinstance(entry, str) else [str(x) for x in entry]
        if not 1 <= len(parts) <= 2:
            raise ValueError(f"--prefill takes URL [BOOTSTRAP_PORT], got {' '.join(parts)!r}")
        if len(parts) == 1:
            out.append((parts[0], DEFAULT_BOOTSTRAP_PORT))
        elif parts[1].lower() == "none":
            out.append((parts[0], None))
        else:
            try:
                port = int(parts[1])
            except ValueError:
                raise ValueError(f"--prefill bootstrap port must be an integer or 'none', got {parts[1]!r}") from None
            if not 1 <= port <= 65535:
                raise ValueError(f"--prefill bootstrap port must be in [1, 65535], got {port}")
            out.append((parts[0], port))
    return tuple(out)


def config_from_values(values: dict[str, Any]) -> RouterConfig:
    """Flag values (CLI or YAML) -> RouterConfig; ValueError/TypeError on anything invalid."""
    values = dict(values)
    if "prefill" in values:
        values["prefill"] = parse_prefill(values["prefill"] or ())
    for name in ("worker_urls", "decode", "request_id_headers"):
        if name in values:
            v = values[name]
            values[name] = tuple([v] if isinstance(v, str) else (v or ()))
    if "decode" in values:  # `--decode URL` appends single strings; YAML may give a list
        values["decode"] = tuple(str(u) for u in values["decode"])
    config = RouterConfig(**values)
    config.initial_workers()  # every URL must parse
    return config


def parse_router_args(argv: Sequence[str] | None, prog: str = "sglang-pd-router") -> RouterConfig:
    parser = build_parser(prog)
    ns = vars(parser.parse_args(argv))
    path = ns.pop("config", None)
    values: dict[str, Any] = _load_yaml(parser, path) if path else {}
    values.update(ns)
    if "admin_api_key" not in values and os.environ.get(ADMIN_KEY_ENV):
        values["admin_api_key"] = os.environ[ADMIN_KEY_ENV]
    try:
        config = config_from_values(values)
        load_cluster_key(secret_file=config.cluster_secret_file)  # fail now on an unreadable or short secret
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    return config


def _load_yaml(parser: OneLineParser, path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        parser.error(f"cannot read --config {path}: {e}")
    if not isinstance(data, dict):
        parser.error(f"--config {path} must hold a mapping of flag names to values")
    names = {f.name for f in dataclasses.fields(RouterConfig)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in names:
            parser.error(f"--config {path}: unknown key {key!r}")
        out[name] = value
    return out
