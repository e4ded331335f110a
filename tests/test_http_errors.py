"""Bad requests over HTTP: each gets OpenAI's status code and an error object naming the problem; the server
keeps serving. Also 401 / 403 / 404 / 429 (with Retry-After) / 503 while draining."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

from server.engine.request import EngineStopped, QueueFull
from server.http.errors import from_exception
from server.tenants import TenantBusy
from tests.adapter_files import peft_adapter
from tests.http_utils import MODEL_ID, running_http_server
from tests.server_utils import metric, wait_until

pytestmark = pytest.mark.timeout(300)

CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMP = {"model": MODEL_ID, "prompt": [5, 6, 7], "max_tokens": 2}
DROP = object()

# (case id, endpoint, body changes (DROP removes a field; a non-dict replaces the body), status, param, fragment)
CASES = [
    ("invalid JSON", "chat", b"{not json", 400, None, "not valid JSON"),
    ("body is a list", "chat", [1, 2], 400, None, "must be a JSON object"),
    ("missing model", "chat", {"model": DROP}, 400, "model", "'model' is required"),
    ("unknown model", "chat", {"model": "no-such-model"}, 404, "model", "'no-such-model'"),
    ("unknown owner/model", "completions", {"model": "nobody/thing"}, 404, "model", "not found"),
    ("unknown adapter field", "completions", {"adapter": "nope"}, 404, "adapter", "'nope'"),
    ("other tenant's private adapter", "chat", {"model": "beta/private1"}, 403, "model", "not shared"),
    ("missing messages", "chat", {"messages": DROP}, 400, "messages", "'messages' is required"),
    ("empty messages", "chat", {"messages": []}, 400, "messages", "non-empty list"),
    ("bad role", "chat", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", "wizard"),
    ("image content part", "chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content", "text part"),
    ("empty content", "chat", {"messages": [{"role": "user", "content": ""}]}, 400, "messages[0].content",
     "prompt is empty"),
    ("missing prompt", "completions", {"prompt": DROP}, 400, "prompt", "'prompt' is required"),
    ("prompt is a number", "completions", {"prompt": 42}, 400, "prompt", "must be a string"),
    ("token id beyond vocab", "completions", {"prompt": [5, 10**8]}, 400, "prompt", "outside the vocabulary"),
    ("prompt beyond context", "completions", {"prompt": list(range(5, 605))}, 400, "prompt", "context limit is 512"),
    ("max_tokens 0", "chat", {"max_tokens": 0}, 400, "max_tokens", "got 0"),
    ("max_tokens a string", "chat", {"max_tokens": "ten"}, 400, "max_tokens", "must be an integer"),
    ("max_tokens huge", "completions", {"max_tokens": 10**9}, 400, "max_tokens", "[1, 4096]"),
    ("max_completion_tokens 0", "chat", {"max_completion_tokens": 0}, 400, "max_completion_tokens", "got 0"),
    ("negative temperature", "chat", {"temperature": -1}, 400, "temperature", "[0.0, 2.0]"),
    ("temperature 3", "completions", {"temperature": 3}, 400, "temperature", "got 3"),
    ("temperature a string", "chat", {"temperature": "hot"}, 400, "temperature", "must be a number"),
    ("temperature a bool", "chat", {"temperature": True}, 400, "temperature", "must be a number"),
    ("top_p 0", "chat", {"top_p": 0}, 400, "top_p", "(0.0, 1.0]"),
    ("top_p 1.5", "completions", {"top_p": 1.5}, 400, "top_p", "got 1.5"),
    ("n 0", "chat", {"n": 0}, 400, "n", "'n' must be in [1, 16]"),
    ("n 100", "completions", {"n": 100}, 400, "n", "got 100"),
    ("20 stop strings", "chat", {"stop": ["a"] * 20}, 400, "stop", "at most 16"),
    ("stop a number", "chat", {"stop": 7}, 400, "stop", "string or a list of strings"),
    ("empty stop string", "completions", {"stop": ["ok", ""]}, 400, "stop", "non-empty"),
    ("logit_bias key not a token", "chat", {"logit_bias": {"abc": 1}}, 400, "logit_bias", "'abc'"),
    ("logit_bias value 500", "chat", {"logit_bias": {"5": 500}}, 400, "logit_bias", "[-100, 100]"),
    ("logit_bias token beyond vocab", "completions", {"logit_bias": {"99999999": 1}}, 400, "logit_bias",
     "outside the vocabulary"),
    ("logit_bias a list", "chat", {"logit_bias": [1, 2]}, 400, "logit_bias", "must be an object"),
    ("presence_penalty 3", "chat", {"presence_penalty": 3}, 400, "presence_penalty", "[-2.0, 2.0]"),
    ("frequency_penalty -3", "completions", {"frequency_penalty": -3}, 400, "frequency_penalty", "got -3"),
    ("repetition_penalty 0", "chat", {"repetition_penalty": 0}, 400, "repetition_penalty", "(0.0, 100.0]"),
    ("top_logprobs 30", "chat", {"logprobs": True, "top_logprobs": 30}, 400, "top_logprobs", "[0, 20]"),
    ("top_logprobs without logprobs", "chat", {"top_logprobs": 2}, 400, "top_logprobs", "needs 'logprobs'"),
    ("completions logprobs 50", "completions", {"logprobs": 50}, 400, "logprobs", "got 50"),
    ("logprobs a string", "chat", {"logprobs": "yes"}, 400, "logprobs", "must be a boolean"),
    ("negative seed", "chat", {"seed": -1}, 400, "seed", "got -1"),
    ("seed a string", "completions", {"seed": "x"}, 400, "seed", "must be an integer"),
    ("stream a string", "chat", {"stream": "yes"}, 400, "stream", "must be a boolean"),
    ("stream_options without stream", "chat", {"stream_options": {"include_usage": True}}, 400, "stream_options",
     "only allowed when 'stream' is true"),
    ("min_tokens above max_tokens", "completions", {"min_tokens": 5}, 400, "min_tokens", "must not exceed"),
    ("negative top_k", "chat", {"top_k": -5}, 400, "top_k", "got -5"),
    ("min_p 2", "chat", {"min_p": 2}, 400, "min_p", "[0.0, 1.0]"),
    ("user a number", "chat", {"user": 5}, 400, "user", "must be a string"),
    # extremes (issue 33): bounded with a clear 400 before any work
    ("5000 stop strings", "completions", {"stop": ["ab"] * 5000}, 400, "stop", "at most 16"),
    ("a 100k-character stop string", "chat", {"stop": "x" * 100_000}, 400, "stop", "at most 256 characters"),
    ("logit_bias over the whole vocabulary", "chat", {"logit_bias": {str(t): 1 for t in range(49152)}}, 400,
     "logit_bias", "49152 entries; at most 1024"),
    ("logit_bias 1025 entries", "completions", {"logit_bias": {str(t): -1 for t in range(1025)}}, 400,
     "logit_bias", "at most 1024"),
    ("n x top_logprobs", "chat", {"n": 16, "logprobs": True, "top_logprobs": 20}, 400, "top_logprobs",
     "16 x 20; at most 64"),
    ("n x completions logprobs", "completions", {"n": 4, "logprobs": 20}, 400, "logprobs", "at most 64"),
    ("prompts x n", "completions", {"prompt": ["hi"] * 20, "n": 4}, 400, "prompt", "80 sequences; at most 64"),
    ("1000 prompts", "completions", {"prompt": [[5, 6]] * 1000}, 400, "prompt", "at most 64"),
    ("logit_bias NaN-like string value", "chat", {"logit_bias": {"5": "NaN"}}, 400, "logit_bias", "[-100, 100]"),
    ("temperature 1e308", "chat", {"temperature": 1e308}, 400, "temperature", "[0.0, 2.0]"),
    ("max_tokens a float", "completions", {"max_tokens": 5.5}, 400, "max_tokens", "must be an integer"),
    ("seed 2**64", "chat", {"seed": 2**64}, 400, "seed", "got"),
    ("top_k a float", "chat", {"top_k": 1.5}, 400, "top_k", "must be an integer"),
    ("messages a string", "chat", {"messages": "hello"}, 400, "messages", "non-empty list"),
    ("message without content", "chat", {"messages": [{"role": "user"}]}, 400, "messages[0].content", "content"),
    ("prompt an empty list", "completions", {"prompt": []}, 400, "prompt", "must be a string"),
    ("prompt a list of bools", "completions", {"prompt": [True, False]}, 400, "prompt", "must be a string"),
    ("negative token id", "completions", {"prompt": [5, -1]}, 400, "prompt", "outside the vocabulary"),
    ("stop list of numbers", "chat", {"stop": [1, 2]}, 400, "stop", "list of strings"),
    ("stream_options a list", "chat", {"stream": True, "stream_options": [1]}, 400, "stream_options",
     "must be an object"),
    ("adapter a number", "chat", {"adapter": 5}, 400, "adapter", "must be a string"),
    ("model empty", "completions", {"model": ""}, 400, "model", "'model' is required"),
    ("repetition_penalty 1000", "completions", {"repetition_penalty": 1000}, 400, "repetition_penalty", "got 1000"),
    ("min_tokens negative", "chat", {"min_tokens": -1}, 400, "min_tokens", "got -1"),
]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with running_http_server(tiny_llama_dir, tenants=["acme", "beta", "solo"], tenant_limits={"solo": 1}) as s:
        s.grpc.registry.create("beta", "private1", peft_adapter(tiny_llama_dir, "lora", rank=2, seed=71))
        yield s


def post(server, endpoint: str, body, tenant: str | None = "acme", key: str | None = None,
         path: str | None = None, method: str = "POST"):
    """(status, parsed JSON body, headers) of one raw HTTP call."""
    url = server.base_url + (path or {"chat": "/chat/completions", "completions": "/completions"}[endpoint])
    data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    key = key if key is not None else server.grpc.keys.get(tenant) if tenant else None
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null"), r.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null"), exc.headers


def body_for(endpoint: str, change):
    if not isinstance(change, dict):
        return change
    body = dict(CHAT if endpoint == "chat" else COMP)
    for k, v in change.items():
        if v is DROP:
            body.pop(k, None)
        else:
            body[k] = v
    return body


def assert_error(status, body, want_status, param, fragment):
    assert status == want_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert fragment in err["message"], err
    assert err["param"] == param, err
    assert isinstance(err["type"], str) and err["type"]


@pytest.mark.parametrize(("endpoint", "change", "status", "param", "fragment"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request(server, endpoint, change, status, param, fragment):
    got_status, body, _ = post(server, endpoint, body_for(endpoint, change))
    assert_error(got_status, body, status, param, fragment)


def test_the_table_has_at_least_25_cases_and_the_server_keeps_serving(server):
    assert len(CASES) >= 25
    for _, endpoint, change, *_ in CASES[:10]:  # again, streaming: errors come before any event
        change = {**change, "stream": True} if isinstance(change, dict) else change
        status, body, _ = post(server, endpoint, body_for(endpoint, change))
        assert status >= 400 and "error" in body
    status, body, _ = post(server, "chat", CHAT)
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")
    assert metric(server.grpc.scrape(), "switchboard_requests_total", status="INVALID_ARGUMENT") >= 25


@pytest.mark.parametrize("key", ["", "sb-wrong", "Basic abc"], ids=["empty", "wrong", "scheme"])
def test_bad_key_is_401(server, key):
    url = server.base_url + "/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": key}
    req = urllib.request.Request(url, data=json.dumps(CHAT).encode(), headers=headers)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    body = json.loads(info.value.read())
    assert info.value.code == 401 and body["error"]["code"] == "invalid_api_key"
    status, body, _ = post(server, None, None, tenant=None, path="/models", method="GET")
    assert status == 401 and "authorization" in body["error"]["message"]


def test_routes_and_methods(server):
    status, body, _ = post(server, None, None, path="/chat/completions", method="GET")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    status, body, _ = post(server, None, {}, path="/embeddings")
    assert status == 404 and body["error"]["code"] == "not_found"


def open_stream(server, tenant: str, max_tokens: int):
    """(connection, response) of a streaming completion that is running (its first event read by the caller)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.http.port, timeout=60)
    body = {**COMP, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {
        "Content-Type": "application/json", "Authorization": f"Bearer {server.grpc.keys[tenant]}"})
    return conn, conn.getresponse()


