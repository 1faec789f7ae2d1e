"""Sampler: distributions, filters, penalties, seeded reproducibility, logprobs, and the noise."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from sglang_pd.sampling import noise
from sglang_pd.sampling.params import SamplingParams
from sglang_pd.sampling.sampler import SampleOutput, Sampler, SamplingBatchInfo, SamplingRow, apply_penalties

N_DRAWS = 4000


def _row(seed: int = 0, step: int = 0, **kw: Any) -> SamplingRow:
    row_fields = {"prompt_ids", "output_ids", "min_tokens_blocked_ids", "top_logprobs_num", "return_logprob"}
    extra = {k: kw.pop(k) for k in list(kw) if k in row_fields}
    return SamplingRow(params=SamplingParams(**kw), seed=seed, step=step, **extra)


def _sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleOutput:
    return Sampler()(logits, SamplingBatchInfo.build(rows, logits.shape[-1], logits.device))


def _draws(probs: Sequence[float], seed: int = 1234, **params: Any) -> torch.Tensor:
    """N_DRAWS samples from one distribution: one batch, one row per step, so one call."""
    logits = torch.tensor(probs, dtype=torch.float32).log().expand(N_DRAWS, -1)
    rows = [_row(seed=seed, step=i, **params) for i in range(N_DRAWS)]
    return _sample(logits, rows).next_token_ids


def _chi2_critical(df: int, z: float = 3.29) -> float:
    """Wilson-Hilferty upper quantile of chi2(df); z = 3.29 is p ~ 0.0005."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _assert_matches(tokens: torch.Tensor, expected: Sequence[float]) -> None:
    """Tokens outside the support never appear; in-support counts pass a chi-square test."""
    exp = torch.tensor(expected, dtype=torch.float64)
    exp = exp / exp.sum()
    counts = torch.bincount(tokens, minlength=len(expected)).to(torch.float64)
    assert counts[exp == 0].sum() == 0, f"drew outside the support: {counts.tolist()}"
    support = exp > 0
    if int(support.sum()) == 1:
        return
    e = exp[support] * len(tokens)
    chi2 = float(((counts[support] - e) ** 2 / e).sum())
    assert chi2 < _chi2_critical(int(support.sum()) - 1), (chi2, counts.tolist(), e.tolist())


P5 = [0.4, 0.3, 0.15, 0.1, 0.05]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_unrestricted_matches_tempered_softmax(temperature: float) -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    tokens = _draws(logits.exp().tolist(), temperature=temperature)
    _assert_matches(tokens, torch.softmax(logits / temperature, -1).tolist())


def test_temperature_changes_sharpness() -> None:
    top_freq = {t: float((_draws(P5, temperature=t) == 0).float().mean()) for t in (0.5, 1.0, 2.0)}
    # expected top-token probabilities: 0.56, 0.40, 0.30
    assert top_freq[0.5] > top_freq[1.0] + 0.1 and top_freq[1.0] > top_freq[2.0] + 0.05


def test_top_k_restricts_support() -> None:
    _assert_matches(_draws(P5, top_k=3), [0.4, 0.3, 0.15, 0.0, 0.0])


def test_top_p_keeps_smallest_nucleus() -> None:
    # cumulative mass before token 2 is 0.7 < 0.75, before token 3 is 0.85 >= 0.75
    _assert_matches(_draws(P5, top_p=0.75), [0.4, 0.3, 0.15, 0.0, 0.0])


def test_top_p_always_keeps_top_token() -> None:
    _assert_matches(_draws(P5, top_p=0.01), [1.0, 0, 0, 0, 0])


def test_min_p_drops_unlikely_tokens() -> None:
    # threshold 0.3 * 0.4 = 0.12 keeps tokens with p in {0.4, 0.3, 0.15}
    _assert_matches(_draws(P5, min_p=0.3), [0.4, 0.3, 0.15, 0.0, 0.0])


def test_top_p_applies_to_top_k_survivors() -> None:
    # after top_k=2 the renormalised probs are [4/7, 3/7]; top_p=0.5 keeps only the first (HF order)
    _assert_matches(_draws(P5, top_k=2, top_p=0.5), [1.0, 0, 0, 0, 0])


def test_combined_filters_with_temperature() -> None:
    logits = torch.tensor(P5).log()
    tempered = torch.softmax(logits / 0.7, -1)
    expected = [float(tempered[i]) if i < 4 else 0.0 for i in range(5)]
    _assert_matches(_draws(P5, temperature=0.7, top_k=4), expected)


