"""Batched sampler: logits processors, then greedy argmax or a seeded exponential race.

Pipeline over raw logits [B, V] (on a float32 working copy; raw logits stay untouched for logprobs):
  1. logit_bias (additive)                     4. min_new_tokens: blocked ids -> -inf
  2. repetition penalty (HF, prompt + output)  5. greedy rows: argmax
  3. frequency / presence (OpenAI, output)     6. sampled rows: / temperature, softmax, top_k,
                                                  top_p, min_p (each on the renormalised
                                                  survivors, as HF's warpers), race
The race picks argmax_v p_v / E_v with E_v ~ Exp(1) i.i.d., which is a draw from p / sum(p) (so no
renormalisation is needed). E_v = noise.exponential(seed, step, v): a row's token depends only on
its own logits, params, seed and step, never on its batch neighbours, its row, or device RNG state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from sglang_pd.sampling import noise
from sglang_pd.sampling.params import SEED_MODULUS, SamplingParams


@dataclass(frozen=True)
class SamplingRow:
    """What the scheduler knows about one sampling request at one step."""

    params: SamplingParams
    seed: int  # the request's seed (its own or drawn at admission); reduced mod 2**63
    step: int  # tokens generated so far (== len(output_ids)): the random counter
    prompt_ids: Sequence[int] = ()  # read only when params.repetition_penalty != 1
    output_ids: Sequence[int] = ()  # read for penalties and the min_new_tokens test
    min_tokens_blocked_ids: tuple[int, ...] = ()  # -inf while len(output_ids) < min_new_tokens
    top_logprobs_num: int = 0  # 0 = none
    return_logprob: bool = False


@dataclass(frozen=True)
class SampleOutput:
    """Device tensors only: sampling never waits for the device (the host reads results later)."""

    next_token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32, log_softmax(raw logits)[chosen]; None if no row asked
    # Top logprobs of the raw distribution, [B, k] descending, k = the largest count asked for; row i
    # keeps its first top_logprobs_nums[i]. None when no row asked.
    top_values: torch.Tensor | None
    top_ids: torch.Tensor | None
    top_logprobs_nums: tuple[int, ...]

    def top_logprobs(self) -> list[tuple[list[float], list[int]] | None] | None:
        """Per row: (logprobs descending, token ids), or None for rows that asked for none (host read)."""
        if self.top_values is None or self.top_ids is None:
            return None
        return top_logprob_lists(self.top_values.tolist(), self.top_ids.tolist(), self.top_logprobs_nums)


def top_logprob_lists(
    values: list[list[float]], ids: list[list[int]], nums: Sequence[int]
) -> list[tuple[list[float], list[int]] | None]:
    return [(values[i][:n], ids[i][:n]) if n > 0 else None for i, n in enumerate(nums)]


@dataclass(frozen=True)
class Penalties:
    """Logit edits of steps 1-4; a field is None when no row of the batch needs it."""

    bias_index: torch.Tensor | None  # [2, N] int64 (row, token id), token ids in [0, V)
    bias_values: torch.Tensor | None  # [N] float32
    seen: torch.Tensor | None  # [B, V] bool: in prompt or output (rows with repetition != 1 only)
    repetition: torch.Tensor | None  # [B, 1] float32 in (0, 2]
    counts: torch.Tensor | None  # [B, V] float32: occurrences in output (penalised rows only)
    frequency: torch.Tensor | None  # [B, 1] float32 in [-2, 2]
    presence: torch.Tensor | None  # [B, 1] float32 in [-2, 2]
    blocked_index: torch.Tensor | None  # [2, M] int64 (row, token id) forced to -inf


@dataclass(frozen=True)
class DrawParams:
    """Parameters of the S non-greedy rows (S may be 0), in the order of ``rows``."""

    rows: torch.Tensor  # [S] int64, ascending row indices into the batch
    temperatures: torch.Tensor  # [S, 1] float32 > 0
    top_ks: torch.Tensor  # [S, 1] int64 in [1, V] (V = disabled)
    top_ps: torch.Tensor  # [S, 1] float32 in (0, 1]
    min_ps: torch.Tensor  # [S, 1] float32 in [0, 1]
    keys: tuple[torch.Tensor, torch.Tensor]  # [S] int64 in [0, 2**32): noise.row_keys(seed, step)
    needs_filter: bool  # some row restricts top_k, top_p or min_p


@dataclass(frozen=True)
class SamplingBatchInfo:
    batch_size: int
    vocab_size: int
    penalties: Penalties
    draw: DrawParams
    top_logprobs_nums: tuple[int, ...]  # [B]
    needs_logprobs: bool  # some row wants its logprob or top logprobs

    @classmethod
    def build(cls, rows: Sequence[SamplingRow], vocab_size: int, device: torch.device | str) -> SamplingBatchInfo:
        """Gather per-row parameters into device tensors (one cheap Python pass over the rows)."""
        nums = tuple(max(0, r.top_logprobs_num) for r in rows)
        return cls(
            batch_size=len(rows),
            vocab_size=vocab_size,
            penalties=_build_penalties(rows, vocab_size, torch.device(device)),
            draw=_build_draw(rows, vocab_size, torch.device(device)),
            top_logprobs_nums=nums,
            needs_logprobs=any(r.return_logprob for r in rows) or any(nums),
        )


class Sampler:
    """Stateless; ``sampler(logits, info)`` samples one token per row."""

    def __call__(self, logits: torch.Tensor, info: SamplingBatchInfo) -> SampleOutput:
        if tuple(logits.shape) != (info.batch_size, info.vocab_size):
            raise ValueError(f"logits shape {tuple(logits.shape)} != [{info.batch_size}, {info.vocab_size}]")
        x = apply_penalties(logits.to(torch.float32, copy=True), info.penalties)
        next_ids = torch.argmax(x, dim=-1)
        draw = info.draw
        if draw.rows.numel() > 0:
            sampled = _draw(x.index_select(0, draw.rows), draw)
            next_ids = next_ids.index_copy(0, draw.rows, sampled)
        logprobs, top_values, top_ids = _logprobs(logits, next_ids, info)
        return SampleOutput(next_ids, logprobs, top_values, top_ids, info.top_logprobs_nums)


# ----------------------------------------------------------------------------------------------
# Building the batch tensors.


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1)


def _index(pairs: Sequence[tuple[int, int]], device: torch.device) -> torch.Tensor | None:
    if not pairs:
        return None
    return torch.tensor(pairs, dtype=torch.int64, device=device).t().contiguous()


def _token_counts(
    id_lists: Sequence[Sequence[int]], owners: Sequence[int], num_rows: int, vocab: int, device: torch.device
) -> torch.Tensor:
    """[num_rows, V] float32: counts of each id of ``id_lists[j]`` in row ``owners[j]``.

    Ids outside [0, V) land in a padding column that is sliced off.
    """
    lengths = [len(ids) for ids in id_lists]
    total = sum(lengths)
    flat = np.fromiter(chain.from_iterable(id_lists), dtype=np.int64, count=total)  # 4x torch.tensor(list)
    ids_t = torch.from_numpy(flat).to(device)
    ids_t = torch.where((ids_t >= 0) & (ids_t < vocab), ids_t, vocab)
    row_t = torch.repeat_interleave(
        torch.tensor(owners, dtype=torch.int64, device=device),
        torch.tensor(lengths, dtype=torch.int64, device=device),
        output_size=total,
    )
    counts = torch.zeros(num_rows * (vocab + 1), dtype=torch.float32, device=device)
    counts.scatter_add_(0, row_t * (vocab + 1) + ids_t, torch.ones(total, device=device))
    return counts.view(num_rows, vocab + 1)[:, :vocab]


def _build_penalties(rows: Sequence[SamplingRow], vocab: int, device: torch.device) -> Penalties:
    bias = [(i, t, b) for i, r in enumerate(rows) for t, b in (r.params.logit_bias or {}).items() if t < vocab]
    blocked = [
        (i, t)
        for i, r in enumerate(rows)
        if len(r.output_ids) < r.params.min_new_tokens
        for t in r.min_tokens_blocked_ids
        if 0 <= t < vocab
    ]
    seen = repetition = counts = frequency = presence = None
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep:
        ids = [rows[i].prompt_ids for i in rep] + [rows[i].output_ids for i in rep]
        seen = _token_counts(ids, rep + rep, len(rows), vocab, device) > 0
        repetition = _column([r.params.repetition_penalty for r in rows], device)
    freq = [i for i, r in enumerate(rows) if r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0]
    if freq:
        counts = _token_counts([rows[i].output_ids for i in freq], freq, len(rows), vocab, device)
        frequency = _column([r.params.frequency_penalty for r in rows], device)
        presence = _column([r.params.presence_penalty for r in rows], device)
    return Penalties(
        bias_index=_index([(i, t) for i, t, _ in bias], device),
        bias_values=torch.tensor([b for _, _, b in bias], dtype=torch.float32, device=device) if bias else None,
        seen=seen,
        repetition=repetition,
        counts=counts,
        frequency=frequency,
        presence=presence,
        blocked_index=_index(blocked, device),
    )


def _build_draw(rows: Sequence[SamplingRow], vocab: int, device: torch.device) -> DrawParams:
    """Per-row tensors are packed into one int64 and one float32 block: two host-to-device copies."""
    picked = [i for i, r in enumerate(rows) if not r.params.is_greedy]
    if not picked:  # all greedy: no host-to-device copies
        none_i, none_f = torch.empty(0, 1, dtype=torch.int64, device=device), torch.empty(0, 1, device=device)
        return DrawParams(
            rows=none_i[:, 0],
            temperatures=none_f,
            top_ks=none_i,
            top_ps=none_f,
            min_ps=none_f,
            keys=(none_i[:, 0], none_i[:, 0]),
            needs_filter=False,
        )
    params = [rows[i].params for i in picked]
    top_ks = [vocab if p.top_k < 0 else min(p.top_k, vocab) for p in params]
    seeds = torch.tensor([rows[i].seed % SEED_MODULUS for i in picked], dtype=torch.int64)
    steps = torch.tensor([max(0, rows[i].step) for i in picked], dtype=torch.int64)
    # on the host: dozens of tiny integer ops, no device launches (none for all-greedy batches)
    k1, k2 = noise.row_keys(seeds, steps) if picked else (seeds, steps)
    ints = torch.stack([torch.tensor(picked, dtype=torch.int64), torch.tensor(top_ks, dtype=torch.int64), k1, k2], 1)
    floats = torch.tensor([[p.temperature, p.top_p, p.min_p] for p in params], dtype=torch.float32).view(-1, 3)
    ints, floats = ints.to(device), floats.to(device)
    return DrawParams(
        rows=ints[:, 0],
        temperatures=floats[:, 0:1],
        top_ks=ints[:, 1:2],
        top_ps=floats[:, 1:2],
        min_ps=floats[:, 2:3],
        keys=(ints[:, 2], ints[:, 3]),
        needs_filter=any(k < vocab or p.top_p < 1.0 or p.min_p > 0.0 for k, p in zip(top_ks, params)),
    )


# ----------------------------------------------------------------------------------------------
# Sampling.


def apply_penalties(x: torch.Tensor, pen: Penalties) -> torch.Tensor:
    """Steps 1-4 on logits ``x`` [B, V] float32 (modified in place where possible); returns the result.

    Rows a penalty does not apply to are left bit-identical (x / 1, x * 1 and x - 0 are exact), so a
    row's result does not depend on its neighbours' parameters.
    """
    if pen.bias_index is not None and pen.bias_values is not None:
        x.index_put_((pen.bias_index[0], pen.bias_index[1]), pen.bias_values, accumulate=True)
    if pen.seen is not None and pen.repetition is not None:
        scaled = torch.where(x > 0, x / pen.repetition, x * pen.repetition)
        x = torch.where(pen.seen, scaled, x)
    if pen.counts is not None and pen.frequency is not None and pen.presence is not None:
        x = x - pen.frequency * pen.counts - pen.presence * (pen.counts > 0).to(x.dtype)
    if pen.blocked_index is not None:
        x[pen.blocked_index[0], pen.blocked_index[1]] = float("-inf")
    return x


def _filter(probs: torch.Tensor, d: DrawParams) -> tuple[torch.Tensor, torch.Tensor]:
    """top_k, top_p, min_p on probs [S, V]; returns (kept probs, their token ids), both [S, W].

    Sorted descending (stable: ties keep ascending token id), every mask zeroes a suffix, so the
    survivors are a prefix; W is the widest surviving prefix (one host sync; on CUDA W = V instead,
    so sampling never waits for the device: the zeroed tail cannot win the race).
    """
    p, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    rank = torch.arange(p.shape[-1], device=p.device)
    p = p.masked_fill(rank >= d.top_ks, 0.0)
    mass_before = torch.cumsum(p, dim=-1) - p  # exactly 0 at rank 0: the top token always stays
    nucleus_done = mass_before >= d.top_ps * p.sum(dim=-1, keepdim=True)
    p = p.masked_fill(nucleus_done & (d.top_ps < 1.0), 0.0)  # top_p == 1 never drops (rounding)
    p = p.masked_fill(p < d.min_ps * p[:, :1], 0.0)
    if p.is_cuda:
        return p, ids
    width = max(1, int((p > 0).sum(dim=-1).max().item()))
    return p[:, :width], ids[:, :width]


def _draw(x: torch.Tensor, d: DrawParams) -> torch.Tensor:
    """One token id per row of processed logits ``x`` [S, V], drawn from the filtered softmax."""
    probs = torch.softmax(x / d.temperatures, dim=-1)
    if d.needs_filter:
        probs, ids = _filter(probs, d)
    else:
        ids = torch.arange(x.shape[-1], device=x.device).expand_as(probs)
    race = probs / noise.exponential_from_keys(d.keys[0], d.keys[1], ids)
    winner = race.argmax(dim=-1, keepdim=True)
    return ids.gather(1, winner).squeeze(1)


def _logprobs(
    logits: torch.Tensor, next_ids: torch.Tensor, info: SamplingBatchInfo
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Logprobs of the raw distribution (before penalties and temperature, as vLLM's default):
    (chosen [B], top values [B, k], top ids [B, k]); None where not asked."""
    if not info.needs_logprobs:
        return None, None, None
    logp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    chosen = logp.gather(1, next_ids[:, None]).squeeze(1)
    k = min(max(info.top_logprobs_nums, default=0), info.vocab_size)
    if k == 0:
        return chosen, None, None
    vals, idx = logp.topk(k, dim=-1)  # sorted descending
    return chosen, vals, idx
