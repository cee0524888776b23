"""Structured outputs in the engine: compiled grammars, one matcher per constrained request,
token bitmasks for the constrained rows only.

Owns three things, each small:

- ``check_structured`` turns a ``StructuredOutputsParams`` into an xgrammar ``Grammar`` without a
  tokenizer (invalid JSON schema, unsupported schema keywords, bad regex or EBNF: an
  ``InvalidRequestError`` naming the field). The cluster runs it before placement.
- ``GrammarCompiler`` compiles a grammar against one tokenizer's vocabulary, cached by the
  constraint's content hash (failures too), bounded by a timeout so a pathological grammar is
  refused instead of stalling the caller.
- ``StructuredOutputManager`` keeps a matcher per request id beside the sampler. A matcher
  follows the request's output tokens: whenever it is missing or behind (a new request, a
  decode worker continuing the prefill worker's first token, a replay after a worker death) it
  is rebuilt by accepting the tokens so far, so no matcher state ever crosses the wire. Each
  step it fills one bitmask row per constrained sampling row (xgrammar, in C++) and applies
  all rows to the logits in one batched torch op. A speculative verify chunk gets one row per
  draft position: the matcher walks the draft to fill them and is rolled back, so rejected
  drafts never reach it and the kept tokens are exactly those of decoding without drafts.

Must not schedule, sample or touch the KV cache. xgrammar is imported on first use: an engine
that never sees a constrained request never loads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from splitserve import env
from splitserve.errors import InvalidRequestError
from splitserve.roles.engine.grammar_probe import GrammarProbe, ProbeRefused, ProbeUnavailable
from splitserve.sampling_params import SamplingParams, StructuredOutputsParams

if TYPE_CHECKING:
    from splitserve.roles.engine.request import Request

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

UNSUPPORTED_SCHEMA_KEYWORDS = frozenset({
    "not", "if", "then", "else", "dependentSchemas", "dependentRequired", "dependencies",
    "uniqueItems", "contains", "minContains", "maxContains", "multipleOf", "minProperties",
    "maxProperties", "propertyNames", "unevaluatedProperties", "unevaluatedItems",
})
"""JSON schema keywords xgrammar would silently ignore: refused rather than not enforced."""

_SUBSCHEMA_KEYS = (
    "properties", "$defs", "definitions", "patternProperties",
)
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "additionalItems")


# ---------------------------------------------------------------------- validation


def check_structured(so: StructuredOutputsParams) -> Any:
    """The constraint as an xgrammar ``Grammar`` (tokenizer-free); raises InvalidRequestError."""
    import xgrammar as xgr

    try:
        if so.kind == "json":
            schema = so.schema
            _check_schema(schema, so.field)
            return xgr.Grammar.from_json_schema(
                so.spec, any_whitespace=not so.disable_any_whitespace, strict_mode=True
            )
        if so.kind == "json_object":
            return xgr.Grammar.from_json_schema(
                '{"type": "object"}', any_whitespace=not so.disable_any_whitespace
            )
        if so.kind == "regex":
            return xgr.Grammar.from_regex(str(so.regex))
        if so.kind == "choice":
            return xgr.Grammar.from_ebnf(_choice_ebnf(tuple(so.choice or ())))
        if so.kind == "structural_tag":
            return _structural_tag(so.tag, so.field)
        return xgr.Grammar.from_ebnf(str(so.grammar))
    except InvalidRequestError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError with the parser's message
        raise InvalidRequestError(f"invalid {so.field}: {_clean(e)}", field=so.field) from e


def _structural_tag(tag: dict[str, Any], field: str) -> Any:
    """xgrammar's grammar of a structural tag: the ``format`` form as it is (xgrammar checks
    it), the older ``structures`` / ``triggers`` form through its legacy call (each schema
    checked as a json constraint's, its errors naming ``field.structures.N.schema``)."""
    import warnings

    import xgrammar as xgr

    if "format" in tag:
        _check_tag_schemas(tag["format"], field, "format")
        return xgr.Grammar.from_structural_tag({"type": "structural_tag", **tag})
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if not isinstance(structures, list) or not structures or not isinstance(triggers, list) \
            or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise InvalidRequestError(f"{field} needs a non-empty structures list and a non-empty "
                                  "list of trigger strings", field=field)
    items = []
    for i, s in enumerate(structures):
        where = f"{field}.structures.{i}"
        if not isinstance(s, dict) or not all(isinstance(s.get(k), str) for k in ("begin", "end")):
            raise InvalidRequestError(f"{where} needs begin and end strings and a schema",
                                      field=where)
        _check_schema(s.get("schema"), f"{where}.schema")
        if not any(s["begin"].startswith(t) for t in triggers):
            raise InvalidRequestError(f"{where}.begin must start with one of the triggers",
                                      field=f"{where}.begin")
        items.append(xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]),
                                           end=s["end"]))
    with warnings.catch_warnings():  # the legacy call is deprecated, not gone
        warnings.simplefilter("ignore", DeprecationWarning)
        return xgr.Grammar.from_structural_tag(items, triggers)