def _random_rows(n: int, gen: torch.Generator) -> list[SamplingRow]:
    rows = []
    for i in range(n):
        kind = i % 5
        kw: dict[str, Any] = {"temperature": 0.5 + float(torch.rand(1, generator=gen))}
        if kind == 1:
            kw["top_k"] = 5
        elif kind == 2:
            kw.update(top_p=0.8, min_p=0.05, repetition_penalty=1.3, prompt_ids=[1, 2, 3])
        elif kind == 3:
            kw.update(temperature=0.0, frequency_penalty=0.5, output_ids=[4, 4])
        elif kind == 4:
            kw.update(
                presence_penalty=-0.5,
                logit_bias={7: 3.0},
                output_ids=[9],
                min_new_tokens=3,
                min_tokens_blocked_ids=(0,),
            )
        rows.append(_row(seed=1000 + i, step=int(torch.randint(0, 50, (1,), generator=gen)), **kw))
    return rows


def test_seeded_row_independent_of_batch_and_position() -> None:
    gen = torch.Generator().manual_seed(0)
    vocab = 1000
    target = _row(seed=42, temperature=0.9)
    for step in range(20):
        logits = torch.randn(vocab, generator=gen) * 3
        me = SamplingRow(target.params, target.seed, step)
        alone = int(_sample(logits[None], [me]).next_token_ids[0])
        others = _random_rows(31, gen)
        batch_logits = torch.randn(32, vocab, generator=gen) * 3
        for pos in (0, 13, 31):
            rows = others[:pos] + [me] + others[pos:]
            batch_logits[pos] = logits
            got = _sample(batch_logits, rows).next_token_ids[pos]
            assert int(got) == alone, (step, pos)
            batch_logits[pos] = torch.randn(vocab, generator=gen)


def test_fixed_seed_reproduces_and_seeds_differ() -> None:
    logits = torch.zeros(1, 50)  # uniform: only the seed decides

    def run(seed: int) -> list[int]:
        return [int(_sample(logits, [_row(seed=seed, step=s)]).next_token_ids[0]) for s in range(30)]

    a = run(7)
    assert run(7) == a  # also what a preempted request recomputes
    assert run(8) != a
    assert len(set(a)) > 10


def test_global_rng_neither_used_nor_disturbed() -> None:
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(1))
    rows = [_row(seed=3, step=s) for s in range(4)]
    torch.manual_seed(0)
    first = _sample(logits, rows).next_token_ids
    state = torch.get_rng_state()
    torch.manual_seed(123)
    assert torch.equal(_sample(logits, rows).next_token_ids, first)
    torch.manual_seed(0)
    _sample(logits, rows)
    assert torch.equal(torch.get_rng_state(), state)


def test_greedy_is_argmax_first_on_ties() -> None:
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    logits[5, 3] = logits[5, 8] = 100.0
    rows = [_row(temperature=0.0), _row(top_k=1)] * 3
    assert torch.equal(_sample(logits, rows).next_token_ids, torch.cat([logits[:5].argmax(-1), torch.tensor([3])]))


def test_repetition_penalty_hf_semantics() -> None:
    logits = torch.tensor([[4.0, 3.0, -1.0, 0.5]])
    rows = [_row(temperature=0.0, repetition_penalty=2.0, prompt_ids=[0], output_ids=[2])]
    info = SamplingBatchInfo.build(rows, 4, "cpu")
    out = apply_penalties(logits.clone(), info.penalties)
    assert out.tolist() == [[2.0, 3.0, -2.0, 0.5]]  # positive divided, negative multiplied
    assert int(Sampler()(logits, info).next_token_ids[0]) == 1  # the repeated top token is demoted


def test_frequency_and_presence_penalties() -> None:
    logits = torch.zeros(3, 5)
    rows = [
        _row(frequency_penalty=0.5, output_ids=[1, 1, 2]),
        _row(presence_penalty=0.5, output_ids=[1, 1, 2]),
        _row(frequency_penalty=-1.0, presence_penalty=-0.5, output_ids=[3, 3]),
    ]
    out = apply_penalties(logits.clone(), SamplingBatchInfo.build(rows, 5, "cpu").penalties)
    assert out.tolist() == [[0, -1.0, -0.5, 0, 0], [0, -0.5, -0.5, 0, 0], [0, 0, 0, 2.5, 0]]


def test_penalty_lowers_sampled_frequency() -> None:
    base = (_draws([0.5, 0.5], seed=5) == 1).float().mean()
    penalised = (_draws([0.5, 0.5], seed=5, frequency_penalty=1.0, output_ids=[1]) == 1).float().mean()
    raised = (_draws([0.5, 0.5], seed=5, presence_penalty=-1.0, output_ids=[1]) == 1).float().mean()
    assert penalised < base - 0.15 and raised > base + 0.15


