"""Structured outputs in the engine: validation, the compiled-grammar cache, the batched mask,
and constrained generation through batching, chunked prefill, preemption, n > 1, seeds, stop
strings and the prefill -> decode hand-off (tiny random model over the SmolLM2 vocabulary).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import jsonschema
import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.errors import InvalidRequestError
from splitserve.roles.engine.config import EngineConfig
from splitserve.roles.engine.llm_engine import LLMEngine
from splitserve.roles.engine.proposer import Proposer
from splitserve.roles.engine.request import Request
from splitserve.roles.engine.structured import (
    GrammarCompiler,
    apply_bitmask,
    apply_bitmask_torch,
    check_structured,
)
from splitserve.sampling_params import StructuredOutputsParams
from tests.unit.test_disagg_engine import _drive, _engines

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "n", "ok"],
    "additionalProperties": False,
}
CHOICE = {"choice": ["yes", "no", "maybe so"]}


def _so(**kw: object) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir), num_kv_blocks=256)


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("so", "field", "words"),
    [
        ({"json": {"type": 5}}, "structured_outputs.json", "not a valid JSON schema"),
        ({"json": {"type": "string", "not": {"const": "a"}}}, "structured_outputs.json",
         "unsupported JSON schema keyword"),
        ({"json": {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}},
         "structured_outputs.json", "uniqueItems"),
        ({"json": {"$ref": "#/$defs/missing"}}, "structured_outputs.json", "invalid"),
        ({"regex": "[a-"}, "structured_outputs.regex", "invalid"),
        ({"grammar": 'root ::= "a" | undefined_rule'}, "structured_outputs.grammar", "invalid"),
        ({"grammar": 'start ::= "a"'}, "structured_outputs.grammar", "root"),
        ({"structural_tag": {"format": {"type": "nonsense"}}},
         "structured_outputs.structural_tag", "not recognized"),
        ({"structural_tag": {"format": {"type": "tag", "begin": "<a>", "end": "</a>", "content": {
            "type": "json_schema", "json_schema": {"type": "array", "uniqueItems": True}}}}},
         "structured_outputs.structural_tag.format.content.json_schema", "uniqueItems"),
        ({"structural_tag": {"structures": [{"begin": "<f>", "schema": {"type": 5},
                                             "end": "</f>"}], "triggers": ["<f"]}},
         "structured_outputs.structural_tag.structures.0.schema", "not a valid JSON schema"),
        ({"structural_tag": {"structures": [{"begin": "<f>", "schema": {}, "end": "</f>"}],
                             "triggers": ["<g"]}},
         "structured_outputs.structural_tag.structures.0.begin", "trigger"),
        ({"structural_tag": {"structures": [], "triggers": ["<g"]}},
         "structured_outputs.structural_tag", "structures"),
    ],
)
def test_bad_constraints_name_the_field(so: dict, field: str, words: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        check_structured(_so(**so))
    assert e.value.field == field
    assert words in str(e.value)


def test_params_shape_errors() -> None:
    with pytest.raises(InvalidRequestError, match="exactly one") as e:
        SamplingParams(structured_outputs={"json": {}, "regex": "a"})
    assert e.value.field == "structured_outputs"
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(structured_outputs={"jsn": {}})
    assert e.value.field == "structured_outputs.jsn"
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(structured_outputs={"choice": []})
    assert e.value.field == "structured_outputs.choice"


TAGGED = {"format": {"type": "tag", "begin": "<answer>", "end": "</answer>", "content": {
    "type": "json_schema", "json_schema": SCHEMA, "max_whitespace_cnt": 1}}}


@pytest.mark.parametrize("tag", [TAGGED, json.dumps(TAGGED)])
def test_structural_tag_is_enforced(tiny: LLM, tag: object) -> None:
    """xgrammar's structural tag (vLLM's structured_outputs.structural_tag, dict or JSON
    text): a tag format forces begin, JSON under the schema, end, on a random tiny model."""
    out = tiny.generate([[5, 6, 7]], SamplingParams(
        temperature=0, max_tokens=80, structured_outputs={"structural_tag": tag}))[0].outputs[0]
    assert out.finish_reason == "stop", out.text
    assert out.text.startswith("<answer>") and out.text.endswith("</answer>"), out.text
    jsonschema.validate(json.loads(out.text[len("<answer>"):-len("</answer>")]), SCHEMA)
    free = tiny.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=20))[0]
    assert not free.outputs[0].text.startswith("<answer>")  # the tag came from the grammar


def test_structural_tag_triggers_leave_other_text_free(tiny: LLM) -> None:
    """The older form (structures and triggers): text is free until a trigger; the same
    greedy text as unconstrained while no trigger appears."""
    tag = {"structures": [{"begin": "<fn=f>", "schema": SCHEMA, "end": "</fn>"}],
           "triggers": ["<fn"]}
    prompt = [[11, 12, 13]]
    free = tiny.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert "<fn" not in free.text
    got = tiny.generate(prompt, SamplingParams(temperature=0, max_tokens=12, structured_outputs={
        "structural_tag": tag}))[0].outputs[0]
    assert got.token_ids == free.token_ids


def test_content_hash_keeps_key_order_and_kind() -> None:
    a = _so(json={"type": "object", "properties": {"x": {}, "y": {}}})
    b = _so(json=json.dumps({"type": "object", "properties": {"x": {}, "y": {}}}))
    c = _so(json={"type": "object", "properties": {"y": {}, "x": {}}})
    assert a.content_hash == b.content_hash  # dict or text: one grammar
    assert a.content_hash != c.content_hash  # property order is the generation order
    assert _so(regex="ab").content_hash != _so(grammar="ab").content_hash


# ---------------------------------------------------------------------- compiler and mask


@pytest.fixture(scope="module")
def compiler(tiny):
    tok = tiny.engine.tokenizer
    c = GrammarCompiler(tok.hf, tiny.engine.model_config.vocab_size, sorted(tok.eos_token_ids))
    yield c
    c.close()


def test_compiled_grammars_are_cached_by_content_hash(compiler: GrammarCompiler) -> None:
    before = compiler.num_compiles
    first = compiler.compile(_so(json=SCHEMA))
    again = compiler.compile(_so(json=json.dumps(SCHEMA)))
    assert again is first
    assert compiler.num_compiles == before + 1
    with pytest.raises(InvalidRequestError):
        compiler.compile(_so(regex="(unclosed"))
    hits = compiler.num_cache_hits
    with pytest.raises(InvalidRequestError):  # the failure is cached too
        compiler.compile(_so(regex="(unclosed"))
    assert compiler.num_cache_hits == hits + 1


def test_slow_compile_is_refused_by_timeout(tiny) -> None:
    tok = tiny.engine.tokenizer
    slow = GrammarCompiler(tok.hf, tiny.engine.model_config.vocab_size, sorted(tok.eos_token_ids),
                           timeout_s=0.0)
    schema = {"type": "object", "properties": {f"k{i}": {"type": "string", "pattern": "[a-z]{3,9}"}
                                               for i in range(40)}}
    with pytest.raises(InvalidRequestError, match="did not compile within") as e:
        slow.compile(_so(json=schema))
    assert e.value.field == "structured_outputs.json"
    slow.close()


def test_a_compile_still_queued_at_its_timeout_is_cancelled_and_forgotten(tiny) -> None:
    """Both compile threads busy (held by two real jobs on the compiler's own pool): a new
    constraint's compile waits in the queue, its caller's timeout passes, and the compile is
    cancelled rather than left to take a core later for nobody; a later request compiles it
    afresh instead of meeting the cancelled one in the cache."""
    tok = tiny.engine.tokenizer
    c = GrammarCompiler(tok.hf, tiny.engine.model_config.vocab_size, sorted(tok.eos_token_ids),
                        timeout_s=0.2)
    release = threading.Event()
    holders = [c._pool.submit(release.wait) for _ in range(2)]
    so = _so(regex="[ab]{2,5}")
    try:
        with pytest.raises(InvalidRequestError, match="did not compile within"):
            c.compile(so)
        assert so.content_hash not in c._cache and c.num_compiles == 1
    finally:
        release.set()
    assert all(h.result(timeout=10) for h in holders)
    c.timeout_s = 30.0
    assert c.compile(so) is not None and c.num_compiles == 2
    c.close()


def _wide_schema(n: int) -> dict:
    """A schema whose compile time and memory grow with ``n`` (seconds at a few thousand)."""
    return {"type": "object", "properties": {
        f"k{i}": {"type": "string", "pattern": "[a-z]{3,9}"} for i in range(n)}}


class _CountingCompiler:
    """The compiler's own xgrammar compiler, counting what it is asked to compile here."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def compile_grammar(self, grammar):
        self.calls += 1
        return self.inner.compile_grammar(grammar)


def _gone(pid: int) -> bool:
    """The process runs no more (gone, or a zombie waiting for a reaper outside our control)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("X", "Z")  # dead (zombie: no code runs)
    except FileNotFoundError:
        return True


def _new_compiler(tiny, **kw) -> GrammarCompiler:
    tok = tiny.engine.tokenizer
    c = GrammarCompiler(tok.hf, tiny.engine.model_config.vocab_size, sorted(tok.eos_token_ids),
                        **kw)
    c._compiler = _CountingCompiler(c._compiler)
    return c


def test_a_compile_past_its_timeout_is_stopped_with_its_child_process(tiny) -> None:
    """The compile that outlives its timeout runs in the probe child, which is killed: nothing
    keeps compiling it (before, a thread compiled a hostile schema for minutes after the
    refusal), this process never compiles it, and the refusal is cached. The next grammar gets
    a fresh child."""
    c = _new_compiler(tiny, timeout_s=0.5)
    try:
        so = _so(json=_wide_schema(3000))
        c.compile(_so(regex="[ab]{2}"))  # the child is up (its start is not in the budget)
        probe = next(p for p in c.probes if p.proc is not None)
        pid = probe.proc.pid
        with pytest.raises(InvalidRequestError, match="did not compile within 0.5 s") as e:
            c.compile(so)
        assert e.value.field == "structured_outputs.json"
        assert probe.num_kills == 1 and _gone(pid)
        # its replacement was started at once (it loads while nobody waits for it)
        assert probe.num_starts == 2 and probe.proc is not None and probe.proc.pid != pid
        assert c.num_refused == 1 and c._compiler.calls == 1  # only the small regex here
        hits = c.num_cache_hits
        with pytest.raises(InvalidRequestError, match="did not compile within"):
            c.compile(so)  # the refusal is cached: no second probe
        assert c.num_cache_hits == hits + 1 and c.num_refused == 1
        # the next grammar waits for the new child's start beyond its own 0.5 s budget
        assert c.compile(_so(regex="[cd]{3}")) is not None
        assert probe.num_starts == 2 and probe.ready and c._compiler.calls == 2
    finally:
        c.close()
    assert all(p.proc is None for p in c.probes)


def test_a_compile_that_needs_more_memory_than_allowed_is_stopped(tiny) -> None:
    """The child's memory is watched while it compiles: past the bound it is killed and the
    request refused naming the field and the bound."""
    c = _new_compiler(tiny, timeout_s=60.0, max_memory_mb=1)
    try:
        with pytest.raises(InvalidRequestError, match="needed more than 1 MiB") as e:
            c.compile(_so(json=_wide_schema(400)))
        assert e.value.field == "structured_outputs.json"
        assert sum(p.num_kills for p in c.probes) == 1 and c._compiler.calls == 0
        c.max_memory_mb = 1024
        assert c.compile(_so(json=SCHEMA)) is not None and c._compiler.calls == 1
    finally:
        c.close()


def test_engines_of_one_vocabulary_share_their_probe_children(tiny_model_dir, tiny) -> None:
    """Several engines in one process (tests; a frontend beside a colocated engine) start two
    probe children between them, not two each; a compiler built on its own keeps its own."""
    other = LLM(str(tiny_model_dir), num_kv_blocks=64)
    a, b = tiny.engine.structured.compiler, other.engine.structured.compiler
    assert a.probes and a.probes is b.probes
    assert b.compile(_so(regex="[xy]{2}")) is not None
    b.close()  # another engine's compiler closing leaves the shared children running
    assert any(p.ready for p in a.probes) and a.compile(_so(regex="[xy]{3}")) is not None
    own = _new_compiler(tiny)
    try:
        assert own.probes is not a.probes and not set(map(id, own.probes)) & set(
            map(id, a.probes))
    finally:
        own.close()


def test_a_probe_child_that_dies_unasked_costs_no_request(tiny, monkeypatch, caplog) -> None:
    """A child killed from outside (OOM killer, an operator): the compile in flight is done
    here without a bound (logged), and the next one starts a new child. The child never sees
    a secret variable."""
    monkeypatch.setenv("SPLITSERVE_API_KEY", "sk-probe-secret")
    c = _new_compiler(tiny, timeout_s=30.0)
    try:
        assert c.compile(_so(regex="[ab]{2}")) is not None
        probe = next(p for p in c.probes if p.proc is not None)
        with open(f"/proc/{probe.proc.pid}/environ", "rb") as f:
            assert b"sk-probe-secret" not in f.read()
        probe.proc.kill()
        probe.proc.wait()
        with caplog.at_level("WARNING", logger="splitserve.roles.engine.structured"):
            assert c.compile(_so(regex="[ab]{3}")) is not None
        assert "without a time or memory bound" in caplog.text
        assert c._compiler.calls == 2
        assert c.compile(_so(regex="[ab]{4}")) is not None
        assert probe.num_starts == 2 and probe.proc.poll() is None
    finally:
        c.close()


@pytest.mark.parametrize(("dtype", "vocab", "words", "impl"), [
    (torch.float32, 70, 3, apply_bitmask),  # padding bits 70..95 exist in the mask only
    (torch.bfloat16, 70, 3, apply_bitmask),
    (torch.float32, 100, 3, apply_bitmask),  # ids 96..99 past the mask: masked (torch path)
    (torch.float64, 70, 3, apply_bitmask),  # a dtype xgrammar's kernel does not take
    (torch.float32, 70, 3, apply_bitmask_torch),
])
def test_apply_bitmask_equals_per_token_reference(dtype, vocab: int, words: int, impl) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, vocab, generator=gen).to(dtype)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, words), generator=gen, dtype=torch.int32)
    index = torch.tensor([3, 1])
    want = logits.clone()
    for r, row in enumerate(index.tolist()):
        for v in range(vocab):
            if v >= 32 * words or not (int(bitmask[r, v // 32]) >> (v % 32)) & 1:
                want[row, v] = float("-inf")
    impl(logits, bitmask, index)
    assert torch.equal(logits, want)


# ---------------------------------------------------------------------- generation


def _greedy(so: dict | None, **kw: object) -> SamplingParams:
    kw.setdefault("max_tokens", 40)
    return SamplingParams(temperature=0.0, structured_outputs=so, **kw)  # type: ignore[arg-type]


def test_choice_and_regex_hold_and_only_constrained_rows_are_masked(tiny: LLM) -> None:
    eng = tiny.engine
    prompts = [list(range(300, 340)), list(range(400, 430)), list(range(500, 520))]
    free = _greedy(None, max_tokens=12, ignore_eos=True)
    alone = tiny.generate([prompts[1]], free)[0].outputs[0].token_ids
    masked_before = eng.stats()["grammar_masked_rows"]
    outs = tiny.generate(prompts, [_greedy(CHOICE), free, _greedy({"regex": r"[0-9]{3}-[a-c]{2}"})])
    assert outs[0].outputs[0].text in CHOICE["choice"]
    assert outs[0].outputs[0].finish_reason == "stop"
    assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", outs[2].outputs[0].text)
    assert outs[1].outputs[0].token_ids == alone  # the free row in the batch was not masked
    constrained_tokens = len(outs[0].outputs[0].token_ids) + len(outs[2].outputs[0].token_ids)
    assert eng.stats()["grammar_masked_rows"] - masked_before == constrained_tokens
    assert eng.stats()["num_grammar_matchers"] == 0


def test_grammar_with_min_tokens_or_an_allow_list_that_leaves_nothing(tiny: LLM, caplog) -> None:
    """A grammar that can only end before ``min_tokens``: the request ends there, on one stop
    token (not stop tokens drawn and ignored until min_tokens). An allow-list that shares no
    token with what the grammar allows: the request ends at once with a warning (it drew the
    last token id, ``</think>`` of a thinking model, before)."""
    eos = min(tiny.engine.tokenizer.eos_token_ids)
    prompt = [list(range(300, 340))]
    plain = tiny.generate(prompt, _greedy(CHOICE))[0].outputs[0]
    held = tiny.generate(prompt, _greedy(CHOICE, min_tokens=30))[0].outputs[0]
    assert held.token_ids == plain.token_ids and held.token_ids[-1] == eos
    assert held.finish_reason == "stop"
    vocab = tiny.engine.model_config.vocab_size
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, seed=2, max_tokens=8,
                                allowed_token_ids=[5, 6, vocab - 1],
                                structured_outputs=CHOICE)  # type: ignore[arg-type]
        with caplog.at_level("WARNING"):
            out = tiny.generate(prompt, params)[0].outputs[0]
        assert out.token_ids == [eos] and out.finish_reason == "stop", out
        assert "no token satisfies every constraint" in caplog.text
        caplog.clear()
    stats = tiny.engine.stats()
    assert stats["num_grammar_matchers"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]


def test_json_schema_output_validates(tiny: LLM) -> None:
    out = tiny.generate([list(range(700, 760))], _greedy({"json": SCHEMA}, max_tokens=80))[0]
    assert out.outputs[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)


def test_grammar_ebnf(tiny: LLM) -> None:
    grammar = 'root ::= "(" num ("+" num)? ("+" num)? ")"\nnum ::= [1-9]'
    params = SamplingParams(temperature=0.9, seed=4, max_tokens=30, structured_outputs={"grammar": grammar})
    out = tiny.generate([list(range(50, 90))], params)[0].outputs[0]
    assert re.fullmatch(r"\([1-9](\+[1-9]){0,2}\)", out.text), out.text
    assert out.finish_reason == "stop"


def test_seeded_n_samples_repeat_and_differ(tiny: LLM) -> None:
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=40,
                            structured_outputs={"regex": r"[a-z]{2,8}(,[a-z]{2,8}){0,3}"})
    first = [c.text for c in tiny.generate([list(range(900, 930))], params)[0].outputs]
    second = [c.text for c in tiny.generate([list(range(900, 930))], params)[0].outputs]
    assert first == second
    assert len(set(first)) > 1
    assert all(re.fullmatch(r"[a-z]{2,8}(,[a-z]{2,8}){0,3}", t) for t in first)


def test_stop_string_ends_a_constrained_output(tiny: LLM) -> None:
    so = {"regex": r"abc,def,ghi"}
    out = tiny.generate([list(range(60, 80))], _greedy(so, stop=[",g"]))[0].outputs[0]
    assert out.text == "abc,def"
    assert out.stop_reason == ",g"
    assert tiny.engine.stats()["num_grammar_matchers"] == 0


def test_chunked_prefill_and_preemption_keep_constrained_outputs(tiny_model_dir, tiny: LLM) -> None:
    """Prompts in 16-token chunks, and a KV pool so small that requests are preempted
    (recomputed) mid-output: the outputs equal the roomy engine's and still match."""
    pattern = r"[a-z]{3,8}( [a-z]{3,8}){1,2}"
    params = SamplingParams(temperature=0.7, seed=3, max_tokens=24, ignore_eos=True,
                            structured_outputs={"regex": pattern})
    prompts = [list(range(1000 + 37 * i, 1030 + 37 * i)) for i in range(4)]  # 4 x 4 blocks
    want = tiny.generate(prompts, params)
    assert all(re.fullmatch(pattern, o.outputs[0].text) for o in want)
    squeezed = LLM(str(tiny_model_dir), num_kv_blocks=12, enable_prefix_caching=False)
    chunked = LLM(str(tiny_model_dir), num_kv_blocks=256, max_num_batched_tokens=16)
    for other in (squeezed, chunked):
        got = other.generate(prompts, params)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
        stats = other.engine.stats()
        assert stats["num_grammar_matchers"] == 0
        assert stats["num_free_blocks"] == stats["num_blocks"]
    assert squeezed.engine.stats()["num_preemptions"] > 0


def test_prefill_decode_handoff_continues_under_the_constraint(tiny_model_dir, tiny: LLM) -> None:
    prompts = [list(range(2000 + 50 * i, 2040 + 50 * i)) for i in range(3)]
    for params in (
        _greedy({"json": SCHEMA}, max_tokens=60),
        SamplingParams(temperature=0.9, seed=21, max_tokens=30,
                       structured_outputs={"regex": r"[a-z]{3,6}(-[a-z]{3,6}){1,3}"}),
    ):
        prefill, decode = _engines(tiny_model_dir)
        got = _drive(prefill, decode, prompts, params)
        want = [o.outputs[0].token_ids for o in tiny.generate(prompts, params)]
        assert [got[f"r{i}"] for i in range(len(prompts))] == want
        # the decode side rebuilt each matcher from the prefill side's first token
        assert decode.structured.num_matcher_builds == len(prompts)
        for eng in (prefill, decode):
            assert eng.structured.num_active == 0
            assert eng.kv.pool.num_free_blocks == eng.num_blocks


def test_gate_crosses_the_prefill_decode_handoff(thinking_model_dir) -> None:
    """A thinking model's gated constraint in P/D: the prefill side's one token opens the
    thinking (biased; the regex alone refuses it), the decode side rebuilds the gate from that
    token, lets the model close the thinking and holds the grammar after it: the same tokens
    as one engine, and the text is <think></think> then the regex's."""
    single = LLM(str(thinking_model_dir), num_kv_blocks=256)
    tok = single.engine.tokenizer
    think, end = (tok.encode(t, add_special_tokens=False)[0] for t in ("<think>", "</think>"))
    so = _so(regex=r"[a-z]{3,6}", think_start="<think>", think_end="</think>")
    params = SamplingParams(temperature=0.0, max_tokens=16, structured_outputs=so,
                            logit_bias={think: 40.0, end: 50.0})
    prompts = [list(range(2000 + 50 * i, 2040 + 50 * i)) for i in range(3)]
    want = single.generate(prompts, params)
    for out in want:
        text = out.outputs[0].text
        assert text.startswith("<think></think>") and re.fullmatch("[a-z]{3,6}", text[15:]), text
    prefill, decode = _engines(thinking_model_dir)
    got = _drive(prefill, decode, prompts, params)
    assert [got[f"r{i}"] for i in range(len(prompts))] == [o.outputs[0].token_ids for o in want]
    assert all(got[f"r{i}"][0] == think for i in range(len(prompts)))  # the prefill side's
    assert decode.structured.num_matcher_builds == len(prompts)
    for eng in (prefill, decode):
        assert eng.structured.num_active == 0
        assert eng.kv.pool.num_free_blocks == eng.num_blocks


def test_bad_constraint_is_refused_at_intake_and_abort_leaves_no_matcher(tiny_model_dir) -> None:
    eng = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64))
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request("bad", [5, 6, 7], SamplingParams(structured_outputs={"regex": "(x"}))
    assert e.value.field == "structured_outputs.regex"
    assert not eng.has_unfinished_requests()
    eng.add_request("a", list(range(10, 40)), _greedy({"json": SCHEMA}, n=2))
    eng.step()
    assert eng.structured.num_active == 2
    assert eng.check_integrity().ok  # live requests may hold matchers
    eng.abort_request("a")
    eng.step()
    assert eng.structured.num_active == 0
    report = eng.check_integrity()
    assert report.ok, report.problems
    eng.structured.add("ghost", object())  # what a leak would look like
    assert "left a grammar matcher behind" in " ".join(eng.check_integrity().problems)
    eng.structured.release("ghost")
    assert eng.kv.pool.num_free_blocks == eng.num_blocks