def _check_tag_schemas(node: Any, field: str, path: str) -> None:
    """Every ``{"type": "json_schema", "json_schema": ...}`` inside a structural tag's format,
    checked as a json constraint's schema (xgrammar would ignore keywords it cannot enforce)."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            _check_tag_schemas(item, field, f"{path}.{i}")
    elif isinstance(node, dict):
        if node.get("type") == "json_schema" and "json_schema" in node:
            _check_schema(node["json_schema"], f"{field}.{path}.json_schema")
        for key, value in node.items():
            if key != "json_schema":
                _check_tag_schemas(value, field, f"{path}.{key}")


def _check_schema(schema: Any, field: str) -> None:
    """A valid JSON schema (draft 2020-12 meta-schema) that uses only enforced keywords."""
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise InvalidRequestError(
            f"{field} is not a valid JSON schema at {where}: {e.message}", field=field
        ) from e
    _check_keywords(schema, field, "#")


def _check_keywords(node: Any, field: str, path: str) -> None:
    if not isinstance(node, dict):
        return
    bad = sorted(UNSUPPORTED_SCHEMA_KEYWORDS.intersection(node))
    if bad:
        raise InvalidRequestError(
            f"{field}: unsupported JSON schema keyword(s) {bad} at {path} (the grammar "
            "engine cannot enforce them)", field=field,
        )
    for key in _SUBSCHEMA_KEYS:
        for name, sub in (node.get(key) or {}).items() if isinstance(node.get(key), dict) else ():
            _check_keywords(sub, field, f"{path}/{key}/{name}")
    for key in _SUBSCHEMA_LISTS:
        for i, sub in enumerate(node.get(key) or []) if isinstance(node.get(key), list) else ():
            _check_keywords(sub, field, f"{path}/{key}/{i}")
    for key in _SUBSCHEMA_ONE:
        _check_keywords(node.get(key), field, f"{path}/{key}")


def _choice_ebnf(choices: Sequence[str]) -> str:
    """An EBNF grammar whose language is exactly ``choices`` (JSON string escapes)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _clean(e: BaseException) -> str:
    """xgrammar's message without its C++ source location prefix."""
    text = str(e).strip()
    if text.startswith("[") and ": " in text:
        text = text.split(": ", 1)[1]
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------- compiling


