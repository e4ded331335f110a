"""(tokenizer, constraint) -> a compiled grammar, cached, compiled on worker threads off the step loop.

The API faces (HTTP, gRPC) call `compile()` before a request is queued: the first request with a constraint
waits for its own compile (on a worker thread; llguidance drops the GIL while it builds), later ones reuse
the cached result, and requests without a constraint never wait. A compile that fails, or takes longer
than `timeout_s`, is an InvalidRequest (ConstraintError) naming the problem; failures are cached too, so a
hostile constraint sent again costs a dictionary lookup. llguidance bounds its own work (grammar size,
lexer states, fuel per mask step), so a constraint that compiles cannot stall a later step either.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import llguidance
import llguidance.hf
import llguidance.torch

from server.structured.constraint import Constraint, ConstraintError, Kind, short
from server.structured.state import GrammarState

COMPILE_TIMEOUT_S = 10.0
CACHE_SIZE = 512
COMPILE_WORKERS = 2
MAX_GRAMMAR_SYMBOLS = 200_000  # llguidance's grammar size limit (its default is 500k)
MAX_LEXER_STATES = 100_000
# JSON as json.dumps writes it (", " and ": ", no other whitespace): models emit it, and a model cannot pad
# its output with endless whitespace (llguidance's default lets it); a schema may override it in x-guidance
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True, slots=True)
class CompiledConstraint:
    """A compiled constraint: its matcher at the start of the output, copied for each sequence."""

    constraint: Constraint
    template: object  # llguidance.LLMatcher in its initial state (first mask computed: no error)
    vocab: int  # tokens its bitmask covers

    def new_state(self) -> GrammarState:
        return GrammarState(self.template.deep_copy(), self.vocab)


def _limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(max_grammar_size=MAX_GRAMMAR_SYMBOLS, max_lexer_states=MAX_LEXER_STATES,
                                     verbose_errors=False)


def grammar_text(c: Constraint) -> str:
    """llguidance's grammar for a constraint (raises ConstraintError for a grammar it cannot even read)."""
    kind = {Kind.REGEX: "regex", Kind.CHOICE: "choice", Kind.GRAMMAR: "grammar"}.get(c.kind)
    try:
        if kind is None:  # a JSON schema or any JSON object
            return llguidance.LLMatcher.grammar_from_json_schema(c.spec, defaults=JSON_OPTIONS)
        return llguidance.grammar_from(kind, c.spec)
    except Exception as exc:  # noqa: BLE001 - llguidance raises ValueError (and others) for unreadable input
        raise ConstraintError(f"invalid {c.kind}: {short(str(exc))}", c.param) from None


class GrammarCompiler:
    """Compiles and caches constraints for one tokenizer (thread-safe)."""

    def __init__(self, tokenizer, vocab_size: int, *, timeout_s: float = COMPILE_TIMEOUT_S,
                 cache_size: int = CACHE_SIZE, workers: int = COMPILE_WORKERS) -> None:
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's; masks cover max(this, the tokenizer's)
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        self._cache: OrderedDict[Constraint, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._tok: llguidance.LLTokenizer | None = None
        self._tok_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grammar-compile")
        self.compiles = 0  # compiles run (cache misses), for tests and benchmarks

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the tokenizer (built once, ~0.3 s for a 49k vocabulary)."""
        with self._tok_lock:
            if self._tok is None:
                n_vocab = max(self.vocab_size, len(self.hf_tokenizer))
                self._tok = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=n_vocab)
            return self._tok

    def compile(self, constraint: Constraint, timeout_s: float | None = None) -> CompiledConstraint:
        """The compiled constraint, from the cache or compiled now on a worker thread (blocks the caller only)."""
        future = self.submit(constraint)
        try:
            return future.result(timeout=self.timeout_s if timeout_s is None else timeout_s)
        except ConstraintError as exc:  # maybe cached from a request that named another field
            raise ConstraintError(str(exc), constraint.param) from None
        except FutureTimeout:
            raise self._timed_out(constraint, future) from None

    async def compile_async(self, constraint: Constraint) -> CompiledConstraint:
        """compile() for an event loop: awaits the worker thread without holding one of the loop's threads."""
        future = self.submit(constraint)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.timeout_s)
        except ConstraintError as exc:
            raise ConstraintError(str(exc), constraint.param) from None
        except TimeoutError:
            raise self._timed_out(constraint, future) from None

    def _timed_out(self, constraint: Constraint, future: Future) -> ConstraintError:
        """The timeout error, cached in place of the still-running compile: a later request must not wait again."""
        with self._lock:
            if self._cache.get(constraint) is future:
                failed: Future = Future()
                failed.set_exception(self._timeout_error(constraint))
                self._cache[constraint] = failed
        return self._timeout_error(constraint)

    def submit(self, constraint: Constraint) -> Future:
        """A future of the compiled constraint (shared by every caller of the same constraint)."""
        with self._lock:
            future = self._cache.get(constraint)
            if future is not None:
                self._cache.move_to_end(constraint)
                return future
            future = self._pool.submit(self._build, constraint)
            self.compiles += 1
            self._cache[constraint] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future

    def _timeout_error(self, c: Constraint) -> ConstraintError:
        return ConstraintError(f"compiling the {c.kind} constraint took longer than {self.timeout_s:g} s", c.param)

    def _build(self, c: Constraint) -> CompiledConstraint:
        grammar = grammar_text(c)
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=_limits())
        if not matcher.is_error():  # the first mask: a grammar that accepts no text fails here, not mid-step
            mask = llguidance.torch.allocate_token_bitmask(1, self.ll_tokenizer.vocab_size)
            llguidance.torch.fill_next_token_bitmask(matcher, mask)
        if matcher.is_error():
            error = matcher.get_error()
            if "NoExtension" in error and matcher.is_stopped():
                error = "it accepts no text (no rule reaches a terminal)"
            raise ConstraintError(f"invalid {c.kind}: {short(error)}", c.param)
        return CompiledConstraint(c, matcher, self.ll_tokenizer.vocab_size)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
