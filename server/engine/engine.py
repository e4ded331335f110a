"""The engine: a step loop on its own thread. step() = schedule -> run -> postprocess.

Callers (gRPC workers, the CLI, tests) use `submit()` and `abort()` from any thread; the loop owns
the scheduler, KV cache, pool slots and model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import kernels
from server.adapters.peft_format import read_adapter
from server.adapters.pool import AdapterPool, UnknownAdapter
from server.config import AdapterPoolConfig, EngineConfig, ModelConfig
from server.engine.adapter_admission import AdapterAdmission
from server.engine.kv_cache import KVCache
from server.engine.output import Postprocessor
from server.engine.prefix_cache import PrefixCache, PrefixCacheStats
from server.engine.request import (
    EngineStopped,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    QueueFull,
    RequestHandle,
    UnknownAdapterRequest,
)
from server.engine.runner import ModelRunner
from server.engine.sampler import sample
from server.engine.scheduler import Scheduler
from server.engine.sequence import IncrementalDetokenizer, Sequence
from server.engine.siblings import SiblingForks
from server.model.loader import LoadedModel, load_model
from server.structured.compiler import GrammarCompiler

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    batch_size: int  # sequences in the last step
    batch_tokens: int  # tokens in the last step
    adapters_resident: int
    steps: int
    preemptions: int  # all preemptions (KV pressure and fair share)
    fair_preemptions: int = 0  # VTC fair-share preemptions among them
    longest_step_s: float = 0.0  # the longest single pass of the step loop (adapter loads run off the loop)
    prefix: PrefixCacheStats = field(default_factory=PrefixCacheStats)  # cached blocks, evictions, tokens


class Engine:
    def __init__(self, loaded: LoadedModel, cfg: EngineConfig, pool: AdapterPool) -> None:
        self.model = loaded.model
        self.args = loaded.args
        self.tokenizer = loaded.tokenizer
        self.config = cfg
        self.pool = pool
        limit = cfg.max_model_len or self.args.max_position_embeddings
        if self.args.sliding_window:
            limit = min(limit, self.args.sliding_window)  # full attention is exact up to the window
        self.max_model_len = limit
        self.kv = KVCache(self.args, cfg.kv_blocks, cfg.kv_block_size, self.model.dtype, str(self.model.device))
        self.prefix = PrefixCache(self.kv, cfg.prefix_cache, cfg.prefix_cache_share_base,
                                  cfg.prefix_cache_share_adapters)
        self.adapters = AdapterAdmission(pool, self.kv, cfg)  # checked at submit, pinned at admission
        self.scheduler = Scheduler(cfg, self.kv, self.adapters.pin, self.adapters.unpin, self.prefix)
        pool.on_drop = self.prefix.dropped.append  # a deleted adapter version (any thread -> the step loop)
        self.runner = ModelRunner(self.model, self.kv, pool.tables)
        self.siblings = SiblingForks()
        self.post = Postprocessor(self.args.eos_token_ids, self.max_model_len)
        self.grammars = GrammarCompiler(self.tokenizer, self.args.vocab_size)  # output constraints, off the loop
        self._lock = threading.Condition()
        self._inbox: list[Sequence] = []
        self._aborts: list[str] = []
        self._by_id: dict[str, Sequence] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._seed_rng = torch.Generator().manual_seed(0)
        self._last_batch = (0, 0)
        self.steps = 0
        self.longest_step_s = 0.0
        # observer of each step's sampled logits: (sequences, logits [S, vocab]); tests compare them to oracles
        self.on_logits: Callable[[list[Sequence], torch.Tensor], None] | None = None

    @classmethod
    def create(
        cls, model_cfg: ModelConfig, engine_cfg: EngineConfig, pool_cfg: AdapterPoolConfig | None = None
    ) -> Engine:
        pool_cfg = pool_cfg or AdapterPoolConfig()
        loaded = load_model(model_cfg)

        def read(path):
            return read_adapter(path, loaded.args, pool_cfg.limits)

        pool = AdapterPool(pool_cfg, loaded.args, model_cfg.torch_dtype, model_cfg.device, reader=read)
        return cls(loaded, engine_cfg, pool)

    # ---- caller side (any thread) -------------------------------------------------------------
    def submit(self, req: GenerationRequest) -> RequestHandle:
        return self.submit_group([req])[0]

    def submit_group(self, reqs: list[GenerationRequest]) -> list[RequestHandle]:
        """Several requests at once, all or none. A request with an earlier one's prompt and adapter is its sibling
        (one of n choices): the prompt is computed once and its KV blocks shared (server/engine/siblings.py)."""
        seqs = [self._make_sequence(req) for req in reqs]
        with self._lock:
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            ids = [s.request_id for s in seqs]
            dup = next((i for n, i in enumerate(ids) if i in self._by_id or i in ids[:n]), None)
            if dup is not None:
                raise InvalidRequest(f"request_id {dup!r} is already in flight")
            queued = len(self._inbox) + len(self.scheduler.waiting) + self.siblings.held
            if queued + len(seqs) > self.config.max_waiting:
                raise QueueFull(f"the waiting queue is full ({self.config.max_waiting} requests); retry later")
            reserved: list[str] = []
            try:  # keeps each adapter version alive for its request and starts loading it off the loop
                for req in reqs:
                    for key in req.adapter_keys:
                        self.pool.reserve(key)
                        reserved.append(key)
            except UnknownAdapter:
                for done in reserved:
                    self.pool.unreserve(done)
                raise UnknownAdapterRequest(f"unknown adapter {key!r}") from None
            for seq in seqs:
                self._by_id[seq.request_id] = seq
            self._inbox.extend(self.siblings.group(seqs))
            self._lock.notify()
        return [seq.handle for seq in seqs]

    @property
    def alive(self) -> bool:
        """The step loop is running (False before start() and once it exited or died)."""
        return self._thread is not None and self._thread.is_alive()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
            self._lock.notify()

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting) + len(self._inbox) + self.siblings.held,
            kv_blocks_used=self.kv.used_blocks,
            kv_blocks_total=self.kv.num_blocks,
            batch_size=self._last_batch[0],
            batch_tokens=self._last_batch[1],
            adapters_resident=self.pool.resident(),
            steps=self.steps,
            preemptions=self.scheduler.preemptions,
            fair_preemptions=self.scheduler.fair_preemptions,
            longest_step_s=self.longest_step_s,
            prefix=self.prefix.stats(),
        )

    def _make_sequence(self, req: GenerationRequest) -> Sequence:
        # Backstop, not the validation: the API faces check sampling in one place (server.lifecycle.check_sampling,
        # which the HTTP face maps to OpenAI `param` names) before anything is submitted. This re-check applies the
        # same rules so a face that skipped it, or a direct engine user (bench, generate_cli, a Ray replica), still
        # gets InvalidRequest here instead of a sequence the sampler cannot run; it should never fire behind a face.
        req.sampling.validate(self.config.max_new_tokens_limit, self.args.vocab_size)
        ids = req.prompt_token_ids
        if not ids:
            raise InvalidRequest("the prompt is empty")
        vocab = self.args.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {vocab})")
        adapters = self.adapters.context(req)  # InvalidRequest / UnknownAdapterRequest
        n_prefix, n_virtual = adapters.n_prefix, adapters.n_virtual
        context = n_prefix + n_virtual + len(ids)
        if context >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {len(ids)} tokens (+{n_prefix + n_virtual} virtual); the context limit is "
                f"{self.max_model_len}, leaving no room to generate"
            )
        capacity = self.kv.num_blocks * self.kv.block_size
        if context + 1 > capacity:
            raise InvalidRequest(f"the prompt needs {context + 1} KV slots; the cache holds {capacity}")
        # the matcher: a cache hit when the API face compiled it; else compiled here, on the caller's thread
        grammar = self.grammars.compile(req.constraint).new_state() if req.constraint is not None else None
        seed = req.sampling.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_rng))
        seq = Sequence(
            request=req,
            handle=RequestHandle(req.request_id),
            detok=IncrementalDetokenizer(self.tokenizer, list(ids)),
            n_prefix=n_prefix,
            n_virtual=n_virtual,
            generator=torch.Generator().manual_seed(seed),
            grammar=grammar,
        )
        self.prefix.prepare(seq, adapters.identity, adapters.shared)
        return seq

    # ---- the step loop (engine thread) --------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            kernels.warm_up(self.model.device)  # build / load the compiled kernels now, not inside the first step
            self._thread = threading.Thread(target=self._loop, name="engine-step-loop", daemon=True)
            self._thread.start()

    def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stop taking work, let running requests finish for up to `drain_timeout_s`, abort the rest."""
        with self._lock:
            self._stopping = True
        deadline = time.monotonic() + drain_timeout_s
        while self._thread is not None and time.monotonic() < deadline and self._by_id:
            time.sleep(0.01)
        with self._lock:
            self._aborts.extend(self._by_id)
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._thread = None
        self.grammars.close()

    def take_submitted(self) -> None:
        """Move submitted sequences into the scheduler's queue and apply aborts: what the step loop does before
        each step (engine thread; also for callers that drive step() themselves, e.g. benchmarks)."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for seq in inbox:
            self.scheduler.add(seq)
        self.prefix.drop_dropped()
        for request_id in aborts:
            seq = self._by_id.get(request_id)
            if seq is not None:
                self._finish(seq, FinishReason.ABORT)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._inbox or self._aborts or self.scheduler.has_work() or self._stopping):
                    self._lock.wait(timeout=0.5)
                if self._stopping and not self._by_id and not self._inbox:
                    return
            self.take_submitted()
            if self.scheduler.has_work():
                started = time.perf_counter()
                self.step()
                self.longest_step_s = max(self.longest_step_s, time.perf_counter() - started)
            elif self._stopping and not self._by_id:
                return

    def step(self) -> None:
        plan = self.scheduler.schedule()
        for seq, why in plan.failed:
            self._finish(seq, FinishReason.ERROR, error=why)
        scheduled = plan.scheduled
        if not scheduled:
            time.sleep(self.config.idle_sleep_s)
            return
        self._last_batch = (len(scheduled), sum(n for _, n in scheduled))
        self.steps += 1
        try:
            logits, sampled = self.runner.run(scheduled)
            for seq, _ in scheduled:
                self.prefix.commit(seq)  # the blocks this step filled become reusable
            forked = self.siblings.fork(sampled, self.kv, self.scheduler, self.pool)
            if forked:  # siblings sample their first token from their parent's logits row
                logits = torch.cat([logits, logits[[row for _, row in forked]]])
                sampled = sampled + [sibling for sibling, _ in forked]
            if self.on_logits is not None:
                self.on_logits(sampled, logits)
            out = sample(logits, sampled, self.args.eos_token_ids)
        except Exception as exc:  # a failed step fails its sequences, never the engine
            log.exception("engine step failed")
            for seq, _ in scheduled:
                self._finish(seq, FinishReason.ERROR, error=f"internal error: {exc}")
            return
        for i, seq in enumerate(sampled):
            if out.errors[i] is not None:  # only this row could not be sampled (e.g. NaN logits)
                self._finish(seq, FinishReason.ERROR, error=out.errors[i])
                continue
            self.scheduler.waiting.on_tokens(seq, 1)  # the fairness counters (server.engine.fairness)
            complete = False
            if seq.grammar is not None:  # advance the constraint; complete: it can take no more tokens
                if not seq.grammar.accept(out.tokens[i]):
                    self._finish(seq, FinishReason.ERROR, error=seq.grammar.error or "the constraint refused a token")
                    continue
                complete = seq.grammar.done
            event = self.post.on_token(seq, out.tokens[i], out.logprobs[i], out.top_logprobs[i], complete)
            if event.finished:
                self._finish(seq, event.finish_reason, event=event)
            else:
                seq.handle.put(event)

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None, event=None) -> None:
        if seq.request_id not in self._by_id:
            return
        self.scheduler.finish(seq)
        for sibling in self.siblings.drop(seq):  # a parent that ends before its prompt completed
            self.scheduler.add(sibling)
        del self._by_id[seq.request_id]
        for key in seq.request.adapter_keys:
            self.pool.unreserve(key)
        seq.finish_reason = reason
        seq.handle.put(event or self.post.final_event(seq, reason, error))