def test_min_new_tokens_blocks_eos() -> None:
    logits = torch.tensor([[0.0, 1.0, 9.0]]).expand(2, -1)  # EOS = 2 dominates
    rows = [
        _row(temperature=0.0, min_new_tokens=2, output_ids=[1], step=1, min_tokens_blocked_ids=(2,)),
        _row(temperature=0.0, min_new_tokens=2, output_ids=[1, 1], step=2, min_tokens_blocked_ids=(2,)),
    ]
    assert _sample(logits, rows).next_token_ids.tolist() == [1, 2]
    tokens = _draws([0.1, 0.1, 0.8], min_new_tokens=1, min_tokens_blocked_ids=(2,))
    _assert_matches(tokens, [0.5, 0.5, 0.0])


def test_logit_bias() -> None:
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0]]).expand(2, -1)
    rows = [_row(temperature=0.0, logit_bias={3: 10.0}), _row(temperature=0.0, logit_bias={0: -100.0})]
    assert _sample(logits, rows).next_token_ids.tolist() == [3, 1]
    _assert_matches(_draws([0.7, 0.1, 0.2], logit_bias={0: -100.0}), [0.0, 1 / 3, 2 / 3])


def test_logprobs_are_of_the_raw_distribution() -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(3))
    rows = [
        _row(seed=1, temperature=0.3, repetition_penalty=1.5, prompt_ids=[1], return_logprob=True),
        _row(temperature=0.0, top_logprobs_num=5),
        _row(seed=2, top_k=3),
        _row(seed=3, top_logprobs_num=40, frequency_penalty=1.0, output_ids=[0]),
    ]
    out = _sample(logits, rows)
    raw = torch.log_softmax(logits, -1)
    top = out.top_logprobs()
    assert out.logprobs is not None and top is not None
    assert torch.allclose(out.logprobs, raw.gather(1, out.next_token_ids[:, None])[:, 0])
    assert top[0] is None and top[2] is None
    for i, n in ((1, 5), (3, 30)):
        vals, ids = top[i]  # type: ignore[misc]
        ref_v, ref_i = raw[i].topk(n)
        assert len(vals) == n and vals == sorted(vals, reverse=True) and ids == ref_i.tolist()
        assert torch.allclose(torch.tensor(vals), ref_v)


def test_no_logprobs_unless_asked() -> None:
    out = _sample(torch.randn(2, 8), [_row(), _row(temperature=0.0)])
    assert out.logprobs is None and out.top_logprobs() is None
    assert out.next_token_ids.dtype == torch.int64


def test_shape_mismatch_and_empty_batch() -> None:
    with pytest.raises(ValueError, match="logits shape"):
        _sample(torch.randn(2, 8), [_row()])
    assert _sample(torch.zeros(0, 8), []).next_token_ids.shape == (0,)


def test_noise_is_positional_only_in_token_id() -> None:
    seeds = torch.tensor([2**63 - 1, 0, 12345])
    steps = torch.tensor([0, 2**33 + 1, 7])
    ids = torch.arange(100).expand(3, -1)
    u = noise.uniform(seeds, steps, ids)
    assert bool((u > 0).all() and (u < 1).all())
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noise.uniform(seeds, steps, ids[:, perm]), u[:, perm])
    assert torch.equal(noise.uniform(seeds[1:2], steps[1:2], ids[:1]), u[1:2])
    assert bool((noise.exponential(seeds, steps, ids) > 0).all())


def test_noise_is_uniform_and_decorrelated() -> None:
    ids = torch.arange(4096).expand(64, -1)
    u = noise.uniform(torch.full((64,), 99), torch.arange(64), ids)  # 64 consecutive steps
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    corr = torch.corrcoef(u)
    corr.fill_diagonal_(0)
    assert float(corr.abs().max()) < 0.08  # ~5 sigma for 4096 samples
    hist = torch.histc(u, bins=16, min=0, max=1) / u.numel() * 16
    assert float((hist - 1).abs().max()) < 0.03


def test_out_of_range_ids_are_ignored_and_top_k_clamped() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    rows = [
        _row(
            temperature=0.0,
            logit_bias={7: 50.0},
            repetition_penalty=2.0,
            prompt_ids=[9, -1],
            output_ids=[5],
            min_new_tokens=2,
            min_tokens_blocked_ids=(4,),
        )
    ]
    assert _sample(logits, rows).next_token_ids.tolist() == [1]
    _assert_matches(_draws([0.2, 0.3, 0.5], top_k=100), [0.2, 0.3, 0.5])
