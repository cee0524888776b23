"""Decoding: the backend's own decode where transformers' wrapper adds nothing, the same text
as the wrapper; the incremental detokenizer's text equal to decoding all tokens at once."""

from __future__ import annotations

import random
from typing import Any

import pytest

from splitserve.roles.engine.detokenizer import IncrementalDetokenizer
from splitserve.roles.models.loader import load_tokenizer
from splitserve.roles.models.tokenizer import Tokenizer
from splitserve.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(None)[2]


def _samples(vocab: int, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, 16))] for _ in range(n)]


def test_backend_decode_is_the_wrappers_text(tok: Tokenizer) -> None:
    assert tok._backend_decode is not None  # the embedded tokenizer takes the direct path
    special = sorted(tok.hf.all_special_ids)
    for ids in _samples(tok.vocab_size, 400, 1) + [special + [1000, 2000], [tok.eos_token_id]]:
        for skip in (True, False):
            assert tok.decode(ids, skip) == tok.hf.decode(ids, skip_special_tokens=skip)


def test_a_tokenizer_that_cleans_up_spaces_keeps_the_wrapper(tok: Tokenizer) -> None:
    class Cleaning:  # the wrapper's interface, with clean-up on: the wrapper must decode
        def __init__(self, hf: Any) -> None:
            self._tokenizer, self.clean_up_tokenization_spaces = hf._tokenizer, True
            self.eos_token_id, self.bos_token_id, self.calls = hf.eos_token_id, hf.bos_token_id, 0
            self._hf = hf

        def __len__(self) -> int:
            return len(self._hf)

        def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
            self.calls += 1
            return "wrapped"

    wrapper = Cleaning(tok.hf)
    cleaning = Tokenizer(wrapper)
    assert cleaning._backend_decode is None
    assert cleaning.decode([1, 2, 3]) == "wrapped" and wrapper.calls == 1


def test_incremental_text_is_the_whole_decode(tok: Tokenizer) -> None:
    # multi-byte characters split across tokens must come out whole, in order
    texts = ["héllo wörld ✓ 日本語のテキスト 🙂🙂 done", "a\nb\tc  d", "Ωmega — “quotes” …"]
    params = SamplingParams(max_tokens=1)
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tok, params)
        deltas = []
        for i in range(len(ids)):
            detok.update([ids[i]])
            deltas.append(detok.take_delta(finished=i == len(ids) - 1))
        assert "".join(deltas) == tok.decode(ids) == text
        assert all("\ufffd" not in d for d in deltas)
