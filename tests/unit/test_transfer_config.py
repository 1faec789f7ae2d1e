"""TransferConfig.from_env: SGLang's variable names, defaults, lenient parsing with a warning per bad value."""

from __future__ import annotations

import logging

import pytest

from transfer.config import TransferConfig, default_thread_pool_size


def test_defaults() -> None:
    c = TransferConfig.from_env({})
    assert (c.queue_size, c.bootstrap_timeout, c.waiting_timeout) == (4, 300.0, 300.0)
    assert (c.heartbeat_interval, c.heartbeat_max_failure, c.test_failure_prob) == (5.0, 2, 0.0)
    assert c.max_message_mb == 256.0
    assert c.thread_pool_size == default_thread_pool_size()
    assert [default_thread_pool_size(n) for n in (1, 8, 64, 128, 1024)] == [4, 4, 6, 12, 12]


def test_reads_every_variable() -> None:
    env = {
        "SGLANG_DISAGGREGATION_THREAD_POOL_SIZE": "6",
        "SGLANG_DISAGGREGATION_QUEUE_SIZE": "8",
        "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "12.5",
        "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": " 30 ",
        "SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": "0.5",
        "SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "3",
        "SGLANG_DISAGGREGATION_TEST_FAILURE_PROB": "0.25",
        "SGLANG_DISAGGREGATION_MAX_MESSAGE_MB": "64",
    }
    c = TransferConfig.from_env(env)
    assert c == TransferConfig(
        thread_pool_size=6,
        queue_size=8,
        bootstrap_timeout=12.5,
        waiting_timeout=30.0,
        heartbeat_interval=0.5,
        heartbeat_max_failure=3,
        test_failure_prob=0.25,
        max_message_mb=64.0,
    )


@pytest.mark.parametrize(
    "name,raw",
    [
        ("THREAD_POOL_SIZE", "many"),
        ("THREAD_POOL_SIZE", "0"),
        ("QUEUE_SIZE", "2.5"),
        ("QUEUE_SIZE", "-1"),
        ("BOOTSTRAP_TIMEOUT", "soon"),
        ("BOOTSTRAP_TIMEOUT", "0"),
        ("WAITING_TIMEOUT", "nan"),
        ("HEARTBEAT_INTERVAL", "-5"),
        ("HEARTBEAT_MAX_FAILURE", "two"),
        ("TEST_FAILURE_PROB", "1.5"),
        ("TEST_FAILURE_PROB", "-0.1"),
        ("MAX_MESSAGE_MB", "0"),
    ],
)
def test_bad_value_warns_and_falls_back(name: str, raw: str, caplog: pytest.LogCaptureFixture) -> None:
    var = "SGLANG_DISAGGREGATION_" + name
    with caplog.at_level(logging.WARNING, logger="transfer.config"):
        c = TransferConfig.from_env(
            {
                var: raw,
                "SGLANG_DISAGGREGATION_QUEUE_SIZE"
                if name != "QUEUE_SIZE"
                else "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "7",
            }
        )
    assert getattr(c, name.lower()) == getattr(TransferConfig(), name.lower())
    assert any(var in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert (c.queue_size == 7) if name != "QUEUE_SIZE" else (c.waiting_timeout == 7.0)  # good values still apply


def test_empty_value_is_default_and_effective_values_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="transfer.config"):
        c = TransferConfig.from_env({"SGLANG_DISAGGREGATION_QUEUE_SIZE": ""})
    assert c.queue_size == 4
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(logged) == 1 and "SGLANG_DISAGGREGATION_QUEUE_SIZE=4" in logged[0]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_frozen() -> None:
    with pytest.raises(AttributeError):
        TransferConfig().queue_size = 3  # type: ignore[misc]
