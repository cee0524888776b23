"""Reasoning outputs: a thinking model's ``<think>...</think>`` apart from its answer.

With ``serve --reasoning-parser qwen3`` (or ``deepseek_r1``), a chat answer's text is split into
``reasoning_content`` (the thinking, without its tags) and ``content`` (the rest, which tool-call
parsing then reads), whole or streamed, as vLLM's and SGLang's reasoning parsers do.

Where the thinking starts:

- ``qwen3``: from the rendered prompt. A prompt that ends inside an open ``<think>`` (Qwen3.5 and
  the Thinking-2507 templates put it there) starts the answer in reasoning; a prompt whose last
  think block is closed (``enable_thinking: false`` renders an empty one) or that has none starts
  it in content. Either way, an answer that itself opens with ``<think>`` (after whitespace:
  the original Qwen3 templates) thinks until ``</think>``.
- ``deepseek_r1``: always in reasoning (R1 models often omit the opening tag), as vLLM's parser.

An answer cut short inside its thinking (``max_tokens``) is all reasoning, content null. Under a
structured-output constraint (``response_format``, ``structured_outputs``, ``tool_choice``
required or named) the constraint decides: only an answer that opens with ``<think>`` (a
grammar that allows thinking first) is split; otherwise it is all content.

Splitting is one state machine fed the text in pieces (``ReasoningStream``); the whole answer
is the same machine fed once, so streamed and whole responses agree for any chunking.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.cluster.frontends.tool_parsers import partial_suffix


@dataclass(frozen=True)
class ReasoningParser:
    """The tags of a model family's thinking and where its answers start."""

    name: str
    start: str = "<think>"
    end: str = "</think>"
    always_thinks: bool = False
    """Answers start in reasoning whatever the prompt (DeepSeek R1)."""
    call_opens: tuple[str, str] | None = None
    """A tool call that also ends the thinking when the model skips the end tag: its opening
    tag and what must follow it (after whitespace). Qwen3.5 calls tools from inside its
    thinking (``<tool_call>`` then ``<function=...>``); the call is then content, for the
    tool-call parser. A bare mention of the tag while thinking is not a call."""

    def implicit_end(self, text: str) -> tuple[int, int]:
        """(where a tool call that ends the thinking starts in ``text``, or -1; how much of
        the tail must wait for more text before that can be told)."""
        if self.call_opens is None:
            return -1, 0
        tag, follow = self.call_opens
        at = text.find(tag)
        while at >= 0:
            after = text[at + len(tag):].lstrip()
            if after.startswith(follow):
                return at, 0
            if follow.startswith(after):  # whitespace or part of the follower so far
                return -1, len(text) - at
            at = text.find(tag, at + 1)
        return -1, partial_suffix(text, tag)

    def prompt_opens(self, prompt_tail: str) -> bool:
        """Whether a prompt ending with ``prompt_tail`` leaves a think block open."""
        opened = prompt_tail.rfind(self.start)
        return opened >= 0 and opened > prompt_tail.rfind(self.end)

    def stream(self, prompt_tail: str = "", constrained: bool = False) -> ReasoningStream:
        """A new answer's splitter; ``prompt_tail``: the end of its rendered prompt."""
        thinking = not constrained and (self.always_thinks or self.prompt_opens(prompt_tail))
        return ReasoningStream(self, thinking)


PARSERS: dict[str, ReasoningParser] = {
    "qwen3": ReasoningParser("qwen3", call_opens=("<tool_call>", "<function")),
    "deepseek_r1": ReasoningParser("deepseek_r1", always_thinks=True),
}

PROMPT_TAIL_TOKENS = 64
"""How many of the prompt's last tokens are decoded to find an open think block."""


def create_parser(name: str) -> ReasoningParser:
    try:
        return PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {sorted(PARSERS)}") from None


class ReasoningStream:
    """One answer's split, fed its text in pieces: ``feed`` returns what can be sent now as
    (reasoning, content); ``finish`` flushes what was held back (a partial tag)."""

    def __init__(self, parser: ReasoningParser, thinking: bool) -> None:
        self.parser = parser
        self._opening = True
        """No text decided yet: the answer may still open with the start tag."""
        self._thinking = thinking
        self._held = ""
        self.reasoning, self.content = "", ""
        self.ended = False
        """The end tag was seen (the answer's thinking is complete)."""

    @property
    def thinking(self) -> bool:
        """Whether text fed now would be reasoning."""
        return self._thinking

    def feed(self, delta: str) -> tuple[str, str]:
        text = self._held + delta
        self._held = ""
        reasoning, content = "", ""
        start, end = self.parser.start, self.parser.end
        if self._opening:
            head = text.lstrip()
            if head.startswith(start):
                text = head[len(start):]
                self._opening, self._thinking = False, True
            elif start.startswith(head):  # whitespace or a partial start tag so far
                self._held = text
                return "", ""
            else:
                self._opening = False
        if self._thinking:
            at = text.find(end)
            call, wait = self.parser.implicit_end(text if at < 0 else text[:at])
            if call >= 0:  # a tool call ends the thinking: it is the content's
                reasoning, text = text[:call], text[call:]
                self._thinking, self.ended = False, True
            elif at < 0:
                keep = max(partial_suffix(text, end), wait)
                reasoning, self._held = text[: len(text) - keep], text[len(text) - keep:]
                text = ""
            else:
                reasoning, text = text[:at], text[at + len(end):]
                self._thinking, self.ended = False, True
        content = text
        self.reasoning += reasoning
        self.content += content
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What was held back, as what it would have been: reasoning inside the thinking
        (a cut-short tag), else content."""
        held, self._held = self._held, ""
        self._opening = False
        if self._thinking:
            self.reasoning += held
            return held, ""
        self.content += held
        return "", held

    def split(self, text: str) -> tuple[str | None, str | None]:
        """A whole answer: (reasoning or None, content or None), as a response reports them."""
        self.feed(text)
        self.finish()
        thought = self.ended or self.reasoning or self._thinking
        return (self.reasoning if thought else None), (self.content or None)