def test_tenant_limit_is_429_with_retry_after(server):
    conn, resp = open_stream(server, "solo", 400)
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    try:
        status, body, headers = post(server, "completions", COMP, tenant="solo")
        assert_error(status, body, 429, None, "requests in flight (limit 1)")
        assert headers["Retry-After"] == "1" and body["error"]["type"] == "rate_limit_error"
    finally:
        conn.close()
    wait_until(lambda: server.grpc.server.limiter.in_flight("solo") == 0, what="the solo slot freed")
    assert post(server, "completions", COMP, tenant="solo")[0] == 200


def test_exception_table():
    for exc, status in ((QueueFull("full"), 429), (TenantBusy("busy"), 429), (EngineStopped("stop"), 503),
                        (RuntimeError("boom"), 500)):
        error = from_exception(exc)
        assert error.kind.status == status and error.body()["error"]["message"].endswith(str(exc))
    assert from_exception(QueueFull("x")).response().headers["Retry-After"] == "1"


def test_draining_is_503_and_in_flight_requests_finish(server):
    conn, resp = open_stream(server, "acme", 60)
    lines = [resp.readline()]
    server.http.begin_drain()
    try:
        status, body, headers = post(server, "chat", CHAT)
        assert_error(status, body, 503, None, "shutting down")
        assert headers["Retry-After"] == "1"
        rest = threading.Thread(target=lambda: lines.extend(resp.read().split(b"\n")))
        rest.start()
        rest.join(60)
        assert b"data: [DONE]" in lines  # the in-flight stream ran to its end
        assert server.http.wait_idle(10)
    finally:
        server.http.api.draining = False
        conn.close()
