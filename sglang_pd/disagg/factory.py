"""--disaggregation-mode -> the scheduler hooks (and transfer engine) a worker runs with."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Literal

import torch

from pd_common.cluster_auth import UNSIGNED_WARNING
from sglang_pd.disagg.hooks import NullHooks, SchedulerHooks
from sglang_pd.models.config import ModelConfig
from sglang_pd.server_args import ServerArgs
from transfer.base import EngineDescription

if TYPE_CHECKING:
    from transfer.fake_engine import FakeTransferHub

logger = logging.getLogger(__name__)


def engine_description(model_config: ModelConfig, dtype: torch.dtype, page_size: int) -> EngineDescription:
    mc = model_config
    return EngineDescription(
        model_id=f"{mc.architecture}:L{mc.num_hidden_layers}:H{mc.hidden_size}:V{mc.vocab_size}",
        architecture=mc.architecture,
        dtype=str(dtype).replace("torch.", ""),
        num_layers=mc.num_hidden_layers,
        num_kv_heads=mc.num_key_value_heads,
        head_dim=mc.head_dim,
        page_size=page_size,
    )


def build_hooks(
    args: ServerArgs,
    model_config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    kv_buffer: torch.Tensor,
    hub: FakeTransferHub | None = None,
) -> SchedulerHooks:
    """NullHooks for a colocated worker; prefill/decode hooks with a started transfer engine otherwise.

    The engine gets the cluster key (``UNSIGNED_WARNING`` is logged once here when there is none) and the
    data host (``--disaggregation-data-host``, else ``--host``): UCX uses only the network device(s) holding it.

    ``hub`` is the in-process FakeTransferHub shared by a P and a D built in one process (tests).
    """
    if args.disaggregation_mode == "null":
        return NullHooks()
    mode: Literal["prefill", "decode"] = "prefill" if args.disaggregation_mode == "prefill" else "decode"
    backend: Literal["ucx", "fake"] = "fake" if args.disaggregation_transfer_backend == "fake" else "ucx"
    from transfer import create_transfer
    from transfer.config import TransferConfig

    if args.disaggregation_ib_device:
        os.environ.setdefault("UCX_NET_DEVICES", args.disaggregation_ib_device)
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    desc = engine_description(model_config, dtype, args.page_size)
    key = args.cluster_key()
    if key is None:
        logger.warning(UNSIGNED_WARNING)
    transfer = create_transfer(
        mode,
        backend,
        kv_buffer,
        desc,
        TransferConfig.from_env(),
        args.host,
        args.disaggregation_bootstrap_port,
        hub if backend == "fake" else None,
        data_host=args.data_host,
        cluster_key=key,
    )
    transfer.start()
    logger.info(
        "%s worker: %s transfer engine started (bootstrap port %s, data host %s, %s)",
        mode,
        args.disaggregation_transfer_backend,
        args.disaggregation_bootstrap_port,
        args.data_host,
        "signed control plane" if key is not None else "UNSIGNED control plane",
    )
    if mode == "prefill":
        from sglang_pd.disagg.prefill import PrefillHooks

        return PrefillHooks(transfer, device)  # type: ignore[arg-type]
    from sglang_pd.disagg.decode import DecodeHooks

    return DecodeHooks(transfer, args.num_reserved_decode_tokens)  # type: ignore[arg-type]
