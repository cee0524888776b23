"""Speculative decoding in the engine on a tiny random Llama: exact, rolled back, counted.

A random model does not copy its prompt, so the n-gram and suffix proposers rarely fire on
it; these tests drive the engine's verify / accept / roll-back path with an oracle proposer
that knows the non-speculative output and corrupts some of its guesses (a seeded choice per
position), so every step mixes accepted, rejected and absent drafts. The real proposers are
tested on their own in test_spec_proposers.py and on SmolLM2 in the integration suite.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from splitserve import LLM, SamplingParams
from splitserve.errors import ConfigError
from splitserve.hashing import hash_block_tokens
from splitserve.roles.engine.proposer import Proposer
from splitserve.roles.engine.request import Request
from splitserve.roles.engine.speculative import SpeculativeConfig, Speculator

K = 4
CONFIG = {"method": "ngram", "num_speculative_tokens": K, "adaptive": False}


class OracleProposer(Proposer):
    """Proposes the known continuation; each draft token is wrong with probability ``p_wrong``
    (seeded by request and position), and no draft at all every ``skip_every``-th call."""

    def __init__(self, truth: dict[tuple[int, ...], list[int]], p_wrong: float = 0.3,
                 skip_every: int = 5) -> None:
        self.truth = truth
        self.p_wrong = p_wrong
        self.skip_every = skip_every
        self.calls = 0
        self.finished: list[str] = []

    def propose(self, request: Request, max_tokens: int) -> list[int]:
        self.calls += 1
        if self.skip_every and self.calls % self.skip_every == 0:
            return []
        full = self.truth.get(tuple(request.prompt_token_ids), [])
        done = request.num_output_tokens
        draft = []
        for i, tok in enumerate(full[done : done + max_tokens]):
            rng = random.Random(hash((request.prompt_token_ids[0], done + i)))
            draft.append(tok if rng.random() >= self.p_wrong else (tok + 1) % 49000)
        if len(draft) < max_tokens:  # guess past the true end too (stop / max_tokens)
            draft += [7] * (max_tokens - len(draft))
        return draft

    def finish(self, request: Request) -> None:
        self.finished.append(request.request_id)


def _prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 70) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def _with_oracle(llm: LLM, prompts, outs, **kw) -> OracleProposer:
    truth = {tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, outs, strict=True)}
    oracle = OracleProposer(truth, **kw)
    llm.engine.scheduler.speculator = Speculator(SpeculativeConfig(**CONFIG), oracle)
    return oracle


@pytest.fixture(scope="module")
def plain(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir), num_kv_blocks=512, max_num_batched_tokens=256)


def _spec_llm(tiny_model_dir, **kw) -> LLM:
    args = {"num_kv_blocks": 512, "max_num_batched_tokens": 256, **kw}
    return LLM(str(tiny_model_dir), speculative_config=CONFIG, **args)


# ---------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("config", "setting"),
    [
        ({"method": "eagle", "num_speculative_tokens": 3}, "speculative_config.method"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 17}, "speculative_config.num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": True}, "speculative_config.num_speculative_tokens"),
        ({"method": "suffix"}, "speculative_config.num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 2, "draft_model": "x"}, "speculative_config.draft_model"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
          "prompt_lookup_max": 3}, "speculative_config.prompt_lookup_max"),
        ({"method": "suffix", "num_speculative_tokens": 8, "suffix_decoding_max_tree_depth": 8},
         "speculative_config.suffix_decoding_max_tree_depth"),
        ("ngram", "speculative_config"),
    ],
)
def test_bad_config_names_the_setting(tiny_model_dir, config, setting: str) -> None:
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
        LLM(str(tiny_model_dir), speculative_config=config)


def test_off_by_default(plain: LLM) -> None:
    assert plain.engine.config.speculative_config is None
    assert plain.engine.scheduler.speculator is None
    assert "spec_decode_num_drafts" not in plain.engine.stats()


# ---------------------------------------------------------------------------- greedy exactness


def test_greedy_equals_plain_with_prefix_hits_and_logprobs(tiny_model_dir) -> None:
    shared = _prompts(1, seed=11, lo=48, hi=48)[0]  # 3 full blocks shared by half the prompts
    prompts = _prompts(6, seed=1, lo=40, hi=120) + [shared + p for p in _prompts(6, seed=2)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=3)
    # no prompt is ever split, so the KV is bit-equal and so are the logprobs
    whole = LLM(str(tiny_model_dir), num_kv_blocks=512, max_num_batched_tokens=2048)
    want = whole.generate(prompts, params)
    spec = _spec_llm(tiny_model_dir, max_num_batched_tokens=2048)
    oracle = _with_oracle(spec, prompts, want)
    got = spec.generate(prompts, params)
    assert _tokens(got) == _tokens(want)
    for g, w in zip(got, want, strict=True):
        assert g.outputs[0].logprobs == w.outputs[0].logprobs  # the target model's, per token
        assert g.outputs[0].cumulative_logprob == w.outputs[0].cumulative_logprob
    stats = spec.engine.stats()
    assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"]
    assert stats["prefix_cache_hits"] > 0
    assert stats["num_free_blocks"] == spec.engine.num_blocks  # nothing leaked
    assert sorted(oracle.finished) == sorted(f"llm-{i}" for i in range(len(prompts)))


def test_greedy_equals_plain_with_chunked_prefill(plain: LLM, tiny_model_dir) -> None:
    prompts = _prompts(6, seed=12, lo=100, hi=200)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    want = plain.generate(prompts, params)
    spec = _spec_llm(tiny_model_dir, max_num_batched_tokens=37)  # verify chunks share steps
    _with_oracle(spec, prompts, want)  # with prefill chunks of other prompts
    assert _tokens(spec.generate(prompts, params)) == _tokens(want)
    assert spec.engine.stats()["spec_decode_num_accepted_tokens"] > 0


def test_greedy_equals_plain_under_preemption(plain: LLM, tiny_model_dir) -> None:
    prompts = _prompts(8, seed=3, lo=20, hi=40)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = plain.generate(prompts, params)
    small = _spec_llm(tiny_model_dir, num_kv_blocks=14, enable_prefix_caching=False)
    _with_oracle(small, prompts, want)
    assert _tokens(small.generate(prompts, params)) == _tokens(want)
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.stats()["spec_decode_num_accepted_tokens"] > 0
    assert small.engine.kv.pool.num_free_blocks == 14


def test_rollback_frees_slots_and_publishes_only_accepted_blocks(plain: LLM, tiny_model_dir) -> None:
    prompts = _prompts(4, seed=4, lo=30, hi=60)
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    want = plain.generate(prompts, params)
    spec = _spec_llm(tiny_model_dir, block_size=4)  # small blocks: drafts span several
    _with_oracle(spec, prompts, want, p_wrong=0.5, skip_every=0)
    engine = spec.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    engine.kv.pool.take_events()
    stored: set[int] = set()
    while engine.has_unfinished_requests():
        engine.step()
        for req in engine.scheduler.running:  # after update: no block past the sequence
            assert len(engine.kv.get_block_ids(req.request_id)) <= engine.kv.blocks_for(req.num_tokens)
        for ev in engine.kv.pool.take_events():
            if ev.kind == "stored":
                stored.update(ev.block_hashes)
    true_hashes = set()
    for p, o in zip(prompts, want, strict=True):
        true_hashes.update(hash_block_tokens(p + o.outputs[0].token_ids, 4))
    assert stored and stored <= true_hashes  # never a hash over a rejected draft
    assert engine.stats()["spec_decode_acceptance_rate"] < 1.0
    assert engine.kv.pool.num_free_blocks == engine.num_blocks


def test_abort_mid_speculation_frees_everything(plain: LLM, tiny_model_dir) -> None:
    prompts = _prompts(3, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    want = plain.generate(prompts, params)
    spec = _spec_llm(tiny_model_dir)
    oracle = _with_oracle(spec, prompts, want)
    engine = spec.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(3)}
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id] += out.outputs[0].token_ids
            if out.finished:
                finished[out.request_id] = out.outputs[0].finish_reason
        if len(got["r1"]) >= 10 and "r1" not in finished:
            engine.abort_request("r1")
    assert finished["r1"] == "abort"
    assert got["r1"] == want[1].outputs[0].token_ids[: len(got["r1"])]
    assert got["r0"] == want[0].outputs[0].token_ids and got["r2"] == want[2].outputs[0].token_ids
    assert "r1" in oracle.finished
    assert engine.kv.pool.num_free_blocks == engine.num_blocks


def test_greedy_equals_plain_with_everything_in_one_mix(plain: LLM, tiny_model_dir) -> None:
    """Chunked prefill, prefix hits, preemption and an abort in the same run: verify chunks
    share steps with other prompts' prefill chunks, preempted requests recompute over a
    prefix cache that never saw a rejected draft, and every output equals plain decoding."""
    shared = _prompts(1, seed=14, lo=48, hi=48)[0]  # 3 full blocks
    prompts = [shared + p for p in _prompts(6, seed=15, lo=5, hi=40)]
    prompts += _prompts(2, seed=16, lo=120, hi=160)  # long: prefilled in several chunks
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = _tokens(plain.generate(prompts, params))
    spec = _spec_llm(tiny_model_dir, num_kv_blocks=24, max_num_batched_tokens=37)
    _with_oracle(spec, prompts, plain.generate(prompts, params))
    engine = spec.engine
    mixed_steps = 0
    execute = engine.runner.execute

    def spy(out):  # type: ignore[no-untyped-def]
        nonlocal mixed_steps
        verify = any(s.draft_token_ids for s in out.scheduled)
        prefill = any(not s.is_decode for s in out.scheduled)
        mixed_steps += verify and prefill
        return execute(out)

    engine.runner.execute = spy  # type: ignore[method-assign]
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    finished: dict[str, str] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id] += out.outputs[0].token_ids
            if out.finished:
                finished[out.request_id] = out.outputs[0].finish_reason
        if len(got["r2"]) >= 12 and "r2" not in finished:
            engine.abort_request("r2")
    assert finished.pop("r2") == "abort"
    aborted = got.pop("r2")
    assert 12 <= len(aborted) < len(want[2]) and aborted == want[2][: len(aborted)]
    for i, w in enumerate(want):
        if i != 2:
            assert got[f"r{i}"] == w and finished[f"r{i}"] == "length", i
    stats = engine.stats()
    assert mixed_steps > 0  # verify chunks ran beside prefill chunks
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"]
    assert engine.kv.pool.num_free_blocks == engine.num_blocks
    assert engine.check_integrity().ok


# ---------------------------------------------------------------------------- stops and streams


def test_stop_strings_max_tokens_and_stop_ids_never_overshoot(plain: LLM, tiny_model_dir) -> None:
    prompts = _prompts(6, seed=6)
    probe = plain.generate(prompts, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    cases = []
    for o in probe:
        text, ids = o.outputs[0].text, o.outputs[0].token_ids
        cases.append(SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                                    stop=[text[len(text) // 2 : len(text) // 2 + 3]]))
        cases.append(SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True))
        cases.append(SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                                    stop_token_ids=[ids[17]]))
    many = [p for p in prompts for _ in range(3)]
    want = plain.generate(many, cases)
    spec = _spec_llm(tiny_model_dir)
    truth = {tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, probe, strict=True)}
    spec.engine.scheduler.speculator = Speculator(
        SpeculativeConfig(**CONFIG), OracleProposer(truth, p_wrong=0.0, skip_every=0)
    )
    got = spec.generate(many, cases)
    for g, w in zip(got, want, strict=True):
        gc, wc = g.outputs[0], w.outputs[0]
        assert (gc.token_ids, gc.text, gc.finish_reason, gc.stop_reason) == (
            wc.token_ids, wc.text, wc.finish_reason, wc.stop_reason)
    assert spec.engine.stats()["spec_decode_acceptance_rate"] > 0.5  # drafts ran past the ends


def test_streaming_deltas_hold_back_stop_strings(plain: LLM, tiny_model_dir) -> None:
    prompt = _prompts(1, seed=7)[0]
    probe = plain.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    text = probe[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop])
    want = plain.generate([prompt], params)[0].outputs[0]
    spec = _spec_llm(tiny_model_dir)
    truth = {tuple(prompt): probe[0].outputs[0].token_ids}
    spec.engine.scheduler.speculator = Speculator(
        SpeculativeConfig(**CONFIG), OracleProposer(truth, p_wrong=0.0, skip_every=0)
    )
    engine = spec.engine
    engine.add_request("s", prompt, params)
    deltas, ids = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.outputs[0].text)
            ids += out.outputs[0].token_ids
    assert "".join(deltas) == want.text and ids == want.token_ids
    assert not any(stop in d for d in deltas)
    assert max(len(d) for d in deltas) > 0


# ---------------------------------------------------------------------------- sampling


def test_seeded_sampling_equals_plain_and_replays(plain: LLM, tiny_model_dir) -> None:
    prompts = _prompts(4, seed=8)
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=30,
                            ignore_eos=True)
    want = plain.generate(prompts, params)
    spec = _spec_llm(tiny_model_dir)
    _with_oracle(spec, prompts, want, p_wrong=0.2)
    assert _tokens(spec.generate(prompts, params)) == _tokens(want)
    assert spec.engine.stats()["spec_decode_num_accepted_tokens"] > 0
    # replay after a worker failure: prompt + the tokens streamed so far, same seed
    first = want[0].outputs[0].token_ids
    engine = spec.engine
    engine.add_request("replay", prompts[0], params, resume_token_ids=first[:9])
    rest: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            rest += out.outputs[0].token_ids
    assert first[:9] + rest == first


class _FixedDraft(Proposer):
    """Proposes ``token`` as the second output token and nothing else."""

    def __init__(self, token: int) -> None:
        self.token = token

    def propose(self, request: Request, max_tokens: int) -> list[int]:
        return [self.token] if request.num_output_tokens == 1 else []

    def finish(self, request: Request) -> None:
        pass


def test_rejection_sampling_preserves_the_target_distribution(plain: LLM, tiny_model_dir) -> None:
    """Over many seeds, the token verified against a fixed draft d is distributed as the
    target's p (chi-square, alpha = 0.001), d is accepted with probability p(d), and each
    seed's output equals the plain engine's."""
    prompt = _prompts(1, seed=9, lo=12, hi=12)[0]
    top_k, n_seeds = 4, 600
    params = [SamplingParams(temperature=1.0, top_k=top_k, seed=s, max_tokens=3, ignore_eos=True,
                             logprobs=top_k) for s in range(n_seeds)]
    want = plain.generate([prompt] * n_seeds, params)
    firsts = Counter(o.outputs[0].token_ids[0] for o in want)
    t1 = firsts.most_common(1)[0][0]  # condition on the modal first token
    group = [i for i, o in enumerate(want) if o.outputs[0].token_ids[0] == t1]
    lp = want[group[0]].outputs[0].logprobs[1]  # raw logprobs of the top-k at position 2
    z = sum(math.exp(v.logprob) for v in lp.values())
    p = {tok: math.exp(v.logprob) / z for tok, v in lp.items()}  # temperature 1, top-k
    d = sorted(p, key=p.get, reverse=True)[1]  # a draft accepted about p(d) of the time
    spec = _spec_llm(tiny_model_dir)
    spec.engine.scheduler.speculator = Speculator(SpeculativeConfig(**CONFIG), _FixedDraft(d))
    got = spec.generate([prompt] * n_seeds, params)
    assert _tokens(got) == _tokens(want)
    seconds = Counter(got[i].outputs[0].token_ids[1] for i in group)
    n = len(group)
    chi2 = sum((seconds.get(t, 0) - n * q) ** 2 / (n * q) for t, q in p.items())
    assert sum(seconds.values()) == n and set(seconds) <= set(p)
    assert chi2 < _CHI2_999[len(p) - 1], (chi2, seconds, p)
    stats = spec.engine.stats()
    drafts = stats["spec_decode_num_drafts"]
    assert drafts == n_seeds
    rate, pd = stats["spec_decode_acceptance_rate"], _p_accept(want, d)
    assert abs(rate - pd) < 3.3 * math.sqrt(pd * (1 - pd) / drafts), (rate, pd)


_CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}
"""Chi-square critical values at alpha = 0.001 by degrees of freedom."""


def _p_accept(want, d: int) -> float:
    """Expected acceptance of d over all seeds: p(d | first token) averaged over first tokens."""
    total = 0.0
    for o in want:
        top = o.outputs[0].logprobs[1]
        zz = sum(math.exp(v.logprob) for v in top.values())
        total += math.exp(top[d].logprob) / zz if d in top else 0.0
    return total / len(want)


# ---------------------------------------------------------------------------- decode worker (1P+1D)


def test_decode_worker_speculates_and_equals_single_engine(plain: LLM, tiny_model_dir) -> None:
    from splitserve.kvtransfer.loopback import LoopbackTransport
    from splitserve.roles.engine.config import EngineConfig
    from splitserve.roles.engine.llm_engine import LLMEngine
    from tests.unit.test_disagg_engine import _drive

    prompts = _prompts(5, seed=13, lo=20, hi=90)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    want = plain.generate(prompts, params)
    prefill = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=256))
    decode = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=256,
                                    speculative_config=CONFIG))
    prefill.attach_kv_connector(LoopbackTransport(), "prefill-0", lease_ttl_s=5.0)
    decode.attach_kv_connector(LoopbackTransport(), "decode-0", lease_ttl_s=5.0)
    truth = {tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, want, strict=True)}
    decode.scheduler.speculator = Speculator(SpeculativeConfig(**CONFIG), OracleProposer(truth))
    got = _drive(prefill, decode, prompts, params)
    assert [got[f"r{i}"] for i in range(len(prompts))] == _tokens(want)
    assert decode.stats()["spec_decode_num_accepted_tokens"] > 0
    assert decode.stats()["num_remote_fallbacks"] == 0
    assert prefill.kv.pool.num_free_blocks == prefill.num_blocks
    assert decode.kv.pool.num_free_blocks == decode.num_blocks


def test_cluster_config_takes_speculation_on_decode_only() -> None:
    from splitserve.cluster.config import ClusterConfig, ClusterConfigError

    good = ClusterConfig.local(roles={"decode": {"speculative_config": CONFIG}})
    assert good.roles.decode.speculative_config["num_speculative_tokens"] == K
    with pytest.raises(ClusterConfigError, match=r"roles\.prefill\.speculative_config"):
        ClusterConfig.local(roles={"prefill": {"speculative_config": CONFIG}})
    with pytest.raises(ClusterConfigError,
                       match=r"roles\.decode\.speculative_config\.num_speculative_tokens"):
        ClusterConfig.local(roles={"decode": {"speculative_config": {
            "method": "ngram", "num_speculative_tokens": 99}}})


def test_prometheus_exports_spec_decode_metrics() -> None:
    from splitserve.cluster.frontends.backend import load_from_stats
    from splitserve.cluster.frontends.metrics import ServerMetrics

    stats = {"spec_decode_num_drafts": 10, "spec_decode_num_draft_tokens": 40,
             "spec_decode_num_accepted_tokens": 30}
    body = ServerMetrics("m").render([load_from_stats("d0", "decode", stats)]).decode()
    assert 'splitserve:spec_decode_num_draft_tokens_total{role="decode",worker="d0"} 40.0' in body
    assert 'splitserve:spec_decode_acceptance_rate{role="decode",worker="d0"} 0.75' in body
    assert 'splitserve:spec_decode_mean_accepted_length{role="decode",worker="d0"} 4.0' in body
