"""ServerArgs: every engine/server setting, one frozen dataclass built once from flags, a YAML file or kwargs.

Field names are SGLang's flag names with dashes turned into underscores (``--page-size`` ->
``page_size``); ``Engine(**kwargs)``, the CLI and ``--config FILE.yaml`` all go through ``ServerArgs``.
Values that depend on the machine or checkpoint (``device="auto"``, ``max_total_tokens=None``, ...)
stay as given here and are resolved once at startup (see ``sglang_pd.runtime_config``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from pd_common.cluster_auth import ENV_VAR, ClusterKey, load_cluster_key

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "dummy")
SCHEDULE_POLICIES = ("fcfs", "lpm")
ATTENTION_BACKENDS = ("torch", "triton")


def _f(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class ServerArgs:
    model_path: str = _f("", "HF model directory (config.json, safetensors, tokenizer files)")
    tokenizer_path: str | None = _f(None, "tokenizer directory (default: model path)")
    load_format: Literal["auto", "dummy"] = _f(
        "auto", "auto: read safetensors; dummy: random weights", choices=LOAD_FORMATS
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "auto: float32 on CPU, checkpoint dtype (or bfloat16) on CUDA", choices=DTYPES
    )
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto: cuda when available", choices=DEVICES)
    base_gpu_id: int = _f(0, "index of the GPU this worker uses")
    context_length: int | None = _f(None, "max prompt + output tokens (default: the model's max_position_embeddings)")
    random_seed: int = _f(0, "seed for dummy weights and unseeded sampling")
    # memory and scheduling
    page_size: int = _f(16, "tokens per KV page")
    max_total_tokens: int | None = _f(
        None, "KV pool size in tokens (default: from --mem-fraction-static on CUDA, 65536 on CPU)"
    )
    mem_fraction_static: float = _f(0.88, "CUDA: fraction of GPU memory for weights + KV pool")
    chunked_prefill_size: int = _f(8192, "max prompt tokens computed per step (-1 disables chunking)")
    max_running_requests: int | None = _f(None, "max requests in the running batch (default: derived from the pool)")
    max_prefill_tokens: int = _f(16384, "max prompt tokens admitted per step")
    schedule_policy: Literal["fcfs", "lpm"] = _f(
        "fcfs", "waiting-queue order: fcfs, or lpm (longest cached prefix first)", choices=SCHEDULE_POLICIES
    )
    disable_radix_cache: bool = _f(False, "turn off prefix caching")
    schedule_conservativeness: float = _f(
        1.0, "scales the KV set aside for tokens running requests will still generate (0: none)"
    )
    attention_backend: str | None = _f(
        None, "triton (default on CUDA) or torch (default on CPU, the reference)", choices=ATTENTION_BACKENDS
    )
    cuda_graph_max_bs: int = _f(384, "largest decode batch replayed from a captured CUDA graph")
    disable_cuda_graph: bool = _f(False, "run decode eagerly (no CUDA graphs)")
    disable_overlap_schedule: bool = _f(
        False,
        "process each batch's results before launching the next one "
        "(by default the host plans batch k+1 while the device runs batch k)",
    )
    skip_tokenizer_init: bool = _f(False, "no tokenizer: input_ids in, output_ids out")
    # prefill/decode disaggregation
    disaggregation_mode: str = _f("null", "null (colocated), prefill or decode", choices=("null", "prefill", "decode"))
    disaggregation_bootstrap_port: int = _f(8998, "prefill: port of the bootstrap server decode workers ask for KV")
    disaggregation_transfer_backend: str = _f(
        "ucx", "KV transfer engine: ucx, or fake (in-process, tests only)", choices=("ucx", "fake")
    )
    disaggregation_ib_device: str | None = _f(
        None, "UCX network device(s) for the KV transfer (sets UCX_NET_DEVICES), e.g. mlx5_0:1"
    )
    disaggregation_data_host: str | None = _f(
        None,
        "address of this host the KV data path uses: UCX only on the network "
        "device holding it, advertised to peers (default: --host; 0.0.0.0: all "
        "devices, the host's outward address advertised)",
    )
    cluster_secret_file: str | None = _f(
        None,
        "file with the PD cluster secret (or $SGLANG_DISAGGREGATION_CLUSTER_SECRET): "
        "bootstrap fields, P/D links, routes and registrations are signed",
    )
    num_reserved_decode_tokens: int = _f(512, "decode: KV tokens reserved per admitted request beyond its prompt")
    register_with: str | None = _f(
        None, "router URL to register this worker with once healthy (deregistered on SIGTERM)"
    )
    # HTTP server
    host: str = _f("127.0.0.1", "address the HTTP server binds")
    port: int = _f(30000, "HTTP port")
    served_model_name: str | None = _f(None, "model id in the API (default: the model path)")
    chat_template: str | None = _f(None, "Jinja chat template file or inline template (default: the tokenizer's)")
    api_key: str | None = _f(None, "require 'Authorization: Bearer KEY' (health and metrics stay open)")
    max_queued_requests: int | None = _f(None, "requests waiting beyond the running batch before 503s")
    max_payload_size: int = _f(32 * 1024 * 1024, "largest request body in bytes (413 beyond)")
    shutdown_timeout: float = _f(30.0, "SIGTERM: seconds to let in-flight requests finish before aborting them")
    enable_metrics: bool = _f(False, "serve Prometheus metrics at /metrics")
    log_level: str = _f(
        "info", "debug, info, warning, error", choices=("debug", "info", "warning", "error", "critical")
    )
    log_requests: bool = _f(False, "log every request and its outcome")
    decode_log_interval: int = _f(40, "decode steps between 'Decode batch' throughput log lines (0: never)")

    def __post_init__(self) -> None:
        _check_choice("load_format", self.load_format, LOAD_FORMATS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("device", self.device, DEVICES)
        _check_choice("schedule_policy", self.schedule_policy, SCHEDULE_POLICIES)
        if self.attention_backend is not None:
            _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _check_int("page_size", self.page_size, 1)
        _check_int("cuda_graph_max_bs", self.cuda_graph_max_bs, 1)
        _check_int("decode_log_interval", self.decode_log_interval, 0)
        if (
            not isinstance(self.schedule_conservativeness, (int, float))
            or not 0 <= self.schedule_conservativeness <= 10
        ):
            raise ValueError(f"schedule_conservativeness must be in [0, 10], got {self.schedule_conservativeness!r}")
        _check_int("base_gpu_id", self.base_gpu_id, 0)
        _check_int("max_total_tokens", self.max_total_tokens, 1, optional=True)
        _check_int("max_running_requests", self.max_running_requests, 1, optional=True)
        _check_int("context_length", self.context_length, 1, optional=True)
        _check_int("max_prefill_tokens", self.max_prefill_tokens, 1)
        _check_int("random_seed", self.random_seed, 0)
        _check_choice("disaggregation_mode", self.disaggregation_mode, ("null", "prefill", "decode"))
        _check_choice("disaggregation_transfer_backend", self.disaggregation_transfer_backend, ("ucx", "fake"))
        _check_int("disaggregation_bootstrap_port", self.disaggregation_bootstrap_port, 1)
        _check_int("num_reserved_decode_tokens", self.num_reserved_decode_tokens, 0)
        _check_int("port", self.port, 1)
        if self.port > 65535:
            raise ValueError(f"port must be in [1, 65535], got {self.port}")
        _check_int("max_queued_requests", self.max_queued_requests, 0, optional=True)
        _check_int("max_payload_size", self.max_payload_size, 1)
        if not isinstance(self.shutdown_timeout, (int, float)) or self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout!r}")
        _check_choice("log_level", self.log_level, ("debug", "info", "warning", "error", "critical"))
        if (
            not isinstance(self.chunked_prefill_size, int)
            or isinstance(self.chunked_prefill_size, bool)
            or (self.chunked_prefill_size != -1 and self.chunked_prefill_size < 1)
        ):
            raise ValueError(
                f"chunked_prefill_size must be -1 or a positive integer, got {self.chunked_prefill_size!r}"
            )
        if not isinstance(self.mem_fraction_static, (int, float)) or not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ServerArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown server argument(s): {', '.join(unknown)}")
        return cls(**kwargs)

    @property
    def effective_chunk_size(self) -> int | None:
        """Per-step prompt-token budget; None when chunking is off."""
        return None if self.chunked_prefill_size == -1 else self.chunked_prefill_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def public_dict(self) -> dict[str, Any]:
        """to_dict() without secrets, for /get_server_info and logs."""
        d = self.to_dict()
        for secret in ("api_key", "cluster_secret_file"):
            if d.get(secret):
                d[secret] = "***"
        return d

    def cluster_key(self) -> ClusterKey | None:
        """The PD cluster secret (--cluster-secret-file, else $SGLANG_DISAGGREGATION_CLUSTER_SECRET); None without
        one. Read once per (file, env value) per process; ValueError on an unreadable file or a short secret."""
        return _cluster_key(self.cluster_secret_file, os.environ.get(ENV_VAR, ""))

    def bootstrap_key(self) -> ClusterKey | None:
        """The key bootstrap fields must be signed with: a PD worker's cluster key (a colocated worker ignores
        bootstrap fields, so checks none)."""
        return None if self.disaggregation_mode == "null" else self.cluster_key()

    @property
    def data_host(self) -> str:
        """Where the KV data path binds: --disaggregation-data-host, else --host."""
        return self.disaggregation_data_host or self.host

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_path


@functools.lru_cache(maxsize=8)
def _cluster_key(secret_file: str | None, env_value: str) -> ClusterKey | None:
    return load_cluster_key(secret=env_value or None, secret_file=secret_file)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_int(name: str, value: Any, low: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def add_server_args(parser: argparse.ArgumentParser, cls: type = ServerArgs) -> None:
    """One ``--flag-name`` per dataclass field; defaults stay unset so a YAML config can fill them."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata.get("help")}
        if f.default is False:
            kw["action"] = "store_true"
        elif f.default is True:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _flag_type(f)
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kw)


def _flag_type(f: dataclasses.Field) -> Any:
    text = str(f.type)
    if text.startswith("int"):
        return int
    if text.startswith("float"):
        return float
    return str
