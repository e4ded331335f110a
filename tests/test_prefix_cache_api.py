"""Cached prompt tokens through the APIs: OpenAI's `usage.prompt_tokens_details.cached_tokens` over HTTP (the
`openai` client, the vLLM-style `cache_salt` extra field) and `Usage.cached_prompt_tokens` / `cache_salt` over
gRPC, on a real server with 16-token blocks."""

from __future__ import annotations

import openai
import pytest

from switchboard.v1 import inference_pb2 as pb
from tests.http_utils import MODEL_ID, running_http_server

pytestmark = pytest.mark.timeout(300)

PROMPT = list(range(700, 740))  # 40 tokens: two full 16-token blocks before the last one


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with running_http_server(tiny_llama_dir, tenants=["acme", "beta"]) as s:
        yield s


def test_http_usage_reports_cached_prompt_tokens(server) -> None:
    client = server.openai("acme")

    def cached(salt: str | None = None, stream: bool = False) -> tuple[int, int]:
        extra = {"cache_salt": salt} if salt else {}
        if stream:
            chunks = list(client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=2, temperature=0,
                                                    stream=True, stream_options={"include_usage": True},
                                                    extra_body=extra))
            usage = chunks[-1].usage
        else:
            usage = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=2, temperature=0,
                                              extra_body=extra).usage
        return usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens

    assert cached() == (40, 0)
    assert cached() == (40, 32)
    assert cached(stream=True) == (40, 32)
    assert cached("alice") == (40, 0)  # a salt narrows the namespace
    assert cached("alice") == (40, 32)
    assert server.openai("beta").completions.create(  # another tenant computes it again
        model=MODEL_ID, prompt=PROMPT, max_tokens=2, temperature=0).usage.prompt_tokens_details.cached_tokens == 0
    with pytest.raises(openai.BadRequestError, match="cache_salt"):
        client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=2, extra_body={"cache_salt": 7})


def test_grpc_usage_reports_cached_prompt_tokens(server) -> None:
    with server.grpc.client("acme", timeout=60) as c:
        def cached(salt: str | None = None) -> int:
            req = pb.GenerateRequest(token_ids=PROMPT[::-1], max_new_tokens=2, cache_salt=salt)
            usage = c._inference.Generate(req, metadata=c._metadata, timeout=60).usage
            assert usage.prompt_tokens == 40
            return usage.cached_prompt_tokens

        assert [cached(), cached(), cached("s"), cached("s")] == [0, 32, 0, 32]