class GrammarCompiler:
    """Grammars compiled against one tokenizer, cached by content hash, with a timeout.

    Thread-safe. A compile runs on a worker thread. A child process (``grammar_probe``)
    compiles each new grammar first: one that takes longer than ``timeout_s`` (default
    ``SPLITSERVE_GRAMMAR_COMPILE_TIMEOUT_S``) or grows the child by more than
    ``max_memory_mb`` (``SPLITSERVE_GRAMMAR_COMPILE_MAX_MEMORY_MB``) is stopped there, the child
    killed, and the refusal cached; only a grammar the child compiled in time is compiled
    here, which it has shown to be bounded. The caller waits for both (the probe's budget
    twice, plus a second, and up to ``PROBE_START_ALLOWANCE_S`` more for a compile already
    running: a child's start is not part of the budget); a compile still queued when its
    caller gives up is cancelled and forgotten. A killed child's replacement starts at once.
    Where no child can be started, compiles run here unprobed (logged).
    """

    def __init__(
        self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: list[int],
        max_cached: int = 256, timeout_s: float | None = None,
        max_memory_mb: int | None = None, share_probes: bool = False,
    ) -> None:
        import xgrammar as xgr

        self.vocab_size = vocab_size
        self.timeout_s = timeout_s
        self.max_memory_mb = max_memory_mb
        info = xgr.TokenizerInfo.from_huggingface(
            hf_tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids) or None
        )
        self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")
        # one probe per compile thread; the first starts loading now (xgrammar and torch take
        # seconds to import), the second when two compiles first run at once
        self._owns_probes = not share_probes
        self.probes, self._free_probes = (
            _shared_probes if share_probes else _new_probes)(info.serialize_json())
        self.num_refused = 0
        self._cache: OrderedDict[str, Future[Any]] = OrderedDict()
        self._max_cached = max_cached
        self._lock = threading.Lock()
        self.num_compiles = 0
        self.num_cache_hits = 0

    def _timeout(self) -> float:
        return self.timeout_s if self.timeout_s is not None else (
            env.SPLITSERVE_GRAMMAR_COMPILE_TIMEOUT_S.get()
        )

    def compile(self, so: StructuredOutputsParams) -> Any:
        """The ``CompiledGrammar`` of ``so``; raises InvalidRequestError (bad, too slow or too
        large to compile)."""
        future = self._future(so)
        timeout = self._timeout()
        try:  # the probe's budget, then the compile here
            return future.result(timeout=2 * timeout + 1.0)
        except FutureTimeout:
            # Still queued behind other compiles: it will not run for nobody (a queue of
            # refused constraints would each take a core for their whole compile later).
            if future.cancel():
                with self._lock:
                    if self._cache.get(so.content_hash) is future:
                        del self._cache[so.content_hash]
            else:
                # Running, so bounded by its probe; what ran over was a probe child's start
                # (not part of a grammar's budget) or this machine's load: wait it out.
                try:
                    return future.result(timeout=PROBE_START_ALLOWANCE_S)
                except FutureTimeout:
                    pass  # it finishes and stays cached
        except CancelledError:
            pass
        raise InvalidRequestError(
            f"{so.field}: the grammar did not compile within {timeout:g} s; simplify it",
            field=so.field,
        ) from None

    def _future(self, so: StructuredOutputsParams) -> Future[Any]:
        key = so.content_hash
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
                return future
            future = self._pool.submit(self._compile, so)
            self._cache[key] = future
            self.num_compiles += 1
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
            return future

    def _compile(self, so: StructuredOutputsParams) -> Any:
        grammar = check_structured(so)  # a bad constraint fails here, before any probe
        self._probe(so, grammar.serialize_json())
        return self._compiler.compile_grammar(grammar)

    def _probe(self, so: StructuredOutputsParams, grammar_json: str) -> None:
        """Compile ``so``'s grammar in a child first; raises InvalidRequestError when that is
        stopped."""
        timeout = self._timeout()
        mb = (self.max_memory_mb if self.max_memory_mb is not None
              else env.SPLITSERVE_GRAMMAR_COMPILE_MAX_MEMORY_MB.get())
        probe = self._free_probes.get()
        try:
            probe.probe(grammar_json, timeout, mb << 20)
        except ProbeRefused as e:
            self.num_refused += 1
            _start(probe)  # its replacement loads while nobody waits for it
            if e.reason == "memory":
                raise InvalidRequestError(
                    f"{so.field}: compiling the grammar needed more than {mb} MiB; simplify it",
                    field=so.field,
                ) from None
            raise InvalidRequestError(
                f"{so.field}: the grammar did not compile within {timeout:g} s; simplify it",
                field=so.field,
            ) from None
        except ProbeUnavailable as e:
            logger.warning("%s; compiling this grammar without a time or memory bound", e)
        finally:
            self._free_probes.put(probe)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._owns_probes:  # shared ones serve other compilers; they exit with the process
            for probe in self.probes:
                probe.close()


PROBE_START_ALLOWANCE_S = 30.0
"""How much longer a caller waits for a compile that is running past its budget: a probe
child's start (it imports xgrammar and torch: ~2 s on a quiet 2-core machine) is not part of
a grammar's budget."""


def _new_probes(info_json: str) -> tuple[list[GrammarProbe], queue.LifoQueue[GrammarProbe]]:
    """Two probes (one per compile thread) and their free list; the first starts loading now
    (xgrammar and torch take seconds to import), the second when two compiles first run at
    once."""
    probes = [GrammarProbe(info_json, 2) for _ in range(2)]
    free: queue.LifoQueue[GrammarProbe] = queue.LifoQueue()
    for p in reversed(probes):  # last in, first out: the started one is reused
        free.put(p)
    _start(probes[0])
    return probes, free


