"""Structured output: constraints (JSON schema, any JSON object, regex, choice, grammar) held per sequence.

constraint.py  what a request asks for (a frozen, hashable value) and its bounds (validation before compiling)
compiler.py    (tokenizer, constraint) -> a compiled grammar, cached, built on a worker thread off the step loop
state.py       one sequence's matcher, advanced as its tokens are accepted
masks.py       the batched vocabulary bitmask of the constrained rows of a step, applied to the logits
openai_fields.py  OpenAI / vLLM request fields (response_format, guided_*, structured_outputs) -> a constraint
proto_fields.py   the gRPC GenerateRequest.constraint (OutputConstraint) -> a constraint
The grammar engine is llguidance (see README, "Structured output").
"""
