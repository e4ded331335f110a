"""Sampling is validated in one place for both faces: server.lifecycle.check_sampling (SamplingParams.validate
against the engine's limits). A rule added there reaches gRPC (INVALID_ARGUMENT) and HTTP (400 naming the
OpenAI parameter) with the same message; the engine's own re-check is a backstop for direct engine users."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from clients import InvalidArgument
from server.engine.request import GenerationRequest, InvalidRequest, SamplingParams
from tests.http_utils import MODEL_ID, running_http_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with running_http_server(tiny_llama_dir, tenants=["t"]) as s:
        yield s


def _http(server, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{server.base_url}/{path}", json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {server.grpc.keys['t']}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def extra_rule(monkeypatch):
    """SamplingParams.validate with one more rule: temperature 0.25 and presence_penalty 1.5 are refused."""
    real = SamplingParams.validate
    calls = []

    def validate(self, max_new_tokens_limit, vocab_size=None):
        calls.append(vocab_size)
        if self.temperature == 0.25:
            raise InvalidRequest("temperature 0.25 is refused by a rule added for this test")
        if self.presence_penalty == 1.5:
            raise InvalidRequest("presence_penalty 1.5 is refused by a rule added for this test")
        real(self, max_new_tokens_limit, vocab_size)

    monkeypatch.setattr(SamplingParams, "validate", validate)
    return calls


@pytest.mark.parametrize(("field", "value", "param"), [("temperature", 0.25, "temperature"),
                                                        ("presence_penalty", 1.5, "presence_penalty")])
def test_a_rule_added_to_the_one_check_reaches_both_faces(server, extra_rule, field, value, param):
    with server.grpc.client("t") as c, pytest.raises(InvalidArgument) as grpc_error:
        c.generate(token_ids=[5, 6, 7], max_new_tokens=2, **{field: value})
    for path, body in (("completions", {"prompt": [5, 6, 7]}),
                       ("chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        status, reply = _http(server, path, {"model": MODEL_ID, "max_tokens": 2, field: value, **body})
        assert status == 400, reply
        assert reply["error"]["param"] == param
        assert reply["error"]["message"] == grpc_error.value.message
    assert "added for this test" in grpc_error.value.message
    assert extra_rule and all(v == server.grpc.engine.args.vocab_size for v in extra_rule)  # the engine's vocabulary
    status, _ = _http(server, "completions", {"model": MODEL_ID, "prompt": [5, 6, 7], "max_tokens": 2})
    assert status == 200  # the rule refuses only its own value


def test_the_engine_backstop_refuses_what_a_face_would_have(server):
    """Direct engine users (bench, generate_cli, Ray replicas) get the same rules from Engine._make_sequence."""
    engine = server.grpc.engine
    vocab = engine.args.vocab_size
    for sampling, fragment in ((SamplingParams(max_new_tokens=2, top_p=0.0), "top_p"),
                               (SamplingParams(max_new_tokens=2, logit_bias=((vocab, 1.0),)), "outside the vocabulary"),
                               (SamplingParams(max_new_tokens=10**9), "max_new_tokens")):
        with pytest.raises(InvalidRequest, match=fragment):
            engine.submit_group([GenerationRequest("backstop", (5, 6, 7), sampling)])
    assert engine.stats().running == 0 and engine.stats().waiting == 0