class _OracleProposer(Proposer):
    """Drafts the known output, every third draft token corrupted (alternately the next
    token id, which the grammar may allow, and EOS, which it refuses mid-structure), and
    EOS past the true end (the grammar allows it there: the matcher terminates on a draft)."""

    def __init__(self, truth: dict[tuple[int, ...], list[int]], eos: int) -> None:
        self.truth, self.eos = truth, eos

    def propose(self, request: Request, max_tokens: int) -> list[int]:
        full = self.truth[tuple(request.prompt_token_ids)]
        done = request.num_output_tokens
        draft = []
        for pos in range(done, done + max_tokens):
            tok = full[pos] if pos < len(full) else self.eos
            if pos % 3 == 2:
                tok = (tok + 1) % 49000 if pos % 2 else self.eos
            draft.append(tok)
        return draft

    def finish(self, request: Request) -> None:
        pass


def test_speculation_on_constrained_requests_is_exact(tiny_model_dir, tiny: LLM) -> None:
    """Constrained requests are speculated too: each verify row is masked with the grammar
    after the draft prefix before it (the matcher walks the draft, then rolls back). Greedy and
    seeded outputs equal the non-speculative engine's, drafts were accepted and rejected
    (grammar-refused ones included), and no matcher or block is left behind."""
    prompts = [list(range(3000 + 40 * i, 3030 + 40 * i)) for i in range(4)]
    params = [
        _greedy({"json": SCHEMA}, max_tokens=60),
        SamplingParams(temperature=0.9, seed=8, max_tokens=40,
                       structured_outputs={"regex": r"[a-z]{3,6}(-[a-z]{3,6}){1,4}"}),
        _greedy({"grammar": 'root ::= "(" [1-9] ("+" [1-9]){2,6} ")"'}, max_tokens=40),
        _greedy(None, max_tokens=24, ignore_eos=True),  # a free row in the same verify batch
    ]
    want = [o.outputs[0].token_ids for o in tiny.generate(prompts, params)]
    spec = LLM(str(tiny_model_dir), num_kv_blocks=256,
               speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                   "adaptive": False})
    eos = min(spec.engine.tokenizer.eos_token_ids)
    oracle = _OracleProposer({tuple(p): w for p, w in zip(prompts, want, strict=True)}, eos)
    speculator = spec.engine.scheduler.speculator
    speculator.proposer = oracle
    got = spec.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == want
    assert re.fullmatch(r"[a-z]{3,6}(-[a-z]{3,6}){1,4}", got[1].outputs[0].text)
    jsonschema.validate(json.loads(got[0].outputs[0].text), SCHEMA)
    stats = spec.engine.stats()
    assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"]
    constrained_tokens = sum(len(w) for w in want[:3])
    # verify chunks were masked row by row: more masked rows than kept constrained tokens
    assert stats["grammar_masked_rows"] > constrained_tokens
    assert stats["num_grammar_matchers"] == 0
    assert stats["num_free_blocks"] == stats["num_blocks"]


