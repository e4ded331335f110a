"""Compositions over the APIs (server/compose_api.py): the gRPC `adapters` field and the HTTP `adapters` extra body
field resolve each part like `adapter` (tenants, visibility, the newest version), reach the engine as its parts
(the oracle: the same parts submitted to the engine directly), name every part in the response, the metrics and
the usage records, and refuse bad compositions with a clear status."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from clients.errors import InvalidArgument, NotFound, PermissionDenied
from server.engine.request import AdapterPart, GenerationRequest, SamplingParams
from tests.engine_utils import collect
from tests.http_utils import running_http_server
from tests.kinds_adapters import make_dora_adapter
from tests.peft_adapters import ALL_PROJ, AdapterSpec, make_peft_adapter
from tests.server_utils import metric, wait_until

PROMPT = [5, 17, 42, 8, 99, 3]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compose-api")
    return {
        "a": make_peft_adapter(tiny_llama_dir, AdapterSpec("a", "lora", rank=4, alpha=8, targets=ALL_PROJ, seed=11),
                               root / "a"),
        "b": make_peft_adapter(tiny_llama_dir, AdapterSpec("b", "lora", rank=8, alpha=8, targets=["q_proj", "v_proj"],
                                                           seed=12), root / "b"),
        "d": make_dora_adapter(tiny_llama_dir, root / "d", rank=4, alpha=8, targets=["q_proj"], seed=13),
    }


def _engine_tokens(engine, parts: tuple[AdapterPart, ...]) -> list[int]:
    handle = engine.submit(GenerationRequest(f"direct-{id(parts)}", tuple(PROMPT),
                                             SamplingParams(max_new_tokens=4, ignore_eos=True), parts=parts))
    return list(collect(handle).token_ids)


def test_compositions_over_grpc_and_http(tiny_llama_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    with running_http_server(tiny_llama_dir, tenants=["acme", "other"]) as s:
        acme, other = s.grpc.client("acme"), s.grpc.client("other")
        versions = {name: acme.upload_adapter(path, name).version for name, path in adapter_dirs.items()}
        parts = [("a", 0.7), ("b", -0.3)]
        got = acme.generate(token_ids=PROMPT, adapters=parts, max_new_tokens=4, ignore_eos=True)
        keys = tuple(AdapterPart(f"acme/{n}@{versions[n]}", w) for n, w in parts)
        assert got.token_ids == _engine_tokens(s.grpc.engine, keys)
        assert got.adapter_name == "acme/a+acme/b"
        assert [(n, v, pytest.approx(w)) for n, v, w in got.adapters] == [
            ("acme/a", versions["a"], 0.7), ("acme/b", versions["b"], -0.3)]
        last = list(acme.stream(token_ids=PROMPT, adapters=parts, max_new_tokens=4, ignore_eos=True))[-1]
        assert [n for n, _, _ in last.adapters] == ["acme/a", "acme/b"]

        http = s.openai("acme")
        done = http.completions.create(model="base", prompt=PROMPT, max_tokens=4, temperature=0,
                                       extra_body={"adapters": [{"name": n, "weight": w} for n, w in parts],
                                                   "ignore_eos": True})
        assert done.choices[0].text == got.text
        omitted = http.completions.create(model="", prompt=PROMPT, max_tokens=4, temperature=0,
                                          extra_body={"adapters": [{"name": "a", "weight": 0.7}, {"name": "b",
                                                      "weight": -0.3}], "ignore_eos": True})
        assert omitted.choices[0].text == got.text

        # a weighted single adapter; one part of weight 1 is the plain adapter
        half = acme.generate(token_ids=PROMPT, adapters=[("a", 0.5)], max_new_tokens=4, ignore_eos=True)
        assert half.token_ids == _engine_tokens(s.grpc.engine, (AdapterPart(f"acme/a@{versions['a']}", 0.5),))
        one = acme.generate(token_ids=PROMPT, adapters=[("d", 1.0)], max_new_tokens=4, ignore_eos=True)
        assert one.token_ids == acme.generate(token_ids=PROMPT, adapter="d", max_new_tokens=4,
                                              ignore_eos=True).token_ids

        # hot swap per part: a new version of `a` serves new compositions (the response names it)
        newer = acme.upload_adapter(adapter_dirs["a"], "a").version
        swapped = acme.generate(token_ids=PROMPT, adapters=parts, max_new_tokens=4, ignore_eos=True)
        assert newer == versions["a"] + 1 and [v for _, v, _ in swapped.adapters] == [newer, versions["b"]]

        scrape = s.grpc.scrape()
        assert metric(scrape, "switchboard_requests_total", tenant="acme", adapter="acme/a+acme/b") >= 3
        wait_until(lambda: any(r.adapter == "acme/a+acme/b" for r in s.grpc.client().get_usage().rows), 15,
                   what="a usage row naming both parts")

        bad = [
            ([("a", 1.0)] * 2, InvalidArgument, "repeats"),
            ([("a", 1.0), ("acme/a", 0.5)], InvalidArgument, "repeats"),
            ([("a", math.nan)], InvalidArgument, "finite"),
            ([("a", 1e9)], InvalidArgument, "finite"),
            ([("a", 1.0), ("b", 1.0), ("d", 1.0)], InvalidArgument, "DORA"),
            ([("a", 1.0)] + [(f"x{i}", 1.0) for i in range(4)], InvalidArgument, "at most 4"),
            ([("a", 1.0), ("nope", 1.0)], NotFound, "nope"),
        ]
        for spec, error, message in bad:
            with pytest.raises(error, match=message):
                acme.generate(token_ids=PROMPT, adapters=spec, max_new_tokens=2)
        with pytest.raises(InvalidArgument, match="not both"):
            acme.generate(token_ids=PROMPT, adapter="a", adapters=[("b", 0.5)], max_new_tokens=2)
        with pytest.raises(NotFound):  # acme's private adapters are invisible to other by short name
            other.generate(token_ids=PROMPT, adapters=[("a", 0.5), ("b", 0.5)], max_new_tokens=2)
        with pytest.raises(PermissionDenied):  # and forbidden by full name, as `adapter` is
            other.generate(token_ids=PROMPT, adapters=[("acme/a", 0.5)], max_new_tokens=2)

        import openai

        for body, error, param in [
            ({"model": "a", "adapters": [{"name": "b"}]}, openai.BadRequestError, "model"),
            ({"model": "base", "adapters": [{"name": "a", "weight": "x"}]}, openai.BadRequestError, "adapters"),
            ({"model": "base", "adapters": {"name": "a"}}, openai.BadRequestError, "adapters"),
            ({"model": "base", "adapters": [{"name": "a"}, {"name": "a"}]}, openai.BadRequestError, "adapters"),
            ({"model": "base", "adapters": [{"name": "a"}, {"name": "nope"}]}, openai.NotFoundError, "adapters"),
        ]:
            model = body.pop("model")
            with pytest.raises(error) as info:
                http.completions.create(model=model, prompt=PROMPT, max_tokens=2, extra_body=body)
            assert info.value.body["param"] == param, info.value.body
    assert all(e.pins == 0 and e.users == 0 for e in s.grpc.engine.pool._entries.values())


def test_cli_compose_parts() -> None:
    from clients.__main__ import _generation_kwargs, parse_args

    args = parse_args(["generate", "hi", "--compose", "acme/a=0.7", "--compose", "b", "--compose", "c=-1e-1"])
    assert _generation_kwargs(args)["adapters"] == [("acme/a", 0.7), ("b", 1.0), ("c", -0.1)]
    with pytest.raises(SystemExit):
        _generation_kwargs(parse_args(["generate", "hi", "--compose", "a=x"]))
