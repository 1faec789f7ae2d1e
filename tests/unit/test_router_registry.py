"""Worker registry, drain, health-probe state machine, and admission control (no sockets)."""

from __future__ import annotations

import asyncio

import pytest

from router.admission import Admission
from router.config import BreakerConfig, HealthConfig, WorkerSpec
from router.errors import APIError
from router.health import apply_probe
from router.registry import WorkerRegistry
from router.worker import Health, Worker

BREAKER = BreakerConfig(2, 1, 10.0, 60.0, True)
HEALTH = HealthConfig(interval_s=1.0, timeout_s=1.0, failure_threshold=3, success_threshold=2, endpoint="/health")
pytestmark = pytest.mark.timeout(30)


def regular(url: str = "http://w:1") -> WorkerSpec:
    return WorkerSpec(url, "regular")


def healthy(worker: Worker) -> Worker:
    apply_probe(worker, None, HEALTH)
    return worker


@pytest.mark.asyncio
async def test_add_is_idempotent_per_role_and_refuses_role_changes():
    reg = WorkerRegistry(("prefill", "decode"), BREAKER)
    w, created = reg.add(WorkerSpec("http://p:1", "prefill", 8998))
    assert created and w.health is Health.PENDING and not w.available
    again, created = reg.add(WorkerSpec("http://p:1", "prefill", 9000))
    assert again is w and not created and w.spec.bootstrap_port == 9000
    with pytest.raises(APIError) as e:
        reg.add(WorkerSpec("http://p:1", "decode"))
    assert e.value.status == 409
    with pytest.raises(APIError) as e:
        reg.add(regular())
    assert e.value.status == 400


@pytest.mark.asyncio
async def test_drain_stops_new_requests_and_removes_when_idle():
    reg = WorkerRegistry(("regular",), BREAKER)
    removed: list[str] = []
    reg.on_remove.append(lambda w: removed.append(w.url))
    w = healthy(reg.add(regular())[0])
    w.acquire()
    reg.drain(w.url)
    assert w.draining and not w.available and reg.available("regular") == []
    assert reg.get(w.url) is w  # still there: one call in flight
    w.release()
    await asyncio.wait_for(_until(lambda: reg.get(w.url) is None), 2)
    assert removed == [w.url]
    idle = healthy(reg.add(regular("http://w:2"))[0])
    reg.drain(idle.url)
    assert reg.get(idle.url) is None  # idle: removed at once
    with pytest.raises(APIError) as e:
        reg.drain("http://nobody:1")
    assert e.value.status == 404


@pytest.mark.asyncio
async def test_re_registering_cancels_a_drain():
    reg = WorkerRegistry(("regular",), BREAKER)
    w = healthy(reg.add(regular())[0])
    w.acquire()
    reg.drain(w.url)
    reg.add(regular())
    assert not w.draining and w.available
    w.release()
    await asyncio.sleep(0)  # give a (cancelled) drain task its chance to run
    assert reg.get(w.url) is w


async def _until(pred) -> None:
    while not pred():
        await asyncio.sleep(0.005)


def test_health_state_machine():
    w = Worker(regular(), BREAKER)
    assert apply_probe(w, "refused", HEALTH) is None and w.health is Health.PENDING  # never seen alive
    assert apply_probe(w, None, HEALTH) == "admitted" and w.health is Health.HEALTHY  # one good probe admits
    assert apply_probe(w, "x", HEALTH) is None and apply_probe(w, "x", HEALTH) is None
    assert w.suspect and w.available
    assert apply_probe(w, "x", HEALTH) == "ejected" and w.health is Health.UNHEALTHY and not w.available
    assert apply_probe(w, None, HEALTH) is None and w.health is Health.UNHEALTHY  # needs 2 in a row
    assert apply_probe(w, "x", HEALTH) is None
    assert apply_probe(w, None, HEALTH) is None
    assert apply_probe(w, None, HEALTH) == "admitted" and w.available and not w.suspect


def test_worker_availability_follows_the_circuit():
    w = healthy(Worker(regular(), BREAKER))
    w.breaker.record_failure()
    w.breaker.record_failure()
    assert not w.available and w.describe()["circuit_state"] == "open"


@pytest.mark.asyncio
async def test_admission_queue_full_429_and_timeout_408():
    adm = Admission(max_concurrent=1, queue_size=1, queue_timeout_s=0.2)
    await adm.acquire()
    waiter = asyncio.ensure_future(adm.acquire())
    await asyncio.sleep(0)
    assert adm.state() == (1, 1)
    with pytest.raises(APIError) as e:
        await adm.acquire()
    assert e.value.status == 429 and e.value.retry_after
    with pytest.raises(APIError) as e:
        await waiter
    assert e.value.status == 408 and adm.state() == (1, 0)
    adm.release()
    assert adm.state() == (0, 0)


@pytest.mark.asyncio
async def test_admission_hands_slots_over_in_fifo_order_and_survives_cancellation():
    adm = Admission(max_concurrent=1, queue_size=5, queue_timeout_s=5)
    await adm.acquire()
    order: list[int] = []

    async def take(i: int) -> None:
        await adm.acquire()
        order.append(i)

    first, gone, third = (asyncio.ensure_future(take(i)) for i in (1, 2, 3))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.wait_for(_until(lambda: adm.queued == 2), 2)
    adm.release()
    await first
    adm.release()
    await third
    assert order == [1, 3] and adm.state() == (1, 0)
    adm.release()
    unbounded = Admission(0, 0, 1.0)
    for _ in range(100):
        await unbounded.acquire()
    assert unbounded.running == 100


def test_a_died_probe_ejects_at_once_and_readmission_half_opens_the_circuit():
    from router.circuit_breaker import CircuitState
    from router.faults import ProbeFailure, probe_failure

    w = healthy(Worker(regular(), BREAKER))
    died = probe_failure("/health", 503, b'{"status": "unhealthy", "reason": "child process died: scheduler"}')
    assert died.fatal and "child process died" in str(died)
    assert not probe_failure("/health", 503, b'{"status": "unhealthy", "reason": "draining"}').fatal
    assert not ProbeFailure("http://died-host:1 failed: refused").fatal  # only a worker's own answer says "died"
    assert apply_probe(w, died, HEALTH) == "ejected" and w.health is Health.UNHEALTHY and w.fail_streak == 1
    w.breaker.record_failure()
    w.breaker.record_failure()
    assert w.breaker.state is CircuitState.OPEN
    assert apply_probe(w, None, HEALTH) is None and w.breaker.state is CircuitState.OPEN
    assert apply_probe(w, None, HEALTH) == "admitted" and w.breaker.state is CircuitState.HALF_OPEN and w.available
    pending = Worker(regular("http://w:9"), BREAKER)
    assert apply_probe(pending, died, HEALTH) is None and pending.health is Health.UNHEALTHY  # never admitted
    assert apply_probe(pending, None, HEALTH) is None and apply_probe(pending, None, HEALTH) == "admitted"


@pytest.mark.asyncio
async def test_re_registering_an_ejected_worker_makes_it_pending_again():
    reg = WorkerRegistry(("regular",), BREAKER)
    w = healthy(reg.add(regular())[0])
    w.health = Health.UNHEALTHY
    reg.add(regular())
    assert w.health is Health.PENDING
    assert apply_probe(w, None, HEALTH) == "admitted"  # the registration's own probe admits it
