"""vLLM's chat options: ``chat_template_kwargs`` reach the template as variables (a Qwen3-style
``enable_thinking`` switch), ``continue_final_message`` ends the prompt inside the assistant's
last message, and a template's own refusal or a reserved name is a 400 naming the field."""

from __future__ import annotations

import copy

import pytest

from splitserve.cluster.frontends.prompts import chat_prompt_ids
from splitserve.errors import InvalidRequestError
from splitserve.roles.models.loader import load_tokenizer
from splitserve.roles.models.tokenizer import Tokenizer

QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)
STRICT = ("{%- for m in messages %}{%- if m.role == 'system' and not loop.first %}"
          "{{ raise_exception('a system message must come first') }}{%- endif %}"
          "{{ m.role }}: {{ m.content }}\n{%- endfor %}")

CHAT = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(None)[2]


def _with_template(tok: Tokenizer, template: str) -> Tokenizer:
    other = copy.copy(tok)
    other.hf = copy.copy(tok.hf)
    other.hf.chat_template = template
    return other


def test_template_kwargs_are_template_variables(tok: Tokenizer) -> None:
    qwen = _with_template(tok, QWEN3_LIKE)
    thinking = qwen.decode(chat_prompt_ids(qwen, CHAT), skip_special_tokens=False)
    quiet = qwen.decode(chat_prompt_ids(qwen, CHAT, template_kwargs={"enable_thinking": False}),
                        skip_special_tokens=False)
    assert thinking.endswith("<|im_start|>assistant\n")
    assert quiet == thinking + "<think>\n\n</think>\n\n"


def test_continue_final_message_ends_inside_it(tok: Tokenizer) -> None:
    msgs = [*CHAT, {"role": "assistant", "content": "The answer is"}]
    text = tok.decode(chat_prompt_ids(tok, msgs, add_generation_prompt=False,
                                      continue_final_message=True), skip_special_tokens=False)
    closed = tok.decode(chat_prompt_ids(tok, msgs, add_generation_prompt=False),
                        skip_special_tokens=False)
    assert text.endswith("The answer is")
    assert closed.startswith(text) and len(closed) > len(text)  # the turn was closed there
    with pytest.raises(InvalidRequestError) as e:
        chat_prompt_ids(tok, msgs, add_generation_prompt=True, continue_final_message=True)
    assert e.value.field == "continue_final_message"
    with pytest.raises(InvalidRequestError) as e:
        chat_prompt_ids(tok, CHAT, add_generation_prompt=False, continue_final_message=True)
    assert e.value.field == "continue_final_message"


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"tools": []}, "chat_template_kwargs.tools"),
    ({"add_generation_prompt": False}, "chat_template_kwargs.add_generation_prompt"),
    ({"tokenize": False}, "chat_template_kwargs.tokenize"),
    ({"not a name": 1}, "chat_template_kwargs.not a name"),
    ({f"k{i}": i for i in range(65)}, "chat_template_kwargs"),
])
def test_reserved_or_bad_names_are_refused(tok: Tokenizer, kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        chat_prompt_ids(tok, CHAT, template_kwargs=kwargs)
    assert e.value.field == field


def test_a_templates_refusal_is_a_bad_request(tok: Tokenizer) -> None:
    strict = _with_template(tok, STRICT)
    assert chat_prompt_ids(strict, [{"role": "system", "content": "x"}, *CHAT])
    with pytest.raises(InvalidRequestError, match="a system message must come first") as e:
        chat_prompt_ids(strict, [*CHAT, {"role": "system", "content": "x"}])
    assert e.value.field == "messages"
