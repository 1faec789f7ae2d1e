"""The cluster secret: short-lived HMAC-SHA256 tokens that bind a purpose and a payload.

Who signs what (README "Security"):
  router -> P and D   ``bootstrap_token`` over (bootstrap_host, bootstrap_port, bootstrap_room): a worker
                      accepts bootstrap fields only from a holder of the secret, so a client cannot name
                      another request's room or make D dial a host of its choosing
  D -> P              its link (Hello) and any ``PUT /route`` on P's bootstrap server
  worker -> router    its registration (``--register-with``) when no admin key is given

A token is ``"<expiry unix seconds>.<hex mac>"``, the mac taken over the canonical JSON of
``[purpose, expiry, payload]``. Tokens expire (``ttl_s``) so a captured one is useful only briefly;
replays inside that window are stopped where it matters by the rooms themselves (P accepts one
registration per live room). Comparison is constant-time.

Without a secret nothing is signed or checked (the behaviour of a private network; the worker and
the router log a warning at startup).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass
from typing import Any

ENV_VAR = "SGLANG_DISAGGREGATION_CLUSTER_SECRET"
SIGNATURE_HEADER = "X-SGLang-PD-Signature"  # carries a token on signed HTTP calls (routes, registrations)
MIN_SECRET_BYTES = 16
DEFAULT_TTL_S = 600.0
CLOCK_SKEW_S = 30.0  # a token stamped this far in the future (another host's clock) still passes
UNSIGNED_WARNING = (
    "no cluster secret (--cluster-secret-file or $" + ENV_VAR + "): the PD control plane is unauthenticated; "
    "run this cluster on a private network only (README: Security)"
)


class ClusterAuthError(ValueError):
    """A token is missing, malformed, expired or does not match its payload."""


@dataclass(frozen=True, repr=False)
class ClusterKey:
    secret: bytes

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the cluster secret must be at least {MIN_SECRET_BYTES} bytes long")

    def __repr__(self) -> str:  # never print the secret
        return "ClusterKey(***)"

    def sign(self, purpose: str, payload: Any, ttl_s: float = DEFAULT_TTL_S, now: float | None = None) -> str:
        expiry = int((time.time() if now is None else now) + ttl_s)
        return f"{expiry}.{self._mac(purpose, expiry, payload)}"

    def verify(self, purpose: str, payload: Any, token: Any, now: float | None = None) -> None:
        """Return if ``token`` signs ``payload`` for ``purpose`` and has not expired; else ClusterAuthError."""
        if not isinstance(token, str) or not token:
            raise ClusterAuthError(f"missing {purpose} token")
        expiry_text, _, mac = token.partition(".")
        if not expiry_text.isdigit() or len(expiry_text) > 12 or not mac:
            raise ClusterAuthError(f"malformed {purpose} token")
        expiry = int(expiry_text)
        if not hmac.compare_digest(mac, self._mac(purpose, expiry, payload)):
            raise ClusterAuthError(f"{purpose} token does not match (wrong cluster secret or altered fields)")
        if expiry + CLOCK_SKEW_S < (time.time() if now is None else now):
            raise ClusterAuthError(f"{purpose} token expired")

    def _mac(self, purpose: str, expiry: int, payload: Any) -> str:
        message = json.dumps([purpose, expiry, payload], sort_keys=True, separators=(",", ":"))
        return hmac.new(self.secret, message.encode(), hashlib.sha256).hexdigest()


def body_digest(method: str, path: str, body: bytes) -> list[str]:
    """The payload that signs one HTTP request: method, path and the body's SHA-256.

    ``path`` includes the decoded ``?query`` when the request has one (``/workers?url=http://h:1``), so a
    signed withdrawal names the one worker it withdraws."""
    return [method.upper(), path, hashlib.sha256(body).hexdigest()]


def load_cluster_key(secret: str | None = None, secret_file: str | None = None) -> ClusterKey | None:
    """The key from a secret file (trailing whitespace stripped), a literal, or $SGLANG_DISAGGREGATION_CLUSTER_SECRET.

    The first given wins in that order; None when none is given. ValueError on an unreadable file or a
    secret shorter than MIN_SECRET_BYTES."""
    if secret_file:
        try:
            with open(secret_file, "rb") as f:
                raw = f.read().strip()
        except OSError as e:
            raise ValueError(f"cannot read the cluster secret file {secret_file}: {e.strerror}") from e
        return ClusterKey(raw)
    value = secret if secret else os.environ.get(ENV_VAR, "")
    return ClusterKey(value.encode()) if value else None
