"""Every served family equals transformers token for token (tiny random models, fp32 greedy).

For each of Qwen3, Phi-3 (LongRoPE, partial rotary, window), Gemma 2 (soft-caps,
query_pre_attn_scalar, alternating windows), Gemma 3 text (q/k norms, two rotary tables),
Qwen3-MoE (un-normalized top-k, a dense layer), Mixtral, Granite, Granite MoE (stacked
experts), SmolLM3 and OLMo 2 (no pre-norms, q/k norms over the whole projection): transformers builds and saves a
random model, splitserve loads the folder, and 8 prompts (most longer than the window) run
32 greedy tokens in one batch, with chunked prefill after a prefix-cache hit, and alone.
A divergence passes only at a true near-tie of the reference (top-2 gap < 1e-3), counted.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.errors import ModelLoadError
from tests.families import FAMILIES, VOCAB, WINDOW, count_near_ties, hf_greedy, make_family_model

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
_rng = random.Random(0)
PROMPTS = [[_rng.randrange(3, VOCAB) for _ in range(n)] for n in (5, 17, 30, 45, 64, 80, 23, 99)]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory, tokenizer_dir):
    """(name, folder, transformers' greedy tokens and gaps for PROMPTS)."""
    from transformers import AutoModelForCausalLM

    name = request.param
    folder = make_family_model(name, tmp_path_factory.mktemp(name) / name, tokenizer_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = [hf_greedy(hf, p, NEW_TOKENS) for p in PROMPTS]
    return name, folder, ref


def _tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


def test_family_equals_transformers(family) -> None:
    name, folder, ref = family
    llm = LLM(str(folder), num_kv_blocks=256)
    cfg = llm.engine.model_config
    assert cfg.architecture.lower().startswith(name.replace("_", "")[:5])
    if name in ("gemma2", "gemma3", "qwen3", "phi3", "mixtral", "smollm3"):  # windows in use
        assert WINDOW in [cfg.window(i) for i in range(cfg.num_layers)]
        assert max(len(p) for p in PROMPTS) > WINDOW
    batch = _tokens(llm, PROMPTS)
    # windowed-only families return blocks that left the window; mixed ones keep them all
    freed = llm.engine.stats()["num_window_freed_blocks"]
    assert (freed > 0) == (cfg.uniform_window is not None), freed
    assert name not in ("phi3", "mixtral") or cfg.uniform_window == WINDOW
    ties = count_near_ties(batch, ref)
    print(f"{name}: {ties} near-tie divergences accepted of {len(PROMPTS)} prompts")
    alone = [_tokens(llm, [p])[0] for p in (PROMPTS[0], PROMPTS[-1])]
    assert alone == [batch[0], batch[-1]]  # batch invariance


def test_smollm3_layers_without_rotary_are_kept(tmp_path, tokenizer_dir) -> None:
    """SmolLM3's NoPE layers matter: the same weights read as rotary on every layer give other
    tokens than transformers' (so the family's equality rests on the NoPE layers)."""
    from transformers import AutoModelForCausalLM

    folder = make_family_model("smollm3", tmp_path / "smollm3", tokenizer_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = [hf_greedy(hf, p, NEW_TOKENS)[0] for p in PROMPTS[:4]]
    llm = LLM(str(folder), num_kv_blocks=256)
    assert llm.engine.model_config.rope_layers == (True, False, True, False)
    count_near_ties(_tokens(llm, PROMPTS[:4]), [(r, [1.0] * len(r)) for r in ref])
    _write_config(folder, no_rope_layers=[1, 1, 1, 1])
    got = _tokens(LLM(str(folder), num_kv_blocks=256), PROMPTS[:4])
    assert sum(g != want for g, want in zip(got, ref, strict=True)) >= 3


def test_granite_logprobs_are_transformers(tmp_path, tokenizer_dir) -> None:
    """Granite's logits divided by ``logits_scaling`` (greedy tokens cannot tell: dividing
    by 4 keeps the order): the logprobs of the first token are transformers' own."""
    from transformers import AutoModelForCausalLM

    folder = make_family_model("granite", tmp_path / "granite", tokenizer_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    llm = LLM(str(folder), num_kv_blocks=64)
    for prompt in PROMPTS[:3]:
        with torch.inference_mode():
            want = torch.log_softmax(hf(input_ids=torch.tensor([prompt])).logits[0, -1], -1)
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1,
                                                    logprobs=5))[0].outputs[0]
        top = out.logprobs[0]
        assert len(top) >= 5
        for token, lp in top.items():
            assert abs(lp.logprob - float(want[token])) < 1e-4, (token, lp.logprob, want[token])
    assert max(abs(float(v)) for v in want.topk(5).values) > 0.05  # not a flat distribution


def test_family_chunked_prefill_after_prefix_hit(family) -> None:
    """Chunks of 16 tokens (windows span chunk and block borders); the second prompt reuses
    the first one's cached blocks and still equals transformers."""
    name, folder, ref = family
    llm = LLM(str(folder), num_kv_blocks=256, max_num_batched_tokens=16)
    base, longer = PROMPTS[4], PROMPTS[4] + PROMPTS[1]
    first = llm.generate([base], GREEDY)[0]
    assert first.num_cached_tokens == 0
    second = llm.generate([longer], GREEDY)[0]
    assert second.num_cached_tokens >= 48  # three full blocks of ``base`` were reused
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.inference_mode():
        want = hf_greedy(hf, longer, NEW_TOKENS)
    count_near_ties([first.outputs[0].token_ids, second.outputs[0].token_ids], [ref[4], want])


def test_sharded_checkpoint_loads_the_same(tmp_path, tokenizer_dir) -> None:
    """A checkpoint split over several safetensors files gives the single file's tokens."""
    whole = make_family_model("qwen3_moe", tmp_path / "whole", tokenizer_dir)
    sharded = make_family_model("qwen3_moe", tmp_path / "sharded", tokenizer_dir,
                                max_shard_size="300KB")
    assert len(list(sharded.glob("*.safetensors"))) > 3
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    got, want = (
        [o.outputs[0].token_ids for o in LLM(str(f), num_kv_blocks=64).generate(PROMPTS[:2], params)]
        for f in (sharded, whole)
    )
    assert got == want


# --------------------------------------------------------------------------- bad configs


def _write_config(folder, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("family_name", "changes", "names"),
    [
        ("qwen3", {"rope_parameters": {"rope_type": "yarn-ish"}}, ["rope_type", "yarn-ish"]),
        ("qwen3_moe", {"scoring_func": "sigmoid"}, ["scoring_func", "sigmoid"]),
        ("smollm3", {"no_rope_layers": [1, 0]}, ["no_rope_layers", "4"]),
        ("smollm3", {"mlp_bias": True}, ["mlp_bias"]),
        ("granite", {"residual_multiplier": 0}, ["residual_multiplier", "0"]),
        ("granite", {"logits_scaling": "big"}, ["logits_scaling", "big"]),
        ("qwen3_moe", {"shared_expert_intermediate_size": 64}, ["shared_expert_intermediate_size"]),
        ("gemma2", {"hidden_activation": "relu2"}, ["hidden_act", "relu2"]),
        ("gemma3", {"layer_types": ["chunked_attention"] * 4}, ["layer_types", "chunked_attention"]),
        ("mixtral", {"architectures": ["FancyForCausalLM"], "model_type": "fancy"},
         ["FancyForCausalLM", "Qwen3ForCausalLM"]),
    ],
)
def test_bad_config_names_field_and_value(tmp_path, tokenizer_dir, family_name, changes, names):
    folder = make_family_model(family_name, tmp_path / family_name, tokenizer_dir)
    _write_config(folder, **changes)
    with pytest.raises(ModelLoadError) as err:
        LLM(str(folder), num_kv_blocks=16)
    for name in names:
        assert name in str(err.value)


def test_missing_or_misshaped_tensor_names_it(tmp_path, tokenizer_dir) -> None:
    from safetensors.torch import load_file, save_file

    folder = make_family_model("qwen3", tmp_path / "qwen3", tokenizer_dir)
    weights = load_file(str(folder / "model.safetensors"))
    k_norm = weights.pop("model.layers.1.self_attn.k_norm.weight")
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight") as err:
        LLM(str(folder), num_kv_blocks=16)
    assert str(folder) in str(err.value) and err.value.path == str(folder)
    weights["model.layers.1.self_attn.k_norm.weight"] = k_norm[:-1]
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"k_norm\.weight.*\(31,\).*\(32,\)"):
        LLM(str(folder), num_kv_blocks=16)


# --------------------------------------------------------------------------- KV compatibility


def test_windows_and_softcap_are_part_of_the_kv_handshake(tmp_path, tokenizer_dir) -> None:
    """Two Gemma 2 workers with equal cache shapes but other windows (or another soft-cap)
    refuse each other's KV naming the field; the decode side then recomputes locally."""
    from splitserve.errors import IncompatibleKVLayoutError
    from splitserve.kvtransfer.loopback import LoopbackTransport
    from splitserve.roles.engine.config import EngineConfig
    from splitserve.roles.engine.llm_engine import LLMEngine
    from tests.unit.test_disagg_engine import PARAMS, _drive

    base = make_family_model("gemma2", tmp_path / "a", tokenizer_dir)
    other = make_family_model("gemma2", tmp_path / "b", tokenizer_dir)
    _write_config(other, layer_types=["full_attention"] * 4)
    capped = make_family_model("gemma2", tmp_path / "c", tokenizer_dir)
    _write_config(capped, attn_logit_softcapping=30.0)
    engines = [LLMEngine(EngineConfig(model=str(f), num_kv_blocks=64)) for f in (base, other, capped)]
    for i, e in enumerate(engines):
        e.model_id = "gemma"  # one name for three configs: only the new fields tell them apart
        e.attach_kv_connector(LoopbackTransport(), f"gemma-{i}", lease_ttl_s=5.0)
    layouts = [e.kv_worker.layout for e in engines]
    assert layouts[0].head_dim == layouts[1].head_dim == layouts[2].head_dim
    assert layouts[0].compatibility_hash() != layouts[1].compatibility_hash()
    for other_layout, field in ((layouts[1], "layer_windows"), (layouts[2], "model_signature")):
        with pytest.raises(IncompatibleKVLayoutError) as err:
            layouts[0].check_compatible(other_layout.to_wire())
        assert err.value.field == field
    prompt = PROMPTS[5]
    got = _drive(engines[0], engines[1], [prompt], PARAMS)["r0"]
    assert engines[1].stats()["num_remote_fallbacks"] == 1
    # the first token came from the prefill worker; the rest is the decode model's own
    rest = SamplingParams(temperature=0.0, max_tokens=PARAMS.max_tokens - 1, ignore_eos=True)
    alone = LLM(str(other), num_kv_blocks=64).generate([prompt + got[:1]], rest)[0]
    assert got[1:] == alone.outputs[0].token_ids


# --------------------------------------------------------------------------- weight formats


def _linears(obj, seen=None) -> list:
    """Every ``Linear`` reachable from a model's layers (attributes, lists, tuples)."""
    from splitserve.kernels.linear import Linear

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, Linear):
        return [obj]
    children = obj if isinstance(obj, list | tuple) else getattr(obj, "__dict__", {}).values()
    return [lin for child in children if not isinstance(child, torch.Tensor)
            for lin in _linears(child, seen)]


def test_int8_weights_reach_every_projection_of_every_family(family) -> None:
    """The blocks build every projection through ``Linear``, so a weight format chosen at
    load applies to each architecture unchanged (MoE routers stay float by design)."""
    name, folder, ref = family
    llm = LLM(str(folder), num_kv_blocks=64, quantization="int8")
    layers = llm.engine.runner.model.layers
    linears = [lin for layer in layers for lin in _linears(layer)]
    routers = {id(layer.mlp.router) for layer in layers if hasattr(layer.mlp, "router")}
    assert linears and all(lin.quantized for lin in linears if id(lin) not in routers)
    out = llm.generate([PROMPTS[2]], GREEDY)[0].outputs[0].token_ids
    assert len(out) == NEW_TOKENS
