"""Cached prompt tokens through the APIs: OpenAI's `usage.prompt_tokens_details.cached_tokens` over HTTP (the
`openai` client, the vLLM-style `cache_salt` extra field) and `Usage.cached_prompt_tokens` / `cache_salt` over
gRPC (the Python client), on a real server with 16-token blocks."""

from __future__ import annotations

import json

import openai
import pytest

from clients.errors import InvalidArgument
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
        def cached(salt: str | None = None, stream: bool = False) -> int:
            options = {"cache_salt": salt} if salt else {}
            if stream:
                result = list(c.stream(token_ids=PROMPT[::-1], max_new_tokens=2, **options))[-1]
            else:
                result = c.generate(token_ids=PROMPT[::-1], max_new_tokens=2, **options)
            assert result.prompt_tokens == 40
            return result.cached_prompt_tokens

        assert [cached(), cached(), cached(stream=True), cached("s"), cached("s")] == [0, 32, 32, 0, 32]
        with pytest.raises(InvalidArgument, match="cache_salt"):
            c.generate(token_ids=PROMPT, max_new_tokens=2, cache_salt="x" * 257)


def test_usage_records_cached_prompt_tokens_over_both_faces(server, capsys) -> None:
    """Admin.GetUsage and `python -m clients usage` report the cached prompt tokens the responses reported."""
    from clients.__main__ import main as cli
    from tests.server_utils import wait_until

    def totals() -> tuple[int, int, int]:
        with server.grpc.client(timeout=60) as admin:
            report = admin.get_usage("beta")
        assert report.cached_prompt_tokens == sum(r.cached_prompt_tokens for r in report.rows)
        return report.prompt_tokens, report.cached_prompt_tokens, report.requests

    before = totals()
    prompt = list(range(800, 850))  # 50 tokens: three full blocks
    reported = []
    for _ in range(2):
        usage = server.openai("beta").completions.create(model=MODEL_ID, prompt=prompt, max_tokens=1,
                                                         temperature=0).usage
        reported.append(usage.prompt_tokens_details.cached_tokens)
    with server.grpc.client("beta", timeout=60) as c:
        reported.append(c.generate(token_ids=prompt, max_new_tokens=1).cached_prompt_tokens)
    assert reported == [0, 48, 48]
    wait_until(lambda: totals()[2] == before[2] + 3, timeout=10, what="three more usage records")
    after = totals()
    assert (after[0] - before[0], after[1] - before[1]) == (150, 96)
    capsys.readouterr()
    assert cli(["usage", "--target", server.grpc.target, "--api-key", server.grpc.keys["beta"], "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["cached_prompt_tokens"] == after[1]
    assert sum(r["cached_prompt_tokens"] for r in printed["rows"]) == after[1]
    assert cli(["usage", "--target", server.grpc.target, "--api-key", server.grpc.keys["beta"]]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "(cached)" in table[0] and table[-1].split()[1:3] == [str(after[0]), str(after[1])]
