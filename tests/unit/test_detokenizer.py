"""IncrementalDetokenizer with the tiny model's real byte-level BPE tokenizer.

The oracle is ``tokenizer.decode`` of all the ids at once: the deltas, however the ids arrive, must
concatenate to it. The tiny tokenizer splits most non-ASCII characters over several tokens, so
these texts exercise the held-back incomplete UTF-8 tail. Stop handling follows the scheduler's
contract: it finishes a request on the token that completes a stop string (finish_reason
{"type": "stop", "matched": <str or token id>}), and the detokenizer trims the text.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from transformers import AutoTokenizer

from sglang_pd.server.detokenizer import IncrementalDetokenizer
from sglang_pd.server.messages import TokenOut

TEXTS = {
    "ascii": "The quick brown fox jumps over the lazy dog.",
    "accents": "naïve café — déjà vu, Ça coûte 5 €, très cher",
    "cjk": "日本語のテキストと中文",
    "emoji": "ok 🙂👍🏽 ok 🇫🇷!",
    "mixed": "Hello wörld, 日本語 stop here 🙂 and more text",
}
UNEVEN = (3, 1, 4, 1, 5, 9, 2, 6)
LENGTH = {"type": "length", "length": 0}


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Any) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir("llama"))


def encode(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def groups(ids: Sequence[int], sizes: Iterable[int]) -> list[list[int]]:
    out, pos = [], 0
    for n in itertools.cycle(sizes):
        if pos >= len(ids):
            return out
        out.append(list(ids[pos : pos + n]))
        pos += n
    return out


def run(
    detok: IncrementalDetokenizer, chunks: list[list[int]], finish: dict[str, Any] | None, rid: str = "r", **opts: Any
) -> list[str]:
    """Feed ``chunks`` as one request; the last message carries ``finish``. Returns the deltas."""
    deltas, done = [], 0
    for i, chunk in enumerate(chunks):
        done += len(chunk)
        last = i == len(chunks) - 1
        out = TokenOut(
            rid,
            chunk,
            prompt_tokens=3,
            completion_tokens=done,
            cached_tokens=0,
            finish_reason=finish if last else None,
            **opts,
        )
        deltas.append(detok.feed(out))
    return deltas


def test_tiny_tokenizer_splits_characters(tok: Any) -> None:
    """Guards the premise of the tests below: single tokens decode to partial characters."""
    for name in ("accents", "cjk", "emoji"):
        pieces = [tok.decode([i]) for i in encode(tok, TEXTS[name])]
        assert any("\ufffd" in p for p in pieces), name


@pytest.mark.parametrize("name", list(TEXTS))
@pytest.mark.parametrize("sizes", [(1,), UNEVEN, (1000,)], ids=["one-by-one", "uneven", "all-at-once"])
def test_deltas_concatenate_to_full_decode(tok: Any, name: str, sizes: tuple[int, ...]) -> None:
    ids = encode(tok, TEXTS[name])
    detok = IncrementalDetokenizer(tok)
    deltas = run(detok, groups(ids, sizes), LENGTH)
    assert "".join(deltas) == tok.decode(ids) == TEXTS[name]
    assert not any("\ufffd" in d for d in deltas), deltas  # a partial character is never emitted
    assert detok.states == {}  # a finished request leaves no state behind


def test_text_streams_while_generating(tok: Any) -> None:
    """Deltas arrive as tokens do, not all at the end: at most one character's bytes are held back."""
    ids = encode(tok, TEXTS["mixed"])
    deltas = run(IncrementalDetokenizer(tok), [[i] for i in ids], LENGTH)
    shown = ""
    for k, delta in enumerate(deltas[:-1], start=1):
        shown += delta
        full = tok.decode(ids[:k])
        assert full.startswith(shown) and len(full.rstrip("\ufffd")) == len(shown)


def test_random_ids_split_at_every_boundary_match_full_decode(tok: Any) -> None:
    """Arbitrary byte-fragment tokens (invalid UTF-8 included), fed in random group sizes."""
    rng = random.Random(0)
    vocab = range(4, len(tok))  # ordinary tokens; specials are covered below
    for trial in range(30):
        ids = [rng.choice(vocab) for _ in range(rng.randint(1, 40))]
        sizes = [rng.randint(1, 4) for _ in range(5)]
        deltas = run(IncrementalDetokenizer(tok), groups(ids, sizes), LENGTH)
        assert "".join(deltas) == tok.decode(ids), (trial, ids, sizes)


def test_interleaved_requests_do_not_mix(tok: Any) -> None:
    a, b = encode(tok, TEXTS["cjk"]), encode(tok, TEXTS["emoji"])
    detok = IncrementalDetokenizer(tok)
    got = {"a": "", "b": ""}
    for k in range(max(len(a), len(b))):
        for rid, ids in (("a", a), ("b", b)):
            if k < len(ids):
                fin = LENGTH if k == len(ids) - 1 else None
                got[rid] += detok.feed(TokenOut(rid, [ids[k]], 3, k + 1, 0, finish_reason=fin))
    assert got == {"a": TEXTS["cjk"], "b": TEXTS["emoji"]} and detok.states == {}


