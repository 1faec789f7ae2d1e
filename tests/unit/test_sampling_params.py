"""SamplingParams: SGLang defaults, parsing, and a ValueError naming the parameter for every bad value."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from sglang_pd.sampling.params import SamplingParams


def test_defaults_follow_sglang() -> None:
    p = SamplingParams()
    assert (p.max_new_tokens, p.min_new_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (128, 0, 1.0, 1.0, -1, 0.0)
    assert (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (1.0, 0.0, 0.0)
    assert p.stop == () and p.stop_token_ids == () and p.seed is None and p.n == 1
    assert not p.ignore_eos and p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.no_stop_trim and p.logit_bias is None and not p.is_greedy


def test_from_dict_none_and_empty_are_defaults() -> None:
    assert SamplingParams.from_dict(None) == SamplingParams()
    assert SamplingParams.from_dict({}) == SamplingParams()


def test_none_values_take_defaults() -> None:
    p = SamplingParams.from_dict({"temperature": None, "max_new_tokens": None, "stop": None})
    assert p == SamplingParams()


def test_stop_normalised_to_tuple() -> None:
    assert SamplingParams.from_dict({"stop": "\n"}).stop == ("\n",)
    assert SamplingParams.from_dict({"stop": ["a", "b", "a", ""]}).stop == ("a", "b")
    assert SamplingParams.from_dict({"stop_token_ids": [5, 3, 5]}).stop_token_ids == (5, 3)


def test_integral_float_accepted_for_int() -> None:
    p = SamplingParams.from_dict({"max_new_tokens": 16.0, "top_k": 5.0})
    assert p.max_new_tokens == 16 and isinstance(p.max_new_tokens, int) and p.top_k == 5


def test_int_accepted_for_float() -> None:
    p = SamplingParams.from_dict({"temperature": 0, "top_p": 1})
    assert p.temperature == 0.0 and isinstance(p.temperature, float) and p.is_greedy


def test_zero_max_new_tokens_allowed() -> None:
    assert SamplingParams.from_dict({"max_new_tokens": 0}).max_new_tokens == 0


def test_top_k_zero_means_disabled() -> None:
    assert SamplingParams.from_dict({"top_k": 0}).top_k == -1


@pytest.mark.parametrize("seed,expected", [(7, 7), (-1, 2**63 - 1), (2**64 + 5, 5), (2**63, 0)])
def test_seed_normalised(seed: int, expected: int) -> None:
    assert SamplingParams.from_dict({"seed": seed}).seed == expected


def test_sampling_seed_alias() -> None:
    assert SamplingParams.from_dict({"sampling_seed": 3}).seed == 3
    with pytest.raises(ValueError, match="seed"):
        SamplingParams.from_dict({"seed": 1, "sampling_seed": 2})


def test_is_greedy() -> None:
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=1e-8).is_greedy
    assert SamplingParams(top_k=1).is_greedy
    assert not SamplingParams(temperature=0.7, top_k=2).is_greedy


def test_unknown_key_named() -> None:
    with pytest.raises(ValueError, match="unknown sampling parameter 'foo'"):
        SamplingParams.from_dict({"foo": 1})


@pytest.mark.parametrize("key", ["json_schema", "regex", "ebnf"])
def test_constrained_decoding_rejected(key: str) -> None:
    with pytest.raises(ValueError, match=f"'{key}' is not supported"):
        SamplingParams.from_dict({key: "x"})
    assert SamplingParams.from_dict({key: None}) == SamplingParams()


def test_not_a_mapping() -> None:
    with pytest.raises(ValueError, match="sampling_params"):
        SamplingParams.from_dict([1, 2])  # type: ignore[arg-type]


BAD: list[tuple[dict[str, Any], str]] = [
    ({"temperature": "abc"}, r"temperature must be a number"),
    ({"temperature": True}, r"temperature must be a number"),
    ({"temperature": float("nan")}, r"temperature must be a finite"),
    ({"temperature": -0.1}, r"temperature must be >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.01}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -2}, r"top_k must be -1 .* or >= 1"),
    ({"top_k": 2.5}, r"top_k must be an integer"),
    ({"min_p": -0.1}, r"min_p must be in \[0, 1\]"),
    ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
    ({"repetition_penalty": 0.0}, r"repetition_penalty must be in \(0, 2\]"),
    ({"repetition_penalty": 2.5}, r"repetition_penalty must be in \(0, 2\]"),
    ({"frequency_penalty": 2.1}, r"frequency_penalty must be in \[-2, 2\]"),
    ({"frequency_penalty": -2.1}, r"frequency_penalty must be in \[-2, 2\]"),
    ({"presence_penalty": 3}, r"presence_penalty must be in \[-2, 2\]"),
    ({"presence_penalty": -3}, r"presence_penalty must be in \[-2, 2\]"),
    ({"max_new_tokens": -1}, r"max_new_tokens must be >= 0"),
    ({"max_new_tokens": 1.5}, r"max_new_tokens must be an integer"),
    ({"max_new_tokens": True}, r"max_new_tokens must be an integer"),
    ({"max_new_tokens": "10"}, r"max_new_tokens must be an integer"),
    ({"min_new_tokens": -1}, r"min_new_tokens must be in \[0, max_new_tokens"),
    ({"min_new_tokens": 5, "max_new_tokens": 4}, r"min_new_tokens must be in \[0, max_new_tokens=4\]"),
    ({"n": 0}, r"n must be >= 1"),
    ({"stop_token_ids": [-1]}, r"stop_token_ids must be token ids >= 0"),
    ({"stop_token_ids": ["a"]}, r"stop_token_ids must be an integer"),
    ({"stop_token_ids": [True]}, r"stop_token_ids must be an integer"),
    ({"stop_token_ids": 5}, r"stop_token_ids must be a list"),
    ({"stop": 5}, r"stop must be a string or a list of strings"),
    ({"stop": ["a", 1]}, r"stop must be a string or a list of strings"),
    ({"seed": "x"}, r"seed must be an integer"),
    ({"seed": 1.5}, r"seed must be an integer"),
    ({"ignore_eos": "yes"}, r"ignore_eos must be a boolean"),
    ({"skip_special_tokens": 1}, r"skip_special_tokens must be a boolean"),
    ({"logit_bias": {"a": 1.0}}, r"logit_bias keys must be token ids"),
    ({"logit_bias": {"1": 200.0}}, r"logit_bias .*\[-100, 100\]"),
    ({"logit_bias": {"-1": 1.0}}, r"logit_bias .*>= 0"),
    ({"logit_bias": [1, 2]}, r"logit_bias must be an object"),
]


@pytest.mark.parametrize("d,message", BAD, ids=[str(d) for d, _ in BAD])
def test_invalid_values_name_the_parameter(d: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams.from_dict(d)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    assert SamplingParams(stop="x").stop == ("x",)  # type: ignore[arg-type]


def test_frozen_and_hashable() -> None:
    p = SamplingParams.from_dict({"logit_bias": {"3": 1.5}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
    assert hash(p) == hash(SamplingParams.from_dict({"logit_bias": {"3": 1.5}}))


def test_logit_bias_keys_become_ints() -> None:
    assert SamplingParams.from_dict({"logit_bias": {"3": 1, 4: -2.5}}).logit_bias == {3: 1.0, 4: -2.5}
    assert SamplingParams.from_dict({"logit_bias": {}}).logit_bias is None


def test_to_dict_round_trip() -> None:
    d = {
        "max_new_tokens": 9,
        "temperature": 0.3,
        "top_k": 4,
        "stop": ["x", "yz"],
        "stop_token_ids": [2],
        "seed": 11,
        "logit_bias": {"5": -1.0},
        "ignore_eos": True,
    }
    p = SamplingParams.from_dict(d)
    out = p.to_dict()
    assert out["stop"] == ["x", "yz"] and out["logit_bias"] == {"5": -1.0}
    assert SamplingParams.from_dict(out) == p


def test_check_vocab() -> None:
    p = SamplingParams.from_dict({"logit_bias": {"10": 1.0}})
    p.check_vocab(11)
    with pytest.raises(ValueError, match="logit_bias"):
        p.check_vocab(10)
