"""GET /openapi.json describes the HTTP API, and a bounded schemathesis run against the live server (a few hundred
generated requests, valid and invalid, keyed) finds no 5xx and no hang."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from server.config import EngineConfig
from tests.http_utils import MODEL_ID, running_http_server

EXAMPLES = 50  # per operation and generation mode: a few hundred requests in all
KEY: dict[str, str] = {}


@pytest.fixture(scope="module")
def http_server(tiny_llama_dir):
    with running_http_server(tiny_llama_dir, tenants=["acme"], engine_cfg=EngineConfig(max_new_tokens_limit=8)) as s:
        KEY["acme"] = s.grpc.keys["acme"]
        yield s


@pytest.fixture(scope="module")
def api_schema(http_server):
    return schemathesis.openapi.from_url(f"{http_server.http.url}/openapi.json")


def test_the_document_names_our_fields_and_the_error_shape(http_server):
    with urllib.request.urlopen(f"{http_server.http.url}/openapi.json", timeout=10) as r:
        doc = json.loads(r.read())
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"adapter", "top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens"} <= set(chat)
    assert chat["max_tokens"]["maximum"] == 8 and chat["n"]["maximum"] == 16
    assert doc["components"]["schemas"]["Error"]["properties"]["error"]["required"] == ["message", "type", "param",
                                                                                        "code"]
    assert set(doc["paths"]) == {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
    assert MODEL_ID in doc["info"]["description"]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_generated_requests_never_get_a_5xx_or_hang(api_schema, mode):
    """Every operation, EXAMPLES requests each: schema-valid ones (`positive`) and ones that break it
    (`negative`: wrong types, out-of-range values, missing fields). Any 5xx, or no answer in 30 s, fails."""
    calls = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if mode == "negative" and not operation.label.startswith("POST"):
            continue  # a GET without parameters has nothing to break

        @given(operation.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case) -> None:
            if mode == "positive" and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL_ID  # a random name is a 404: reach the engine instead
            response = case.call(headers={"Authorization": f"Bearer {KEY['acme']}"}, timeout=30)
            calls.append(response.status_code)
            case.validate_response(response, checks=[not_a_server_error])

        run()
    assert len(calls) >= EXAMPLES and not any(code >= 500 for code in calls)
    print(f"{mode}: {len(calls)} generated requests, statuses {Counter(calls)}")


def test_what_the_fuzzer_found_stays_fixed(http_server):
    """top_p and repetition_penalty 5e-324 (valid: in (0, 1] and (0, 100]) underflowed fp32 to 0: every token
    dropped, or seen logits divided by 0, a 500 "no token has probability mass". Both are served now."""
    client = http_server.openai("acme")
    for extra in ({"top_p": 5e-324}, {"top_p": 1e-45}, {"extra_body": {"repetition_penalty": 5e-324}}):
        body = {"extra_body": {}, **extra}
        body["extra_body"]["ignore_eos"] = True
        reply = client.completions.create(model=MODEL_ID, prompt=[5, 6, 7, 5, 6], max_tokens=3, temperature=1.0,
                                          **body)
        assert reply.usage.completion_tokens == 3
