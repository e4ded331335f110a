"""One sequence's grammar state: an llguidance matcher advanced as the sequence's tokens are accepted."""

from __future__ import annotations

from server.structured.constraint import short


class GrammarState:
    """The matcher of one constrained sequence (engine thread only, after it was made).

    `done`: the grammar cannot continue (complete; only EOS could follow): the sequence ends with `stop`.
    `error`: the matcher failed (a token it forbade, a resource limit hit mid-way); the sequence fails.
    """

    __slots__ = ("matcher", "matcher_vocab")

    def __init__(self, matcher, matcher_vocab: int) -> None:
        self.matcher = matcher  # llguidance.LLMatcher, this sequence's own copy
        self.matcher_vocab = matcher_vocab  # tokens its bitmask covers (>= the model's vocabulary)

    def accept(self, token: int) -> bool:
        """Advance past `token`; False when the grammar forbids it (the matcher is then in its error state)."""
        return bool(self.matcher.consume_token(token))

    @property
    def done(self) -> bool:
        return bool(self.matcher.is_stopped()) and not self.matcher.is_error()

    @property
    def accepting(self) -> bool:
        return bool(self.matcher.is_accepting())

    @property
    def error(self) -> str | None:
        if not self.matcher.is_error():
            return None
        return f"the output constraint failed: {short(self.matcher.get_error())}"
