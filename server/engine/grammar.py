"""Grammar-constrained decoding on llguidance: compiling grammars for a vocabulary, and the
per-request grammar state that says which tokens may come next.

- `GrammarCompiler` (one per engine) builds llguidance's view of the vocabulary once (the bytes of
  every token id, `model/text/token_bytes.py`; ids the tokenizer lacks have no bytes and are never
  allowed) and compiles `GrammarSpec`s — a JSON schema, a regex, a list of choices, a Lark or GBNF
  grammar — into `Grammar`s, cached (LRU) by their text. Compiling checks the grammar, builds its
  lexer and computes the first mask, so an unsupported feature or a grammar too large for
  llguidance's limits fails here with a `GrammarError` naming it, before the request is admitted.
  It is called off the engine loop (the HTTP layer runs it in `executor` with a deadline).
- `Grammar.start()` gives a request its `GrammarState`: a copy of the compiled matcher (a cheap
  deep copy) that advances on every sampled token. The next token's mask is computed in the
  background as soon as the state advances (llguidance releases the GIL), so it overlaps with the
  rest of the step and the next forward pass; the logits processor (`logits_processors.GrammarMask`)
  waits for it only when it applies the mask.

JSON is generated without free whitespace (`", "` and `": "` separators): with it, a sampled model
can fill its whole budget with blanks.

Wrap-up: a request's state knows its token budget (`max_tokens`, within the context). Near the end
of it, the background computation also works out how many tokens the shortest way it knows to
complete the grammar takes (`closing_path`: a greedy rollout on a copy of the matcher that prefers
tokens which end the current string, number, array or object, and takes the tokens the grammar
forces). Once the budget left is no more than that distance plus `WRAP_UP_MARGIN`, the state is in
wrap-up for the rest of the request: its mask keeps only the next token of that path (always one
the grammar allows), so the document is complete within the budget and the request ends with
"stop". `GrammarCompiler(wrap_up=False)` (`customllm serve --no-grammar-wrap-up`) turns it off.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance as llg
import numpy as np

from model.text.token_bytes import NoByteView, token_bytes
from server.engine.grammar_closing import ROLLOUT_LIMIT, allowed, closing_path, rollout_candidates

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
GRAMMAR_KINDS = ("json_schema", "regex", "choice", "grammar", "lark")
DEFAULT_CACHE_SIZE = 256
MASK_THREADS = 2
# wrap-up: enter it when the budget left is at most the closing distance plus this many tokens (room
# for one sampled token that opens more to close, e.g. `", ` before a required key, or a new item)
WRAP_UP_MARGIN = 16
# the closing distance is recomputed on every step once the budget left is within this much of the
# last one measured (plus the margin), and every WRAP_UP_EVERY steps before that
WRAP_UP_WINDOW = 32
WRAP_UP_EVERY = 8
class GrammarError(ValueError):
    """A grammar that cannot be served: invalid, unsupported, too large, or not for this vocabulary."""


@dataclass(frozen=True)
class GrammarSpec:
    """What to constrain the output to. `kind`: json_schema (source: the schema as JSON text), regex,
    choice (a JSON list of strings), grammar (Lark or GBNF), lark (Lark in llguidance's dialect)."""

    kind: str
    source: str

    def __post_init__(self):
        assert self.kind in GRAMMAR_KINDS, self.kind


class _VocabularyView:
    """What `llguidance.TokenizerWrapper` reads: token bytes, special ids, and an encoder, which
    llguidance uses to turn text the grammar forces into tokens. The encoder must give tokens
    whose bytes are that text: the tokenizer's own encoding when it does (no special token, no
    `<unk>`, no normalizer change), else the longest-match tokenization over the byte view (as
    far as the vocabulary can spell the text)."""

    def __init__(self, tokenizer, tokens: list[bytes], special_ids, eos_id: int | None):
        self._tokenizer = tokenizer
        self.tokens = tokens
        self.special_token_ids = sorted(special_ids)
        self.eos_token_id = eos_id
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self._special = frozenset(special_ids)
        self._by_bytes: dict[bytes, int] | None = None

    def __call__(self, text) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        try:
            ids = self._tokenizer.encode(data.decode("utf-8"))
        except UnicodeDecodeError:
            ids = None
        if ids is not None and all(0 <= i < len(self.tokens) and i not in self._special for i in ids) \
                and b"".join(self.tokens[i] for i in ids) == data:
            return ids
        return self._longest_match(data)

    def _longest_match(self, data: bytes) -> list[int]:
        if self._by_bytes is None:
            by_bytes: dict[bytes, int] = {}
            for token_id, token in enumerate(self.tokens):
                if token and token_id not in self._special:
                    by_bytes.setdefault(token, token_id)
            self._by_bytes = by_bytes
        longest = max(map(len, self._by_bytes), default=0)
        ids, at = [], 0
        while at < len(data):
            for size in range(min(longest, len(data) - at), 0, -1):
                token_id = self._by_bytes.get(data[at:at + size])
                if token_id is not None:
                    ids.append(token_id)
                    at += size
                    break
            else:
                return ids              # the vocabulary cannot spell the rest
        return ids


class Grammar:
    """A compiled grammar: the matcher every request's state is copied from."""

    def __init__(self, spec: GrammarSpec, template: llg.LLMatcher, compiler: "GrammarCompiler"):
        self.spec = spec
        self._template = template
        self._compiler = compiler

    def start(self, budget: int | None = None) -> "GrammarState":
        """A new request's state; `budget`: the most tokens it may generate (None: no wrap-up)."""
        state = GrammarState(self._template.deep_copy(), self._compiler, budget)
        state.prefetch()
        return state


class GrammarState:
    """One request's position in its grammar. Call `next_mask` for the packed mask of the token to
    sample ([words] int32, bit j of word i = token 32 i + j allowed), then `advance` with it.

    The matcher is only touched on the engine thread, and never while its next mask is being
    computed in the background (llguidance holds it then): `done` and `error` are plain fields
    updated by `advance` and `next_mask`. An llguidance failure becomes `error`, never an exception
    in the engine loop.

    With a `budget` (and the compiler's `wrap_up` on), the background computation also measures the
    closing distance near the end of the budget and, once in wrap-up (`wrapping_up`), narrows the
    mask to the next token of the closing path (see the module's docstring)."""

    def __init__(self, matcher: llg.LLMatcher, compiler: "GrammarCompiler", budget: int | None = None):
        self.matcher = matcher
        self.words = compiler.mask_words
        self._executor = compiler.mask_executor
        self._compiler = compiler
        self._pending: Future | None = None
        self.done = False                   # complete: nothing may follow
        self.error: str | None = None       # a dead end (or an llguidance failure)
        self.budget = budget if compiler.wrap_up else None
        self.consumed = 0                   # tokens advanced over
        self.wrapping_up = False            # sticky: the mask follows the closing path
        self.closing_distance: int | None = None   # last measured (None: not yet, or unknown)
        self._path: list[int] = []                  # in wrap-up: the closing path from here
        self._measured_at: int | None = None        # `consumed` when it was measured

    def _compute(self) -> np.ndarray:
        mask = np.zeros(self.words, dtype=np.int32)
        self.matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        if self.budget is not None:
            self._wrap_up(mask)
        return mask

    def _due(self, left: int) -> bool:
        """Whether to measure the closing distance now, with `left` tokens of the budget left."""
        if self.wrapping_up or self._measured_at is None:
            return True
        if self.closing_distance is None:       # unknown last time: try again now and then
            return self.consumed - self._measured_at >= WRAP_UP_EVERY
        return (left <= self.closing_distance + WRAP_UP_MARGIN + WRAP_UP_WINDOW
                or self.consumed - self._measured_at >= WRAP_UP_EVERY)

    def _wrap_up(self, mask: np.ndarray) -> None:
        """Measure the closing distance when due; in wrap-up, narrow `mask` (in place) to the next
        token of the closing path. Runs where `_compute` runs (the matcher is not shared then)."""
        left = self.budget - self.consumed
        if left <= 0 or self.matcher.is_stopped() or self.matcher.is_error():
            return
        if self.wrapping_up and self._path and allowed(mask, self._path[0]):
            self._narrow(mask, self._path[:1])      # the path is followed, not recomputed (a rollout
            return                                  # restarted on every step could repeat its start)
        if not self._due(left):
            return
        path = closing_path(self.matcher, self._compiler.closers(), min(ROLLOUT_LIMIT, left))
        self.closing_distance, self._measured_at = (len(path) if path is not None else None), self.consumed
        if path is None:
            if left <= ROLLOUT_LIMIT:
                # no completion found within the tokens left: none will be later either (each token
                # shortens the shortest completion by at most one, as it shortens the budget), so
                # stop looking; the answer will be cut at max_tokens
                self.budget = None
            return
        if not self.wrapping_up and left <= len(path) + WRAP_UP_MARGIN:
            self.wrapping_up = True
        if not self.wrapping_up:
            return
        if path:
            keep, self._path = path[:1], path
        else:                                   # complete already: only the end-of-sequence ids
            keep = [t for t in self._compiler.eos_token_ids if allowed(mask, t)]
        self._narrow(mask, keep)

    @staticmethod
    def _narrow(mask: np.ndarray, keep: list[int]) -> None:
        """Keep only the tokens of `keep` that `mask` allows (in place); never empty a mask."""
        words = mask.view(np.uint32)
        narrowed = np.zeros_like(words)
        for token in keep:
            narrowed[token >> 5] |= np.uint32(1 << (token & 31)) & words[token >> 5]
        if narrowed.any():
            words[:] = narrowed

    def prefetch(self) -> None:
        """Start computing the next mask in the background."""
        if self._pending is None and not (self.done or self.error):
            try:
                self._pending = self._executor.submit(self._compute)
            except RuntimeError:            # the engine is stopping: next_mask computes it then
                self._pending = None

    def _settle(self) -> np.ndarray | None:
        """The background mask, once computed (None if none was pending)."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def next_mask(self) -> np.ndarray:
        """[words] int32: the tokens allowed next. At a dead end (no token of the vocabulary
        continues the grammar) only end-of-sequence is allowed and `error` says why."""
        try:
            mask = self._settle()
            if mask is None:
                mask = self._compute()
            if self.matcher.is_error() and self.error is None:
                self.error = f"the grammar cannot continue: {_reason(self.matcher.get_error())}"
            return mask
        except Exception as exc:  # noqa: BLE001 - an llguidance failure ends this request, not the engine
            self.error = f"the grammar failed: {exc}"
            return np.full(self.words, -1, dtype=np.int32)

    def advance(self, token: int) -> None:
        """Consume a sampled token and start on the next mask."""
        try:
            self._settle()                  # a mask still in flight (its sample may have been discarded)
            self.consumed += 1
            if self._path:                  # on the closing path, or off it (then it is recomputed)
                self._path = self._path[1:] if token == self._path[0] else []
            if not self.matcher.consume_token(token) and self.error is None:
                self.error = f"the grammar cannot continue: {_reason(self.matcher.get_error())}"
            self.done = self.matcher.is_stopped()
        except Exception as exc:  # noqa: BLE001 - see next_mask
            self.error = f"the grammar failed: {exc}"
        self.prefetch()


class GrammarCompiler:
    """Compiles `GrammarSpec`s for one vocabulary; thread-safe. `vocab_size` is the model's (the
    width of its logits), `eos_token_ids` the ids the grammar allows once it is complete."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...], cache_size: int = DEFAULT_CACHE_SIZE,
                 compile_threads: int = 2, wrap_up: bool = True):
        self.tokenizer = tokenizer
        self.wrap_up = wrap_up                  # budget-aware wrap-up of constrained requests
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(t for t in eos_token_ids if 0 <= t < vocab_size)
        self.mask_words = (vocab_size + 31) // 32
        self.cache_size = cache_size
        self.limits = llg.LLParserLimits()
        self.executor = ThreadPoolExecutor(compile_threads, thread_name_prefix="grammar-compile")
        self.mask_executor = ThreadPoolExecutor(MASK_THREADS, thread_name_prefix="grammar-mask")
        self._lock = threading.Lock()
        self._vocabulary: llg.LLTokenizer | None = None
        self._closers: list[tuple[int, int]] | None = None
        self._cache: OrderedDict[GrammarSpec, Grammar] = OrderedDict()

    def vocabulary(self) -> llg.LLTokenizer:
        """llguidance's tokenizer for this vocabulary, built on first use (GrammarError without a byte view)."""
        with self._lock:
            if self._vocabulary is None:
                try:
                    view = token_bytes(self.tokenizer)
                except NoByteView as exc:
                    raise GrammarError(f"structured outputs are not available with this tokenizer: {exc}") from None
                tokens = list(view.tokens[:self.vocab_size]) + [b""] * max(0, self.vocab_size - len(view.tokens))
                eos = self.eos_token_ids[0] if self.eos_token_ids else None
                wrapper = llg.TokenizerWrapper(_VocabularyView(self.tokenizer, tokens, view.special_ids, eos))
                self._vocabulary = llg.LLTokenizer(wrapper, eos_token=list(self.eos_token_ids) or None)
                self._closers = rollout_candidates(tokens, view.special_ids)
            return self._vocabulary

    def closers(self) -> list[tuple[int, int]]:
        """(kind, token id) pairs the closing rollout tries, in order (`rollout_candidates`)."""
        if self._closers is None:
            self.vocabulary()
        return self._closers

    def compile(self, spec: GrammarSpec) -> Grammar:
        """The compiled grammar (from the cache when the same spec was compiled before)."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        vocabulary = self.vocabulary()
        matcher = llg.LLMatcher(vocabulary, grammar_text(spec), log_level=0, limits=self.limits)
        if matcher.is_error():
            raise GrammarError(_reason(matcher.get_error()))
        first = np.frombuffer(matcher.compute_bitmask(), dtype=np.int32)
        if matcher.is_error() and "NoExtension" in matcher.get_error():
            raise GrammarError("no token of this model's vocabulary can start this grammar")
        if matcher.is_error():
            raise GrammarError(_reason(matcher.get_error()))
        if not first.any():
            raise GrammarError("no token of this model's vocabulary can start this grammar")
        grammar = Grammar(spec, matcher, self)
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.mask_executor.shutdown(wait=False, cancel_futures=True)


def grammar_text(spec: GrammarSpec) -> str:
    """llguidance's grammar definition for a spec; GrammarError when the source cannot be read."""
    try:
        if spec.kind == "json_schema":
            return llg.LLMatcher.grammar_from_json_schema(spec.source, overrides=JSON_OPTIONS)
        if spec.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec.source)
        if spec.kind == "choice":
            choices = json.loads(spec.source)
            if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
                raise GrammarError("choice must be a non-empty list of strings")
            return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        if spec.kind == "grammar":
            return llg.grammar_from("grammar", spec.source)
        return llg.LLMatcher.grammar_from_lark(spec.source)
    except GrammarError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a client's grammar text makes llguidance raise is a 400
        raise GrammarError(_reason(str(exc))) from None


def _reason(message: str, limit: int = 600) -> str:
    """llguidance's error without the parser state and grammar it appends, on one line."""
    message = message.split("<state>")[0].split("<grammar>")[0]
    if message.strip().startswith("NoExtension"):
        return "no token of this model's vocabulary continues it"
    reason = " ".join(message.split()) or "invalid grammar"
    return reason if len(reason) <= limit else reason[:limit] + "…"
