"""Incremental detokenization and stop strings for one request.

Owns the request's output text. New tokens are decoded in a sliding window
(prefix / read offsets, as in Hugging Face's streamers and vLLM), so each step
costs a few tokens' decoding and multi-byte characters split across tokens are
held back until complete. Stop strings are searched in the new text; a match
truncates the text, and while a request runs, the last ``max_stop_len - 1``
characters are held back from streamed deltas so a stop string never leaks.
"""

from __future__ import annotations

from splitserve.roles.models.tokenizer import Tokenizer
from splitserve.sampling_params import SamplingParams


class IncrementalDetokenizer:
    """Text of one request's output tokens, released as safe deltas."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0
        self._read_offset = 0
        self._emitted = 0

    def prime(self, token_ids: list[int]) -> None:
        """Tokens generated (and their text sent) elsewhere: decode them, emit nothing."""
        self.update(token_ids)
        self._emitted = len(self.text)

    def update(self, new_token_ids: list[int]) -> str | None:
        """Add tokens; return the stop string they completed (text is then truncated). As
        vLLM, stop strings count from the token after the first ``min_tokens``."""
        start = max(0, len(self.text) - self.params.max_stop_len + 1)
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            self._decode_next()
        if not self.params.stop_list or len(self.token_ids) <= self.params.min_tokens:
            return None
        return self._find_stop(start)

    def _decode_next(self) -> None:
        skip = self.params.skip_special_tokens
        window = self.token_ids[self._prefix_offset :]
        prefix = self.tokenizer.decode(window[: self._read_offset - self._prefix_offset], skip)
        full = self.tokenizer.decode(window, skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)

    def _find_stop(self, start: int) -> str | None:
        best: tuple[int, str] | None = None
        for stop in self.params.stop_list:
            idx = self.text.find(stop, start)
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        idx, stop = best
        self.text = self.text[: idx + len(stop) if self.params.include_stop_str_in_output else idx]
        return stop

    def take_delta(self, finished: bool) -> str:
        """Text not yet returned; while running, keep back what could start a stop string."""
        end = len(self.text)
        if not finished and self.params.stop_list:
            end = max(self._emitted, end - self.params.max_stop_len + 1)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