def _start(probe: GrammarProbe) -> None:
    """Start ``probe``'s child in the background (a failure is logged; its next compile then
    runs unprobed)."""
    try:
        probe.start()
    except ProbeUnavailable as e:
        logger.warning("%s", e)


_SHARED: dict[str, tuple[list[GrammarProbe], queue.LifoQueue[GrammarProbe]]] = {}
_SHARED_LOCK = threading.Lock()


def _shared_probes(info_json: str) -> tuple[list[GrammarProbe], queue.LifoQueue[GrammarProbe]]:
    """The probes of every compiler of this process with the same vocabulary: a process that
    builds several engines of one model (tests, a cluster's frontend beside a colocated
    engine) starts two children, not two per engine."""
    key = hashlib.sha256(info_json.encode()).hexdigest()
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = _new_probes(info_json)
        return _SHARED[key]


def compiler_for(tokenizer: Any, vocab_size: int) -> GrammarCompiler:
    """A compiler for one of our ``Tokenizer`` wrappers (its HF tokenizer and EOS ids), its
    probe children shared with the process's other compilers of the same vocabulary."""
    return GrammarCompiler(tokenizer.hf, vocab_size, sorted(tokenizer.eos_token_ids),
                           share_probes=True)


# ---------------------------------------------------------------------- matchers


class _Gate:
    """Where a thinking model's constraint starts (``think_end`` set): the output is free
    while the model thinks and constrained from the token after the end tag.

    States: ``maybe`` (the first output token: the constraint's tokens or the start tag's
    first token), ``opening`` (the start tag's other tokens, forced), ``thinking`` (free, until
    the end tag shows in the text of the last few tokens) and ``content`` (constrained). The
    state is a function of the output tokens alone, so a matcher rebuilt after a hand-off or
    a replay finds the same point.
    """

    def __init__(self, tokenizer: Any, so: StructuredOutputsParams) -> None:
        self._tokenizer = tokenizer
        self.start_ids: list[int] = (list(tokenizer.encode(so.think_start, add_special_tokens=False))
                                     if so.think_start else [])
        assert so.think_end is not None
        self.end = so.think_end
        self._window = len(tokenizer.encode(so.think_end, add_special_tokens=False)) + 2
        self.state = "thinking" if so.thinking else ("maybe" if self.start_ids else "content")
        self.opened = 0
        self.recent: list[int] = []

    def copy(self) -> _Gate:
        other = object.__new__(_Gate)
        other.__dict__.update(self.__dict__, recent=list(self.recent))
        return other

    def advance(self, token: int) -> bool:
        """Take the next output token; whether it is the constraint's (its matcher's)."""
        if self.state == "maybe":
            if token != self.start_ids[0]:
                self.state = "content"
                return True
            self.opened = 1
            self.state = "opening" if len(self.start_ids) > 1 else "thinking"
        elif self.state == "opening":
            self.opened += 1
            if self.opened >= len(self.start_ids):
                self.state = "thinking"
        elif self.state == "thinking":
            self.recent = [*self.recent[-(self._window - 1):], token]
            if self.end in self._tokenizer.decode(self.recent, skip_special_tokens=False):
                self.state = "content"
        else:
            return True
        return False

    def fill(self, matcher: Any, bitmask: Tensor, row: int) -> None:
        """The row of a position before the constraint starts."""
        if self.state == "thinking":
            bitmask[row].fill_(-1)
        elif self.state == "opening":
            _only(bitmask[row], [self.start_ids[self.opened]])
        else:  # maybe: the constraint's first tokens, or the start tag's first
            matcher.fill_next_token_bitmask(bitmask, row)
            word, bit = divmod(self.start_ids[0], 32)
            bitmask[row, word] |= _bit(bit)


@dataclass
class _Slot:
    """One constrained request: its compiled grammar and (once built) its matcher."""

    compiled: Any
    matcher: Any = None
    num_accepted: int = 0
    """Output tokens the matcher has consumed."""
    gate: _Gate | None = None
    """A thinking model's: the output before the constraint starts."""
    gate_pos: int = 0
    """Output tokens the gate has taken."""
    content_start: int = 0
    """The output index from which the matcher consumes tokens."""
    broken: bool = False
    """A token the grammar refused was accepted anyway (cannot happen unless tokens were
    produced without the constraint); only stop tokens are allowed from then on."""


