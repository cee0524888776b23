"""Reasoning parsers: where thinking starts (prompt state, an opening tag, the family's rule),
where it ends, and that a streamed answer splits exactly as the whole one, for any chunking."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.cluster.frontends.reasoning_parsers import PARSERS, create_parser

QWEN3, R1 = PARSERS["qwen3"], PARSERS["deepseek_r1"]
OPEN_PROMPT = "<|im_start|>assistant\n<think>\n"
CLOSED_PROMPT = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
PLAIN_PROMPT = "<|im_start|>assistant\n"


@pytest.mark.parametrize(
    ("parser", "prompt", "constrained", "text", "want"),
    [
        # the answer opens its own think block (original Qwen3 templates)
        (QWEN3, PLAIN_PROMPT, False, "<think>\nplan</think>\n\nAnswer", ("\nplan", "\n\nAnswer")),
        (QWEN3, PLAIN_PROMPT, False, "  \n<think>a</think>b", ("a", "b")),
        # no think block anywhere: all content, no reasoning field
        (QWEN3, PLAIN_PROMPT, False, "Just an answer", (None, "Just an answer")),
        # a tag later in the text is not thinking
        (QWEN3, PLAIN_PROMPT, False, "x <think>y</think>", (None, "x <think>y</think>")),
        # the prompt left <think> open (Qwen3.5 / Thinking-2507): reasoning until </think>
        (QWEN3, OPEN_PROMPT, False, "step 1\nstep 2</think>\n\n42", ("step 1\nstep 2", "\n\n42")),
        (QWEN3, OPEN_PROMPT, False, "<think>again</think>ok", ("again", "ok")),
        # enable_thinking false: the prompt's think block is closed
        (QWEN3, CLOSED_PROMPT, False, "Sure.", (None, "Sure.")),
        # cut short while thinking: all reasoning, content null
        (QWEN3, OPEN_PROMPT, False, "still thinking </thi", ("still thinking </thi", None)),
        (QWEN3, PLAIN_PROMPT, False, "<think>hm", ("hm", None)),
        # thinking that ends the answer: content null
        (QWEN3, PLAIN_PROMPT, False, "<think>x</think>", ("x", None)),
        (QWEN3, PLAIN_PROMPT, False, "<think></think>y", ("", "y")),
        # an answer that is only the start of a tag is content
        (QWEN3, PLAIN_PROMPT, False, "<thi", (None, "<thi")),
        (QWEN3, PLAIN_PROMPT, False, "", (None, None)),
        # DeepSeek R1 thinks from the first token, opening tag or not
        (R1, PLAIN_PROMPT, False, "reason</think>answer", ("reason", "answer")),
        (R1, PLAIN_PROMPT, False, "<think>reason</think>answer", ("reason", "answer")),
        (R1, PLAIN_PROMPT, False, "no end tag", ("no end tag", None)),
        # a constraint decides: only an answer that opens with <think> is split
        (QWEN3, OPEN_PROMPT, True, '{"a": 1}', (None, '{"a": 1}')),
        (R1, PLAIN_PROMPT, True, '{"a": 1}', (None, '{"a": 1}')),
        (QWEN3, OPEN_PROMPT, True, "<think>ab</think>cd", ("ab", "cd")),
    ],
)
def test_split(parser, prompt, constrained, text, want) -> None:
    assert parser.stream(prompt, constrained).split(text) == want


def test_prompt_state() -> None:
    assert QWEN3.prompt_opens(OPEN_PROMPT)
    assert not QWEN3.prompt_opens(CLOSED_PROMPT)
    assert not QWEN3.prompt_opens(PLAIN_PROMPT)
    # an earlier turn's closed block and a new open one
    assert QWEN3.prompt_opens("<think>a</think>b<|im_start|>assistant\n<think>")


def test_unknown_parser() -> None:
    with pytest.raises(ValueError, match="unknown reasoning parser 'nope'"):
        create_parser("nope")


def _streamed(parser, prompt, constrained, pieces):
    stream = parser.stream(prompt, constrained)
    reasoning, content = "", ""
    for piece in pieces:
        r, c = stream.feed(piece)
        reasoning, content = reasoning + r, content + c
    r, c = stream.finish()
    return reasoning + r, content + c, stream


TEXTS = st.lists(st.sampled_from(["<think>", "</think>", "<", "</", "<th", "</thi", "think>",
                                  " ", "\n", "a", "b c", "{", "}", "<tool_call>", "<tool_",
                                  "<function=f>", "<func"]), max_size=12).map("".join)


def _forms(text: str, parser) -> set[str]:
    """``text`` less what a split may drop: whitespace and an opening tag at its start, and
    one end tag."""
    heads = [text]
    if text.lstrip().startswith(parser.start):
        heads.append(text.lstrip()[len(parser.start):])
    forms = set(heads)
    for head in heads:
        at = head.find(parser.end)
        while at >= 0:
            forms.add(head[:at] + head[at + len(parser.end):])
            at = head.find(parser.end, at + 1)
    return forms


@settings(max_examples=300, deadline=None)
@given(text=TEXTS, cuts=st.lists(st.integers(0, 60), max_size=8),
       parser=st.sampled_from([QWEN3, R1]),
       prompt=st.sampled_from([OPEN_PROMPT, CLOSED_PROMPT, PLAIN_PROMPT]),
       constrained=st.booleans())
def test_streamed_equals_whole(text, cuts, parser, prompt, constrained) -> None:
    """However the text is cut into deltas, the pieces join to the whole answer's split, and
    nothing is lost: reasoning and content are the text less the tags that delimit them."""
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    reasoning, content, stream = _streamed(parser, prompt, constrained, pieces)
    whole_r, whole_c = parser.stream(prompt, constrained).split(text)
    assert (whole_r or "", whole_c or "") == (reasoning, content)
    # nothing dropped but the tags (and whitespace before an opening tag)
    assert reasoning + content in _forms(text, parser)
    if stream.ended and parser.end not in text:  # ended by a tool call: it is all content
        assert content.startswith("<tool_call>") and "<function" in content


def test_a_tool_call_ends_qwen3_thinking() -> None:
    """Qwen3.5 calls a tool from inside its thinking, without </think>: the call is content
    (for the tool-call parser), whole or streamed a character at a time; a bare mention of
    the tag while thinking is not a call; DeepSeek R1 has no such rule."""
    call = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n" \
           "</function>\n</tool_call>"
    cases = [
        (QWEN3, OPEN_PROMPT, "let me look" + call, ("let me look", call)),
        (QWEN3, OPEN_PROMPT, "a <tool_call> maybe</think>\n\nno", ("a <tool_call> maybe",
                                                                     "\n\nno")),
        (QWEN3, PLAIN_PROMPT, "<think>hm\n" + call, ("hm\n", call)),
        (QWEN3, OPEN_PROMPT, "x <tool_call>\n<func", ("x <tool_call>\n<func", None)),
        (R1, PLAIN_PROMPT, "r " + call, ("r " + call, None)),
    ]
    for parser, prompt, text, want in cases:
        assert parser.stream(prompt).split(text) == want, text
        reasoning, content, _ = _streamed(parser, prompt, False, list(text))
        assert (reasoning or None, content or None) == (want[0] or None, want[1]), text

