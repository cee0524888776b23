"""SmolLM2 through splitserve equals Hugging Face transformers token for token (the fp32
reference, ``quantization="none"``, greedy); both formats are batch invariant."""

from __future__ import annotations

import pytest
import torch

from splitserve import SamplingParams

NEW_TOKENS = 32

_LONG = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based inks and a screw press adapted from "
    "wine making. Before this, books in Europe were copied by hand, mostly in monasteries, "
    "and a single Bible could take a scribe more than a year. Woodblock printing had existed "
    "in East Asia for centuries, and movable type made of ceramic and later metal had been "
    "developed in China and Korea, but the large number of characters in those scripts "
    "limited its spread. The Latin alphabet, with its small set of letters, suited movable "
    "type far better. Within fifty years of Gutenberg's first Bible, presses were operating "
    "in more than two hundred cities, and millions of books had been printed. Prices fell, "
    "literacy rose, and ideas travelled faster than ever before. Scholars could compare "
    "identical copies of texts, which helped the growth of science, while religious reformers "
    "used pamphlets to reach ordinary people. Governments and churches soon tried to control "
    "what was printed, introducing licences and lists of forbidden books, yet the flood of "
    "print proved impossible to stop. Newspapers appeared in the seventeenth century, and by "
    "the nineteenth century steam-powered presses could produce thousands of pages an hour. "
    "Later came rotary presses, linotype machines that cast whole lines of type at once, and "
    "offset lithography, which transferred ink from a plate to a rubber blanket and then to "
    "paper, allowing cheap colour printing on an industrial scale for magazines and posters. "
)

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    _LONG + "In summary, the most important consequence of the printing press was",
]
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Explain in two sentences what a hash function is.",
    _LONG + "\n\nSummarize the text above in three bullet points.",
]


def _hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy decoding with Hugging Face's forward and its KV cache (EOS does not stop it)."""
    ids = torch.tensor([prompt_ids])
    out = model(input_ids=ids, use_cache=True)
    past, tokens = out.past_key_values, []
    for _ in range(n):
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return tokens


@pytest.fixture(scope="module")
def hf_model():
    from splitserve.roles.models.loader import default_model_path
    from tests.utils import hf_model_from_gguf

    return hf_model_from_gguf(default_model_path())


def test_greedy_matches_transformers(smollm_reference, hf_model) -> None:
    smollm = smollm_reference
    tok = smollm.get_tokenizer()
    prompts = [tok.encode(p) for p in RAW_PROMPTS]
    prompts += [tok.apply_chat_template([{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    assert max(len(p) for p in prompts) > 300 and min(len(p) for p in prompts) < 10
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = smollm.generate(prompts, params)
    with torch.inference_mode():
        expected = [_hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]
    for prompt, out, exp in zip(prompts, outputs, expected, strict=True):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == exp, tok.decode(prompt)[-80:]


@pytest.mark.parametrize("engine", ["smollm_reference", "smollm"])
def test_chat_answer_text(engine: str, request: pytest.FixtureRequest) -> None:
    smollm = request.getfixturevalue(engine)
    out = smollm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.0, max_tokens=32),
    )[0].outputs[0]
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason == "stop"


@pytest.mark.parametrize("engine", ["smollm_reference", "smollm"])
def test_batch_invariance_smollm(engine: str, request: pytest.FixtureRequest) -> None:
    """A prompt's greedy tokens are the same alone and in a batch of 16 (5-260 tokens), for
    the fp32 reference and for the default format (int4 codes through the native kernel)."""
    smollm = request.getfixturevalue(engine)
    tok = smollm.get_tokenizer()
    base = tok.encode(_LONG)
    prompts = [base[i * 7 : i * 7 + 5 + i * 17] for i in range(16)]  # 5 to 260 tokens
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in smollm.generate(prompts, params)]
    alone = [smollm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert together == alone
