"""Online serving benchmark (``bench/serving.py``), split by concept.

Data flow of one run:

    config.BenchConfig (from CLI flags)
      -> datasets.build_prompts      random / random-ids prompts, exact seeds
      -> arrivals.arrival_gaps        Poisson inter-arrival gaps (``inf`` = all at once)
      -> runner.run_benchmark         one aiohttp session, warm-up, semaphore, progress bar
           -> client.send_request     one HTTP request; sse.SSEParser turns bytes into events,
                                      backends.APPLIERS[backend] apply each event to a
                                      records.StreamState, which ends as a records.RequestRecord
      -> metrics.compute_metrics      pure: records + duration -> BenchMetrics
      -> report.format_table / report.result_json (one JSON line per run with --output-file)

Metric definitions follow SGLang's ``bench_serving``: TTFT is the time to the first chunk carrying
content, ITL the gaps between content chunks (a chunk carrying k > 1 tokens contributes k equal
gaps), TPOT per request ``(e2e - ttft) / (output_tokens - 1)``, concurrency ``sum(e2e) / duration``.
"""
