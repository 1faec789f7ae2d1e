"""Scheduling: which positions of which requests the next forward computes.

req          Req (status enum, counters), FinishReason, logprob records
batch        BatchPlan (down to the model runner) / BatchResult (up): the only two messages across
kv_manager   pages between pool, radix cache and requests (admit / reserve / release)
policy       waiting-queue order: fcfs, lpm
plan_items   Req -> PlanItem, ItemResult -> Req
stop_checker EOS / stop ids / stop strings / length
inflight     a launched batch whose results have not reached the host (overlap)
new_token_ratio  admission headroom for tokens not generated yet
step_log     SGLang-style batch log lines
scheduler    the step loop: plan -> run -> process results; chunked prefill; retraction
"""
