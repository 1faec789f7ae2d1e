"""Online serving benchmark (``bench/serving.py``), split by concept.

Data flow of one run:

    config.BenchConfig (from CLI flags)
      -> datasets.build_prompts      random / random-ids (datasets), generated-shared-prefix
                                      (shared_prefix), chat-synthetic (chat_synthetic); all seeded,
                                      all made of prompt.Prompt
      -> arrivals.arrival_gaps        Poisson (or gamma, --burstiness) inter-arrival gaps
      -> runner.run_benchmark         one aiohttp session, warm-up, client.flush_cache, semaphore,
                                      progress (tqdm or a counter)
           -> client.send_request     one HTTP request; sse.SSEParser turns bytes into events,
                                      backends.APPLIERS[backend] apply each event to a
                                      records.StreamState, which ends as a records.RequestRecord
      -> metrics.compute_metrics      pure: records + duration (+ slo.SLO) -> BenchMetrics
      -> report.format_table / report.result_json (one JSON line per run with --output-file)
      -> plots                        latency CDFs of a run; metric-vs-rate charts of many JSON lines

compare builds the pd-vs-colocated tables (bench/pd_vs_colocated.py) from the JSON lines.

Metric definitions follow SGLang's ``bench_serving``: TTFT is the time to the first chunk carrying
content, ITL the gaps between content chunks (a chunk carrying k > 1 tokens contributes k equal
gaps), TPOT per request ``(e2e - ttft) / (output_tokens - 1)``, concurrency ``sum(e2e) / duration``.
Goodput and the SLO keys are defined in slo.py.
"""
