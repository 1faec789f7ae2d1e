"""router: the aiohttp front door of a cluster, in PD mode (prefill/decode pairs) or regular mode (a worker pool).

It speaks HTTP only and imports nothing from sglang_pd, transfer or pd_kernels.

Data flow of one inference request (``/generate``, ``/v1/completions``, ``/v1/chat/completions``)::

  client ──> app (middlewares: errors -> request id -> auth: inference key / admin key or loopback / cluster signature)
         ──> inference_routes: read body (413/400, bounded JSON) -> validation (400) -> admission (429/408)
         ──> jobs / fanout: one Job per worker call (PD: one per choice, scalar bootstrap fields, signed
                with the cluster secret; a client's own bootstrap fields are dropped)
         ──> dispatch: policies pick workers (503 if none) -> legs.PairCall -> retry before the first byte
                (worker faults only: connection failures, 502/503/504, a dead worker process; ``faults``)
                legs: regular worker, or P and D concurrently (P failing aborts D and vice versa)
                upstream: pooled keep-alive HTTP/1.1 client (h1_*), stale-connection recovery, /abort_request
         ──> responder: whole JSON, or SSE forwarded event by event (late errors as a final event)

Modules:
  launch_router     ``python -m router.launch_router`` / console script ``sglang-pd-router``; SIGTERM drain
  cli, config       SGLang router flags (+ ``--config`` YAML) -> frozen ``RouterConfig``
  app, app_keys     the aiohttp app: middlewares, routes, lifecycle of ``RouterState``
  state             ``RouterState``: everything one router owns (no module-level state)
  inference_routes  the three inference routes; admin_routes: health, /workers, info fan-out, /metrics
  validation        request checks before dispatch -> ``Parsed`` summary
  jobs, fanout      what is sent (rids, PD fields, P never streams); PD split per choice and merge back
  dispatch, legs    picking, attempts, retries; one attempt's worker calls, aborts and accounting
  logprob_merge     P's prompt logprobs into D's answer
  responder, sse    writing answers; whole-event SSE splitting and rewriting
  upstream          worker calls (one request = one write), their ``LegError``s, aborts
  faults            whose fault a failed call is (client vs worker), what is retried, "process died" answers
  h1_client, h1_conn, h1_parser   the lean HTTP/1.1 client under upstream: per-worker keep-alive pool,
                    one connection's asyncio Protocol, response parsing without I/O (chunked, length)
  worker, registry  per-worker runtime state; the registry with drain-on-delete
  health            background probes: eject after N failures (at once when a worker process died),
                    re-admit after M successes; admission half-opens the worker's circuit
  circuit_breaker   per-worker closed/open/half-open breaker (health checks end an open circuit early)
  admission         bounded concurrency + bounded FIFO queue
  policies, prefix_tree   random / round_robin / power_of_two / cache_aware as pure functions
  metrics           ``sgl_router_*`` Prometheus metrics in the app's own registry
  errors            the OpenAI error envelope
"""