def _grammar_row(compiled: object, tokens: list[int], vocab: int) -> torch.Tensor:
    """The tokens a fresh matcher of ``compiled`` allows after ``tokens`` (a bool row)."""
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compiled)
    assert all(matcher.accept_token(t) for t in tokens)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    matcher.fill_next_token_bitmask(bitmask, 0)
    return ((bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
            ).flatten()[:vocab].bool()


def test_matcher_walks_a_draft_and_rolls_back(tiny: LLM) -> None:
    """The verify rows of one chunk: row j is the grammar's mask after draft[:j] (as a fresh
    matcher fed those tokens computes it); a refused draft token leaves stop-only rows after
    it; the matcher is rolled back, so the next step starts from the request's own tokens."""

    from splitserve.roles.engine.structured import StructuredOutputManager

    tok, vocab = tiny.engine.tokenizer, tiny.engine.model_config.vocab_size
    manager = StructuredOutputManager(tok, vocab)
    params = _greedy({"regex": r"ab(c|d)e"})
    compiled = manager.compile(params)
    a, b, c, z = (tok.hf.convert_tokens_to_ids(t) for t in "abcz")
    stop_only = torch.zeros(vocab, dtype=torch.bool)
    stop_only[sorted(tok.eos_token_ids)] = True

    def reference(tokens: list[int]) -> torch.Tensor:
        return _grammar_row(compiled, tokens, vocab)

    def rows(output: list[int], draft: list[int]) -> list[torch.Tensor]:
        req = Request("r", [5, 6, 7], params, seed=0, max_tokens=8, output_token_ids=output,
                      eos_token_ids=tok.eos_token_ids, block_size=16)
        logits = torch.zeros(1 + len(draft), vocab)
        manager.apply(logits, [(req, draft)])
        return list(logits > float("-inf"))

    manager.add("r", compiled)
    assert all(torch.equal(g, w) for g, w in zip(
        rows([], [a, b]), [reference([]), reference([a]), reference([a, b])], strict=True))
    assert all(torch.equal(g, w) for g, w in zip(
        rows([], [a, z, c]), [reference([]), reference([a]), stop_only, stop_only], strict=True))
    assert torch.equal(rows([], [])[0], reference([]))  # rolled back to the start
    assert torch.equal(rows([a], [b])[1], reference([a, b]))  # then follows the kept tokens
    assert manager._slots["r"].num_accepted == 1 and not manager._slots["r"].broken
    manager.release("r")
    assert manager.num_active == 0


def test_gate_frees_the_thinking_then_constrains(tiny: LLM) -> None:
    """With think tags (a server's reasoning parser), the constraint starts after the
    thinking: the first row allows the grammar's tokens or the start tag's first, the tag's
    other tokens are forced, the thinking is free, and from the token after the end tag the
    rows are the grammar's (a fresh matcher's); draft rows across the end tag too; a slot
    rebuilt from the same tokens (hand-off, replay) finds the same point."""

    from splitserve.roles.engine.structured import StructuredOutputManager

    tok, vocab = tiny.engine.tokenizer, tiny.engine.model_config.vocab_size
    manager = StructuredOutputManager(tok, vocab)
    a, b, z = (tok.hf.convert_tokens_to_ids(t) for t in "abz")
    start = tok.encode("<think>", add_special_tokens=False)
    end = tok.encode("</think>", add_special_tokens=False)
    assert len(start) > 1 and len(end) > 1  # multi-token tags: the harder case
    free = torch.ones(vocab, dtype=torch.bool)

    def params(thinking: bool) -> SamplingParams:
        return _greedy(_so(regex=r"ab(c|d)e", think_start="<think>", think_end="</think>",
                           thinking=thinking))

    compiled = manager.compile(params(False))

    def reference(tokens: list[int]) -> torch.Tensor:
        return _grammar_row(compiled, tokens, vocab)

    def only(token: int) -> torch.Tensor:
        row = torch.zeros(vocab, dtype=torch.bool)
        row[token] = True
        return row

    def rows(output: list[int], draft: list[int] = (), thinking: bool = False
             ) -> list[torch.Tensor]:
        """The rows of a fresh slot (a request that arrives with ``output`` already made)."""
        manager.release("r")
        manager.add("r", compiled, params(thinking))
        req = Request("r", [5, 6, 7], params(thinking), seed=0, max_tokens=32,
                      output_token_ids=list(output), eos_token_ids=tok.eos_token_ids,
                      block_size=16)
        logits = torch.zeros(1 + len(draft), vocab)
        manager.apply(logits, [(req, list(draft))])
        return list(logits > float("-inf"))

    def same(got: list[torch.Tensor], want: list[torch.Tensor]) -> bool:
        return all(torch.equal(g, w) for g, w in zip(got, want, strict=True))

    first = reference([]).clone()
    first[start[0]] = True
    assert same(rows([]), [first])  # the grammar's first tokens, or the start tag's
    assert same(rows([a]), [reference([a])])  # the grammar's: constrained from there
    assert same(rows(start[:1]), [only(start[1])])  # the rest of the tag is forced
    assert same(rows(start), [free])
    assert same(rows([*start, z, z, *end[:-1]]), [free])  # the tag is not whole yet
    assert same(rows([*start, z, *end]), [reference([])])
    assert same(rows([*start, z, *end, a]), [reference([a])])
    # draft rows across the end tag: free until it is whole, then the grammar's
    assert same(rows([*start, z], [*end, a]),
                [free] * len(end) + [reference([]), reference([a])])
    # a prompt that left the thinking open: free from the first token
    assert same(rows([], thinking=True), [free])
    assert same(rows([*end, a], thinking=True), [reference([a])])
    manager.release("r")
    assert manager.num_active == 0


_ORPHAN_SCRIPT = """
import json, sys, xgrammar as xgr
from splitserve.roles.engine.grammar_probe import GrammarProbe
info = xgr.TokenizerInfo([f"t{i}" for i in range(20000)])
p = GrammarProbe(info.serialize_json(), 2)
p.probe(xgr.Grammar.from_regex("[ab]{2}").serialize_json(), 60.0, 1 << 40)
print(p.proc.pid, flush=True)
schema = {"type": "object", "properties": {
    f"k{i}": {"type": "string", "pattern": "[a-z]{3,9}"} for i in range(20000)}}
p.probe(xgr.Grammar.from_json_schema(json.dumps(schema)).serialize_json(), 600.0, 1 << 40)
"""


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_probe_child_exits_mid_compile_when_its_engine_is_killed() -> None:
    """An engine SIGKILLed while its probe child compiles a hostile grammar leaves no compile
    running: the child sees its parent gone from a thread of its own (the pipe's end would be
    read only after the compile)."""
    engine = subprocess.Popen([sys.executable, "-c", _ORPHAN_SCRIPT], stdout=subprocess.PIPE,
                              text=True)
    try:
        child = int(engine.stdout.readline())
        start = _cpu_s(child)
        deadline = time.monotonic() + 60
        while _cpu_s(child) - start < 0.5:  # it is inside the long compile
            assert time.monotonic() < deadline and engine.poll() is None
            time.sleep(0.05)
        engine.kill()
        engine.wait()
        deadline = time.monotonic() + 10
        while not _gone(child):
            assert time.monotonic() < deadline, "the probe child outlived its engine"
            time.sleep(0.05)
    finally:
        engine.kill()
        engine.wait()
