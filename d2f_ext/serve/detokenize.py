"""Final tokens to text deltas: a delta is sent only once no later token can change it."""

from __future__ import annotations

from typing import Sequence


class TextStream:
    """Decodes a request's output tokens as they become final. Text ending in an incomplete
    character (U+FFFD: a multi-token character split between steps) is held for the next tokens,
    and with stop strings, so does a tail that could be the start of one, as the output is cut
    before the stop string. ``finish`` returns the rest; the deltas add up to ``text``."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.tokens: list[int] = []
        self.sent = ""

    def _decode(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def feed(self, tokens: Sequence[int]) -> str:
        self.tokens.extend(tokens)
        text = self._decode().rstrip("\ufffd")
        if not text.startswith(self.sent):
            return ""
        end = len(text) - self._held(text)
        delta = text[len(self.sent):end] if end > len(self.sent) else ""
        self.sent += delta
        return delta

    def finish(self, tokens: Sequence[int], stopped: bool) -> str:
        """The rest of the text with the request's last ``tokens``; ``stopped``: it ended at a
        stop string, which the text is cut before."""
        self.tokens.extend(tokens)
        text = self._decode()
        if stopped:
            cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=len(text))
            text = text[:cut]
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta

    @property
    def text(self) -> str:
        return self.sent

    def _held(self, text: str) -> int:
        """Characters at the end of ``text`` that a stop string may start with."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s), len(text)), 0, -1):
                if text.endswith(s[:k]):
                    held = max(held, k)
                    break
        return held
