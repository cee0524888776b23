"""vLLM's ``cache_salt``: the prefix cache shares KV only between requests with the same salt
(a tenant cannot learn from its hit rate whether another tenant sent a prompt), the router
hashes a salted prompt as the engine does, and outputs never depend on the salt."""

from __future__ import annotations

import pytest

from splitserve import LLM, SamplingParams
from splitserve.errors import InvalidRequestError
from splitserve.hashing import hash_block_tokens, root_hash
from splitserve.roles.engine.request import Request

PROMPT = list(range(2000, 2048))  # three full blocks of 16


def _run(llm: LLM, salt: str | None) -> tuple[int, list[int]]:
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                                                cache_salt=salt))[0]
    return out.num_cached_tokens, out.outputs[0].token_ids


def test_only_the_same_salt_hits(tiny_model_dir) -> None:
    llm = LLM(str(tiny_model_dir), num_kv_blocks=256)
    first = _run(llm, "tenant-a")
    assert first[0] == 0
    assert _run(llm, "tenant-a")[0] == 32  # the same salt: its blocks are shared
    assert _run(llm, "tenant-b")[0] == 0  # another salt: computed again
    assert _run(llm, None)[0] == 0  # no salt: apart from every salted request
    assert _run(llm, None)[0] == 32
    assert _run(llm, "tenant-b")[0] == 32
    assert {tuple(_run(llm, s)[1]) for s in ("tenant-a", "c", None)} == {tuple(first[1])}
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_blocks


def test_the_router_hashes_a_salted_prompt_as_the_engine() -> None:
    for salt in (None, "s1", "s2"):
        req = Request("r", PROMPT, SamplingParams(cache_salt=salt), seed=0, max_tokens=4,
                      block_size=16)
        assert req.block_hashes == hash_block_tokens(PROMPT, 16, parent_hash=root_hash(salt))
    assert len({root_hash(s) for s in (None, "s1", "s2")}) == 3


@pytest.mark.parametrize("salt", ["", 5, "x" * 1025])
def test_bad_salts_name_the_field(salt: object) -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(cache_salt=salt)  # type: ignore[arg-type]
    assert e.value.field == "cache_salt"