def stop_at(tok: Any, ids: list[int], stop: str) -> list[int]:
    """The ids the scheduler generates before stopping: up to the token that completes ``stop``."""
    for k in range(1, len(ids) + 1):
        if stop in tok.decode(ids[:k], skip_special_tokens=False):
            return ids[:k]
    raise AssertionError(f"{stop!r} never appears")


STOPS = [("mixed", "stop here"), ("mixed", "日本"), ("mixed", "🙂"), ("accents", "é"), ("ascii", "fox"), ("ascii", "e")]


@pytest.mark.parametrize("name, stop", STOPS)
@pytest.mark.parametrize("sizes", [(1,), UNEVEN], ids=["one-by-one", "uneven"])
def test_stop_string_never_shown_partially_and_cut(tok: Any, name: str, stop: str, sizes: tuple[int, ...]) -> None:
    text = TEXTS[name]
    ids = stop_at(tok, encode(tok, text), stop)
    expected = text[: text.index(stop)]
    stops = [stop, "never-matches-this-long-stop"]  # the longest stop sets how much text is held back
    deltas = run(IncrementalDetokenizer(tok), groups(ids, sizes), {"type": "stop", "matched": stop}, stop=stops)
    shown = ""
    for delta in deltas[:-1]:
        shown += delta
        assert expected.startswith(shown), (shown, expected)  # nothing later retracted, no stop prefix
    assert "".join(deltas) == expected


@pytest.mark.parametrize("name, stop", STOPS[:3])
def test_no_stop_trim_keeps_the_stop_string(tok: Any, name: str, stop: str) -> None:
    ids = stop_at(tok, encode(tok, TEXTS[name]), stop)
    deltas = run(
        IncrementalDetokenizer(tok),
        [[i] for i in ids],
        {"type": "stop", "matched": stop},
        stop=[stop],
        no_stop_trim=True,
    )
    assert "".join(deltas) == tok.decode(ids) and stop in "".join(deltas)
    assert "".join(deltas[:-1]).startswith(TEXTS[name][:3])  # not held back: nothing is trimmed


def test_stop_strings_held_text_released_when_not_matched(tok: Any) -> None:
    """A finish by length releases the tail held back for a stop string that never completed."""
    text = TEXTS["mixed"]
    ids = encode(tok, text)
    deltas = run(IncrementalDetokenizer(tok), [[i] for i in ids], LENGTH, stop=["text!", "xyz"])
    before = "".join(deltas[:-1])
    assert "".join(deltas) == text and text.startswith(before)
    assert len(before) <= len(text) - (len("text!") - 1)  # the longest stop's length - 1 was held back


@pytest.mark.parametrize("sizes", [(1,), UNEVEN], ids=["one-by-one", "uneven"])
def test_matched_stop_token_id_dropped_from_text(tok: Any, sizes: tuple[int, ...]) -> None:
    ids = encode(tok, TEXTS["accents"])
    stop_id = encode(tok, " ok")[0]  # an ordinary word token used as a stop_token_id
    deltas = run(IncrementalDetokenizer(tok), groups(ids + [stop_id], sizes), {"type": "stop", "matched": stop_id})
    assert "".join(deltas) == TEXTS["accents"]
    kept = run(
        IncrementalDetokenizer(tok),
        groups(ids + [stop_id], sizes),
        {"type": "stop", "matched": stop_id},
        no_stop_trim=True,
    )
    assert "".join(kept) == tok.decode(ids + [stop_id])


def test_eos_special_token_dropped_even_when_specials_shown(tok: Any) -> None:
    ids = encode(tok, TEXTS["emoji"])
    eos = tok.eos_token_id
    deltas = run(
        IncrementalDetokenizer(tok),
        [[i] for i in ids + [eos]],
        {"type": "stop", "matched": eos},
        skip_special_tokens=False,
    )
    assert "".join(deltas) == TEXTS["emoji"] and tok.eos_token not in "".join(deltas)


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tok: Any, skip: bool) -> None:
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    ids = [im_start] + encode(tok, "assistant\nnaïve 日本") + [im_start] + encode(tok, "🙂")
    for sizes in ((1,), UNEVEN):
        deltas = run(IncrementalDetokenizer(tok), groups(ids, sizes), LENGTH, skip_special_tokens=skip)
        text = "".join(deltas)
        assert text == tok.decode(ids, skip_special_tokens=skip)
        assert ("<|im_start|>" in text) is not skip and "naïve 日本" in text and text.endswith("🙂")


def test_no_tokenizer_gives_no_text() -> None:
    detok = IncrementalDetokenizer(None)
    assert detok.feed(TokenOut("r", [5, 6], 1, 2, 0, finish_reason=LENGTH)) == ""
