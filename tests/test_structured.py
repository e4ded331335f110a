"""Constraints: bounds and bad input (each refused with a message naming the problem), the compile cache,
and constrained generation through a real engine (tiny random Llama) checked with `jsonschema`."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path

import jsonschema
import pytest

from server.config import AdapterPoolConfig, EngineConfig, ModelConfig
from server.engine.engine import Engine
from server.engine.request import FinishReason, GenerationRequest, SamplingParams
from server.structured.compiler import GrammarCompiler
from server.structured.constraint import MAX_DEPTH, MAX_ENUM, Constraint, ConstraintError
from tests.engine_utils import collect
from tests.structured_utils import SCHEMAS, compiler, tokenizer

pytestmark = pytest.mark.timeout(300)


def nested(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


BAD = [  # (what, make the constraint and compile it, words the message must contain)
    ("malformed schema text", lambda: Constraint.json_schema('{"type": "object",'), "not valid JSON"),
    ("schema not an object", lambda: Constraint.json_schema([1, 2]), "must be an object"),
    ("schema false", lambda: Constraint.json_schema(False), "accepts no value"),
    ("unknown type", lambda: Constraint.json_schema({"type": "objectx"}), "objectx"),
    ("dangling $ref", lambda: Constraint.json_schema({"$ref": "#/definitions/nope"}), "nope"),
    ("unsupported keyword not", lambda: Constraint.json_schema({"not": {"type": "string"}}), "not"),
    ("unsupported keyword if", lambda: Constraint.json_schema({"type": "string", "if": {"minLength": 2}}), "if"),
    ("unknown format", lambda: Constraint.json_schema({"type": "string", "format": "uri-template"}), "format"),
    ("unsatisfiable bounds", lambda: Constraint.json_schema({"type": "integer", "minimum": 5, "maximum": 1}),
     "minimum"),
    ("remote $schema ref", lambda: Constraint.json_schema({"$ref": "http://example.com/s.json"}), "example.com"),
    ("huge enum", lambda: Constraint.json_schema({"enum": list(range(MAX_ENUM + 1))}), "enum"),
    ("deeply nested schema", lambda: Constraint.json_schema(nested(MAX_DEPTH + 5)), "nests deeper"),
    ("schema too large", lambda: Constraint.json_schema({"description": "x" * 70_000}), "characters"),
    ("pattern with look-ahead", lambda: Constraint.json_schema({"type": "string", "pattern": "a(?=b)"}),
     "look-around"),
    ("regex unclosed group", lambda: Constraint.regex("(ab"), "unclosed group"),
    ("regex back-reference", lambda: Constraint.regex(r"(a)\1"), "backreferences"),
    ("regex unknown class", lambda: Constraint.regex(r"\p{NoSuchClass}"), "Unicode property"),
    ("regex too long", lambda: Constraint.regex("a" * 5000), "at most"),
    ("empty regex", lambda: Constraint.regex(""), "non-empty"),
    ("grammar with no terminal", lambda: Constraint.grammar("start: start"), "reaches a terminal"),
    ("grammar with an unknown rule", lambda: Constraint.grammar("start: foo\nfoo: bar"), "bar"),
    ("GBNF with an undefined rule", lambda: Constraint.grammar('root ::= "a" missing'), "missing"),
    ("empty grammar", lambda: Constraint.grammar("   "), "non-empty"),
    ("choice not a list", lambda: Constraint.choice("yes"), "list of strings"),
    ("choice with a number", lambda: Constraint.choice(["a", 1]), "list of strings"),
    ("huge choice", lambda: Constraint.choice([f"c{i}" for i in range(MAX_ENUM + 1)]), "at most"),
]


@pytest.mark.parametrize(("what", "make", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_constraints_are_refused_naming_the_problem(what, make, words):
    with pytest.raises(ConstraintError) as info:
        compiler().compile(make())
    assert words.lower() in str(info.value).lower(), str(info.value)
    assert len(str(info.value)) < 600


def test_hostile_but_valid_constraints_compile_fast_and_never_stall():
    """Catastrophic-backtracking regexes are harmless to a derivative-based lexer; huge repetition counts
    compile lazily; each is bounded by the compile timeout either way."""
    for c in (Constraint.regex("(a+)+$"), Constraint.regex("(x+x+)+y"), Constraint.regex("(a|aa)*b{1000}{1000}"),
              Constraint.json_schema({"type": "array", "minItems": 100000, "items": {"type": "integer"}})):
        compiled = compiler().compile(c, timeout_s=30)
        assert compiled.new_state().error is None


def test_compile_cache_shares_one_compile_and_caches_failures():
    tok = tokenizer()
    gc = GrammarCompiler(tok, len(tok))
    c = Constraint.json_schema(SCHEMAS[3])
    results = []
    threads = [threading.Thread(target=lambda: results.append(gc.compile(c))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert gc.compiles == 1 and len({id(r) for r in results}) == 1
    assert gc.compile(Constraint.json_schema(json.loads(json.dumps(SCHEMAS[3])))) is results[0]  # same key
    bad = Constraint.regex("(ab")
    for _ in range(3):
        with pytest.raises(ConstraintError):
            gc.compile(bad)
    assert gc.compiles == 2


def test_a_slow_compile_times_out_for_its_own_request(monkeypatch):
    tok = tokenizer()
    gc = GrammarCompiler(tok, len(tok), timeout_s=0.2)
    release = threading.Event()
    real = gc._build
    monkeypatch.setattr(gc, "_build", lambda c: (release.wait(5), real(c))[1])
    with pytest.raises(ConstraintError, match="longer than 0.2 s"):
        gc.compile(Constraint.regex("slow+"))
    with pytest.raises(ConstraintError, match="longer than 0.2 s"):  # the event loop's way
        asyncio.run(gc.compile_async(Constraint.regex("slower+")))
    release.set()
    for c in (Constraint.regex("slow+"), Constraint.regex("slower+")):  # cached as failed: no second wait
        with pytest.raises(ConstraintError, match="longer than"):
            gc.compile(c, timeout_s=5)


# ---- through the engine ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path):
    eng = Engine.create(ModelConfig(path=str(tiny_llama_dir), quantize=False), EngineConfig(),
                        AdapterPoolConfig(device_slots=4, max_lora_rank=8))
    eng.start()
    yield eng
    eng.shutdown()


def test_engine_batch_of_constraints_every_finished_output_valid(engine):
    tok = engine.tokenizer
    prompt = tuple(tok.encode("Answer in JSON:"))
    reqs, checks = [], []
    for i, schema in enumerate(SCHEMAS):
        sampling = SamplingParams(max_new_tokens=96, temperature=1.0 if i % 2 else 0.0, seed=i)
        c = Constraint.json_schema(schema)
        if i % 2:  # compiled ahead, as the API faces do; the others compile inside submit
            engine.grammars.compile(c)
        reqs.append(GenerationRequest(f"js-{i}", prompt, sampling, constraint=c))
        checks.append(("json", schema))
    for i, (c, check) in enumerate([(Constraint.regex(r"[0-9]{2}-[a-c]{1,3}"), r"[0-9]{2}-[a-c]{1,3}"),
                                    (Constraint.choice(["north", "south", "east"]), "north|south|east"),
                                    (Constraint.grammar('root ::= "<" [a-d] ("," [a-d])? ">"'),
                                     r"<[a-d](,[a-d])?>")]):
        reqs.append(GenerationRequest(f"re-{i}", prompt, SamplingParams(max_new_tokens=32, temperature=1.0, seed=i),
                                      constraint=c))
        checks.append(("regex", check))
    reqs.append(GenerationRequest("free", prompt, SamplingParams(max_new_tokens=8, ignore_eos=True)))
    checks.append(("free", None))
    results = [collect(h) for h in engine.submit_group(reqs)]
    for r, (kind, check), req in zip(results, checks, reqs, strict=True):
        assert r.error is None, (req.request_id, r.error)
        if kind == "json":
            assert r.finish_reason is FinishReason.STOP, (req.request_id, r.text)
            jsonschema.validate(json.loads(r.text), check)
        elif kind == "regex":
            assert r.finish_reason is FinishReason.STOP and re.fullmatch(check, r.text), (req.request_id, r.text)
        else:
            assert r.finish_reason is FinishReason.LENGTH and len(r.token_ids) == 8


def test_engine_siblings_stop_strings_and_length(engine):
    prompt = tuple(engine.tokenizer.encode("Pick:"))
    compiled = Constraint.json_schema(SCHEMAS[15])
    siblings = [GenerationRequest(f"sib-{i}", prompt, SamplingParams(max_new_tokens=96, temperature=1.0, seed=i),
                                  constraint=compiled) for i in range(4)]
    short = GenerationRequest("short", prompt, SamplingParams(max_new_tokens=2), constraint=compiled)
    stopped = GenerationRequest("stopped", prompt, SamplingParams(max_new_tokens=96, stop=('"',)),
                                constraint=compiled)
    results = [collect(h) for h in engine.submit_group(siblings + [short, stopped])]
    for r in results[:4]:
        assert r.finish_reason is FinishReason.STOP
        jsonschema.validate(json.loads(r.text), SCHEMAS[15])
    assert results[4].finish_reason is FinishReason.LENGTH and len(results[4].token_ids) == 2
    assert results[5].finish_reason is FinishReason.STOP and results[5].text == "{"  # cut at the stop string


def test_engine_submit_refuses_a_bad_constraint_and_keeps_serving(engine):
    bad = GenerationRequest("bad-c", (5, 6), SamplingParams(max_new_tokens=4), constraint=Constraint.regex("(x"))
    good = GenerationRequest("good-c", (5, 6), SamplingParams(max_new_tokens=16),
                             constraint=Constraint.choice(["ok", "fine"]))
    with pytest.raises(ConstraintError, match="unclosed group"):
        engine.submit_group([good, bad])  # all or none
    assert collect(engine.submit(good)).text in ("ok", "fine")
