"""meta_info["kv_transfer"] of a PD request, from its room's transfer stats."""

from __future__ import annotations

from typing import Any

from sglang_pd.scheduler.req import Req
from transfer.base import DecodeTransfer, PrefillTransfer


def transfer_meta(transfer: PrefillTransfer | DecodeTransfer, req: Req) -> dict[str, Any] | None:
    if req.bootstrap is None:
        return None
    st = transfer.stats(req.bootstrap.room)
    return {"bytes": st.num_bytes, "ms": round(st.ms, 3), "gb_per_s": round(st.gb_per_s, 3), "path": st.path}
