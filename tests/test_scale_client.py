"""The client's one retry of a stream its server cut mid-way (clients.errors.is_cut / skip_delivered)."""

from __future__ import annotations

import grpc

from clients.errors import SwitchboardError, is_cut, skip_delivered
from clients.results import StreamChunk
from server.scale.remote_engine import CUT_MESSAGE


def chunk(tokens: list[int], text: str, finished: bool = False) -> StreamChunk:
    return StreamChunk(text=text, token_ids=tokens, finished=finished, finish_reason="length" if finished else "",
                       prompt_tokens=0, completion_tokens=0, adapter_name="", adapter_version=0, queue_ms=0.0,
                       ttft_ms=0.0, total_ms=0.0)


def test_only_the_scale_out_cut_message_is_retried():
    assert is_cut(SwitchboardError(grpc.StatusCode.UNAVAILABLE, CUT_MESSAGE))
    assert not is_cut(SwitchboardError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down"))
    assert not is_cut(SwitchboardError(grpc.StatusCode.INTERNAL, CUT_MESSAGE))


def test_a_retried_stream_skips_the_tokens_already_delivered():
    again = [chunk([1], "a"), chunk([2], "b"), chunk([3, 4], "cd"), chunk([5], "e", finished=True)]
    assert [(c.token_ids, c.text) for c in skip_delivered(iter(again), 0)] == [
        ([1], "a"), ([2], "b"), ([3, 4], "cd"), ([5], "e")]
    assert [(c.token_ids, c.text) for c in skip_delivered(iter(again), 2)] == [([3, 4], "cd"), ([5], "e")]
    # a chunk straddling the boundary keeps its later tokens (its text cannot be split by token)
    assert [(c.token_ids, c.text) for c in skip_delivered(iter(again), 3)] == [([4], ""), ([5], "e")]
    # everything was delivered but the finish: the last chunk still comes, without tokens
    done = list(skip_delivered(iter(again), 5))
    assert [(c.token_ids, c.finished) for c in done] == [([], True)]
