"""Whose fault a failed worker call is (``router.faults``), what is retried, and the LegErrors built from it."""

from __future__ import annotations

import json

import pytest

from router import faults
from router.config import BreakerConfig, WorkerSpec
from router.upstream import died_error, status_error, transport_error
from router.worker import Worker

W = Worker(WorkerSpec("http://w:1", "decode"), BreakerConfig(3, 1, 1.0, 1.0, True))


def env(status: int, param: str | None = None, type_: str = "InternalServerError", code: int | None = None) -> bytes:
    return json.dumps({"error": {"message": "m", "type": type_, "param": param, "code": code or status}}).encode()


@pytest.mark.parametrize(
    "status, raw, fault, retry",
    [
        (400, env(400), False, False),
        (404, env(404), False, False),
        (429, env(429), False, False),
        (500, env(500), True, False),  # an internal error: the worker's, but the same request would hit it again
        (500, b"500 Internal Server Error", True, False),
        (502, b"bad gateway", True, True),
        (503, env(503), True, True),
        (504, env(504), True, True),
        (503, env(503, param="max_tokens"), False, False),  # blames a parameter: the request's fault
        (500, env(500, type_="BadRequestError"), False, False),
        (500, env(500, code=400), False, False),
    ],
)
def test_answers_are_classified(status, raw, fault, retry):
    e = status_error(W, status, raw)
    assert (e.worker_fault, e.retryable, e.fatal, e.transport) == (fault, retry, False, False)


def test_transport_and_died_errors():
    refused = transport_error(W, ConnectionRefusedError(111, "refused"))
    assert refused.worker_fault and refused.retryable and refused.transport and refused.status == 502
    read_timeout = transport_error(W, TimeoutError())
    assert read_timeout.worker_fault and not read_timeout.retryable and read_timeout.status == 504
    died = died_error(W, "worker process died: scheduler")
    assert died.worker_fault and died.retryable and died.fatal and "died" in died.message


def test_abort_verdicts():
    native = {
        "text": "",
        "meta_info": {"finish_reason": {"type": "abort", "message": "worker process died: scheduler"}},
    }
    client = {"text": "", "meta_info": {"finish_reason": {"type": "abort", "message": "aborted by the client"}}}
    openai = {"choices": [{"index": 0, "text": "", "finish_reason": "abort"}]}
    chat = {"choices": [{"index": 0, "delta": {}, "finish_reason": "abort"}]}
    done = {"meta_info": {"finish_reason": {"type": "length", "length": 4}}, "choices": [{"finish_reason": "stop"}]}
    assert faults.abort_verdict([native]) == ("died", "worker process died: scheduler")
    assert faults.abort_verdict([[done, native]]) == ("died", "worker process died: scheduler")  # a batch
    assert faults.abort_verdict([client]) == (None, None)
    assert faults.abort_verdict([openai]) == ("unknown", None) == faults.abort_verdict([chat])
    assert faults.abort_verdict([done, None, "x", 3]) == (None, None)
    assert faults.says_died("Child process DIED: detokenizer") and not faults.says_died(None)