class StructuredOutputManager:
    """Per-request matchers and the batched bitmask of the constrained sampling rows."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._compiler: GrammarCompiler | None = None
        self._compiler_lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self._stop_ids = sorted(tokenizer.eos_token_ids)
        self.mask_seconds = 0.0
        """Time spent filling and applying bitmasks (for the benchmark's per-token cost)."""
        self.num_masked_rows = 0
        self.num_matcher_builds = 0

    @property
    def compiler(self) -> GrammarCompiler:
        """Built on first use (thread-safe: the async engine compiles off the engine thread)."""
        with self._compiler_lock:
            if self._compiler is None:
                self._compiler = compiler_for(self._tokenizer, self.vocab_size)
            return self._compiler

    def compile(self, params: SamplingParams) -> Any:
        """The compiled grammar of a request's constraint (None when unconstrained)."""
        so = params.structured_outputs
        if so is None:
            return None
        assert isinstance(so, StructuredOutputsParams)
        return self.compiler.compile(so)

    def add(self, request_id: str, compiled: Any, params: SamplingParams | None = None) -> None:
        if compiled is None:
            return
        so = params.structured_outputs if params is not None else None
        gate = None
        if isinstance(so, StructuredOutputsParams) and so.think_end is not None:
            gate = _Gate(self._tokenizer, so)
        self._slots[request_id] = _Slot(compiled, gate=gate)

    def release(self, request_id: str) -> None:
        """Forget a finished, aborted or handed-off request's matcher."""
        self._slots.pop(request_id, None)

    @property
    def num_active(self) -> int:
        return len(self._slots)

    def request_ids(self) -> set[str]:
        """Requests holding a grammar slot (``check_integrity``: each must be live)."""
        return set(self._slots)

    # -------------------------------------------------------------- per step

    def apply(self, logits: Tensor, rows: list[tuple[Request, list[int]]]) -> None:
        """Mask, in place, the logits rows of constrained requests. logits: [N, V] float.

        ``rows``: per sampling request, in logits-row order, the request and its draft tokens;
        it owns ``1 + len(draft)`` consecutive rows (a verify chunk), row ``j`` sampling the
        position after ``draft[:j]``.
        """
        index: list[int] = []
        constrained: list[tuple[Request, list[int]]] = []
        offset = 0
        for req, draft in rows:
            if req.request_id in self._slots:
                index.extend(range(offset, offset + 1 + len(draft)))
                constrained.append((req, draft))
            offset += 1 + len(draft)
        if not constrained:
            return
        start = time.perf_counter()
        bitmask = self._fill(constrained, len(index))  # [R, ceil(V / 32)] int32
        where = torch.tensor(index, dtype=torch.long, device=logits.device)
        apply_bitmask(logits, bitmask.to(logits.device), where)
        self.mask_seconds += time.perf_counter() - start
        self.num_masked_rows += len(index)

    def _fill(self, constrained: list[tuple[Request, list[int]]], num_rows: int) -> Tensor:
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(num_rows, self.vocab_size)
        row = 0
        for req, draft in constrained:
            self._fill_chunk(bitmask, row, self._sync(req), draft)
            row += 1 + len(draft)
        return bitmask

    def _fill_chunk(self, bitmask: Tensor, row: int, slot: _Slot, draft: list[int]) -> None:
        """Rows ``row .. row + len(draft)``: the grammar's mask after each prefix of the draft.

        The matcher walks the draft and is rolled back afterwards (the tokens the request
        keeps are accepted by ``_sync`` next step). Rows after a draft token the grammar
        refuses only allow stop tokens: that draft token is rejected for sure (its own row
        is masked), so the rows after it are never kept.
        """
        matcher, walked, valid = slot.matcher, 0, True
        gate = slot.gate.copy() if slot.gate is not None and slot.gate.state != "content" \
            else None
        for j in range(len(draft) + 1):
            if gate is not None and gate.state != "content":
                gate.fill(matcher, bitmask, row + j)
                if j < len(draft) and gate.advance(draft[j]):  # the constraint's first token
                    valid = matcher.accept_token(draft[j])
                    walked += valid
                continue
            if not valid or slot.broken or matcher.is_terminated():
                _only(bitmask[row + j], self._stop_ids)
            else:
                matcher.fill_next_token_bitmask(bitmask, row + j)
            if j < len(draft) and valid and not slot.broken and not matcher.is_terminated():
                valid = matcher.accept_token(draft[j])
                walked += valid
        if walked:
            matcher.rollback(walked)

    def _sync(self, req: Request) -> _Slot:
        """The request's matcher, advanced over every output token it has not consumed yet."""
        import xgrammar as xgr

        slot = self._slots[req.request_id]
        if slot.matcher is None:
            slot.matcher = xgr.GrammarMatcher(slot.compiled)  # rollback: always unlimited
            slot.num_accepted = 0
            self.num_matcher_builds += 1
        gate = slot.gate
        if gate is not None and gate.state != "content":
            output = req.all_token_ids[req.num_prompt_tokens:]
            while slot.gate_pos < len(output) and gate.state != "content":
                slot.gate_pos += 1
                if gate.advance(output[slot.gate_pos - 1]):
                    slot.gate_pos -= 1  # the constraint's own first token: the matcher's
                slot.content_start = slot.gate_pos
            if gate.state != "content":
                return slot
        start = req.num_prompt_tokens + slot.content_start + slot.num_accepted
        for token in req.all_token_ids[start:]:
            if not slot.broken and not slot.matcher.is_terminated():
                if not slot.matcher.accept_token(token):
                    logger.warning("%s: token %d refused by its grammar", req.request_id, token)
                    slot.broken = True
            slot.num_accepted += 1
        return slot

    def stats(self) -> dict[str, float]:
        compiler = self._compiler
        return {
            "num_grammar_matchers": self.num_active,
            "grammar_compiles": compiler.num_compiles if compiler else 0,
            "grammar_cache_hits": compiler.num_cache_hits if compiler else 0,
            "grammar_mask_seconds": self.mask_seconds,
            "grammar_masked_rows": self.num_masked_rows,
        }


def _only(row: Tensor, token_ids: list[int]) -> None:
    """Set a bitmask row to allow exactly ``token_ids``. row: [ceil(V / 32)] int32."""
    row.zero_()
    for t in token_ids:
        word, bit = divmod(t, 32)
        if word < row.shape[0]:
            row[word] |= _bit(bit)


def _bit(bit: int) -> int:
    """Bit ``bit`` of an int32 word, as a signed value (bit 31 is the sign)."""
    return (1 << bit) - (1 << 32) if bit == 31 else 1 << bit


_SHIFTS: dict[torch.device, Tensor] = {}
_XGR_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def apply_bitmask(logits: Tensor, bitmask: Tensor, index: Tensor) -> None:
    """logits[index[r], v] = -inf where bit v of bitmask[r] is 0, for all rows r at once.

    logits: [N, V] float; bitmask: [R, ceil(V / 32)] int32; index: [R] long. Vocabulary
    entries past the bitmask's width (padding) are masked too. xgrammar's kernel (C++ on the
    CPU, CUDA / Triton on a GPU) does it in one pass over the rows; the torch form below is
    the fallback (other dtypes, a bitmask narrower than the vocabulary) and the reference.
    """
    vocab = logits.shape[-1]
    if logits.dtype in _XGR_DTYPES and vocab <= 32 * bitmask.shape[1] and logits.is_contiguous():
        import xgrammar as xgr

        rows = index.tolist()  # xgrammar pairs logits row i with bitmask row i
        full = bitmask.new_full((logits.shape[0], bitmask.shape[1]), -1)  # [N, W]: all allowed
        full[index.to(bitmask.device)] = bitmask
        xgr.apply_token_bitmask_inplace(logits, full, vocab_size=vocab, indices=rows)
        return
    apply_bitmask_torch(logits, bitmask, index)


def apply_bitmask_torch(logits: Tensor, bitmask: Tensor, index: Tensor) -> None:
    """``apply_bitmask`` in plain torch ops (bits unpacked to a [R, 32 * W] bool mask)."""
    shifts = _SHIFTS.get(bitmask.device)
    if shifts is None:
        shifts = _SHIFTS[bitmask.device] = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    vocab = logits.shape[-1]
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1).bool()  # [R, 32 * W]
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    rows = logits.index_select(0, index).masked_fill_(~allowed[:, :vocab], float("-inf"))
    logits.index_copy_(0, index, rows)
