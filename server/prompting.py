"""Prompt text and chat messages -> token ids, for the gRPC and HTTP APIs alike, within bounds.

Bounds (issue 16 item 6): a text longer than CHARS_PER_TOKEN_BOUND characters per context token is
refused before tokenizing; at most MAX_MESSAGES chat messages (and never more than the context limit,
every message renders to at least one token); the rendered chat is bounded the same way. Rendering
the chat template is jinja and runs without the lock; only the tokenizer itself (not safe to share
between threads) is used under one lock per tokenizer, shared by both APIs.
"""

from __future__ import annotations

import threading
import weakref

from server.engine.request import InvalidRequest

MAX_MESSAGES = 1024
CHARS_PER_TOKEN_BOUND = 32

_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def tokenizer_lock(tokenizer: object) -> threading.Lock:
    """The one lock every API holds while it uses `tokenizer`."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(tokenizer)
        if lock is None:
            lock = _LOCKS[tokenizer] = threading.Lock()
        return lock


class PromptTokenizer:
    def __init__(self, tokenizer: object, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.lock = tokenizer_lock(tokenizer)

    @property
    def char_limit(self) -> int:
        return self.max_model_len * CHARS_PER_TOKEN_BOUND

    @property
    def max_messages(self) -> int:
        return min(MAX_MESSAGES, self.max_model_len)

    def encode(self, text: str) -> list[int]:
        if len(text) > self.char_limit:
            raise InvalidRequest(f"the prompt has {len(text)} characters; the limit is {self.char_limit} "
                                 f"(context limit {self.max_model_len} tokens)")
        with self.lock:
            return list(self.tokenizer.encode(text))

    def check_message_count(self, n: int) -> None:
        if n > self.max_messages:
            raise InvalidRequest(f"{n} messages; at most {self.max_messages} are accepted")

    def chat(self, messages: list[dict], no_template_hint: str, tools: list[dict] | None = None) -> list[int]:
        """Token ids of `messages` ({"role", "content"}) rendered by the chat template with the generation prompt
        (what apply_chat_template(tokenize=True) gives); `tools` (OpenAI function tools) go to the template."""
        self.check_message_count(len(messages))
        limit = self.char_limit
        if sum(len(m["content"]) for m in messages) > limit:
            raise InvalidRequest(f"the messages have more than {limit} characters (context limit "
                                 f"{self.max_model_len} tokens)")
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest(f"this model has no chat template; {no_template_hint}")
        try:  # jinja, not the shared tokenizer: no lock held while it runs
            rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                          **({"tools": tools} if tools else {}))
        except Exception as exc:  # the template itself may refuse (e.g. roles out of order)
            from server.clip import clip

            raise InvalidRequest(f"the chat template refused the messages: {clip(str(exc))}") from None
        if len(rendered) > limit:
            raise InvalidRequest(f"the rendered chat has {len(rendered)} characters; the limit is {limit} "
                                 f"(context limit {self.max_model_len} tokens)")
        with self.lock:  # as apply_chat_template(tokenize=True) does: no special tokens added
            return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])
