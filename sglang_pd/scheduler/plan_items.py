"""Request <-> batch messages: the PlanItem a request sends down, and how its ItemResult lands on it."""

from __future__ import annotations

from sglang_pd.sampling.sampler import SamplingRow
from sglang_pd.scheduler.batch import ItemResult, PlanItem
from sglang_pd.scheduler.req import Req
from sglang_pd.scheduler.stop_checker import StopChecker


def make_plan_item(req: Req, n: int, stop: StopChecker) -> PlanItem:
    """Positions ``[req.num_computed_tokens, + n)``; samples iff that reaches the last known token."""
    start = req.num_computed_tokens
    sampling = None
    if start + n == req.seq_len:
        sampling = _sampling_row(req, stop)
    offset, targets = _input_logprob_targets(req, start, n)
    return PlanItem(
        token_ids=tuple(req.token_ids(start, start + n)),
        start_pos=start,
        page_ids=tuple(req.pages),
        sampling=sampling,
        input_logprob_offset=offset,
        input_logprob_targets=targets,
        input_top_logprobs_num=req.logprob.top_logprobs_num if targets else 0,
    )


def needs_token_history(req: Req) -> bool:
    """The sampler reads the request's token ids (penalties): its planning must wait for every
    in-flight sample to reach the host."""
    p = req.params
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _sampling_row(req: Req, stop: StopChecker) -> SamplingRow:
    p = req.params
    needs_ids = needs_token_history(req)
    assert not (needs_ids and req.pending_ids), "penalised requests are planned only without in-flight samples"
    return SamplingRow(
        params=p,
        seed=req.seed,
        step=req.num_sampled,
        prompt_ids=tuple(req.prompt_ids) if needs_ids else (),
        output_ids=tuple(req.output_ids) if needs_ids else (),
        min_tokens_blocked_ids=stop.blocked_ids(req),
        top_logprobs_num=req.logprob.top_logprobs_num if req.logprob.return_logprob else 0,
        return_logprob=req.logprob.return_logprob,
    )


def _input_logprob_targets(req: Req, start: int, n: int) -> tuple[int, tuple[int, ...]]:
    """Prompt token j >= max(start_len, 1) gets its logprob from the logits at position j - 1."""
    if not req.wants_input_logprobs:
        return 0, ()
    first_target = max(req.logprob.start_len + len(req.logprobs.input_token), 1)
    lo = max(first_target - 1, start)
    hi = min(len(req.prompt_ids) - 1, start + n)
    if lo >= hi:
        return 0, ()
    return lo - start, tuple(req.prompt_ids[lo + 1 : hi + 1])


def record_result(req: Req, start: int, res: ItemResult) -> bool:
    """Apply one step's result to ``req``; True iff a new token was appended."""
    rec = req.logprobs
    if req.wants_input_logprobs and req.logprob.start_len == 0 and start == 0 and not rec.input_token:
        rec.input_token.append((None, req.prompt_ids[0]))
        rec.input_top.append(None)
    if res.input_logprobs:
        first = req.logprob.start_len + len(rec.input_token)
        for k, lp in enumerate(res.input_logprobs):
            rec.input_token.append((lp, req.prompt_ids[first + k]))
        if res.input_top_logprobs:
            rec.input_top.extend(list(t) for t in res.input_top_logprobs)
        else:
            rec.input_top.extend([None] * len(res.input_logprobs))
    if res.next_token_id is None:
        return False
    if req.pending_ids:  # the oldest placeholder is this token
        req.pending_ids.pop(0)
    req.output_ids.append(res.next_token_id)
    if req.logprob.return_logprob and res.logprob is not None:
        rec.output_token.append((res.logprob, res.next_token_id))
        if res.top_logprobs is not None:
            rec.output_top.append(list(res.top_logprobs))
    return True
