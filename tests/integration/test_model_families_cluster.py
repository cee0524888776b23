"""Every served family through the disaggregated cluster (1 prefill + 1 decode on real Ray and
UCX): KV of windowed, soft-capped and MoE models is pulled by the decode worker and the
greedy tokens still equal transformers. Gemma 2 (windowed and global layers, soft-capping) runs
in the default suite; the other families are marked slow (one cluster each, ~35 s)."""

from __future__ import annotations

import pytest
import torch

from splitserve import Cluster, SamplingParams
from tests.families import FAMILIES, count_near_ties, hf_greedy, make_family_model
from tests.unit.test_model_families import NEW_TOKENS, PROMPTS

pytestmark = [pytest.mark.ray, pytest.mark.ucx]

_DEFAULT = ("gemma2",)


@pytest.mark.parametrize(
    "name",
    [n if n in _DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in sorted(FAMILIES)],
)
def test_family_through_prefill_and_decode_workers(name, tmp_path, tokenizer_dir) -> None:
    from transformers import AutoModelForCausalLM

    folder = make_family_model(name, tmp_path / name, tokenizer_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = [hf_greedy(hf, p, NEW_TOKENS) for p in PROMPTS]
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    with Cluster.local(prefill=1, decode=1, model=str(folder), kv_cache_memory_bytes=16 << 20,
                       router={"local_prefill_max_tokens": 0}) as cluster:
        got = [o.outputs[0].token_ids for o in cluster.generate(PROMPTS, greedy)]
        decode = next(w for w in cluster.status()["workers"] if w["role"] == "decode")
    print(f"{name}: {count_near_ties(got, ref)} near-tie divergences accepted")
    assert decode["kv_transfers"] >= len(PROMPTS) - 1 and decode["kv_transfer_bytes"] > 0
    assert decode["kv_transfer_failures"] == 0
