"""Turn a sampled token into a TokenEvent: stop checks, detokenized text, stop-string hold-back."""

from __future__ import annotations

import dataclasses
import time

from server.engine.request import FinishReason, TokenEvent
from server.engine.sequence import Sequence


class Postprocessor:
    def __init__(self, eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
        self.eos = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def on_token(self, seq: Sequence, token: int, logprob: float | None = None,
                 top_logprobs: list[tuple[int, float]] | None = None, complete: bool = False) -> TokenEvent:
        """`complete`: the sequence's output constraint is satisfied and takes no more tokens (ends it: stop)."""
        params = seq.request.sampling
        seq.output_ids.append(token)
        first = seq.first_token_time is None
        if first:
            seq.first_token_time = time.monotonic()
        reason: FinishReason | None = None
        if token in self.eos and not params.ignore_eos:
            reason = FinishReason.STOP
        else:
            seq.text += seq.detok.push(token)
            if len(seq.output_ids) >= params.min_tokens:  # stop strings wait for min_tokens, as in vLLM
                reason = self._stop_string(seq)
            if reason is None and complete:
                reason = FinishReason.STOP
        if reason is None and (
            len(seq.output_ids) >= params.max_new_tokens or seq.context_len >= self.max_model_len
        ):
            reason = FinishReason.LENGTH
        hold = 0 if reason is not None or not params.stop else max(map(len, params.stop)) - 1
        visible = max(seq.emitted_chars, len(seq.text) - hold)
        delta = seq.text[seq.emitted_chars : visible]
        seq.emitted_chars = visible
        event = self._event(seq, (token,), delta, reason, first=first)
        if logprob is None:
            return event
        return dataclasses.replace(event, logprobs=(logprob,), top_logprobs=(tuple(top_logprobs or ()),))

    def _stop_string(self, seq: Sequence) -> FinishReason | None:
        stops = seq.request.sampling.stop
        if not stops:
            return None
        window_start = max(0, seq.emitted_chars - max(map(len, stops)))
        hits = [i for s in stops if (i := seq.text.find(s, window_start)) >= 0]
        if not hits:
            return None
        seq.text = seq.text[: min(hits)]  # the stop string itself is not returned
        return FinishReason.STOP

    def final_event(self, seq: Sequence, reason: FinishReason, error: str | None) -> TokenEvent:
        """The closing event for an aborted or failed sequence."""
        delta = seq.text[seq.emitted_chars :] if reason is not FinishReason.ERROR else ""
        seq.emitted_chars = len(seq.text)
        return self._event(seq, (), delta, reason, first=seq.first_token_time is None, error=error)

    def _event(
        self, seq: Sequence, tokens: tuple[int, ...], text: str, reason: FinishReason | None,
        first: bool, error: str | None = None,
    ) -> TokenEvent:
        arrival = seq.request.arrival_time
        return TokenEvent(
            request_id=seq.request_id,
            token_ids=tokens,
            text=text,
            finished=reason is not None,
            finish_reason=reason,
            error=error,
            adapter_version=seq.adapter_version,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            cached_prompt_tokens=seq.cached_prompt_tokens,
            queue_s=(seq.first_scheduled - arrival) if first and seq.first_scheduled else None,
            ttft_s=(seq.first_token_time - arrival) if first and seq.first_token_time else None,
        )
