"""Streaming text out of generated tokens: incremental detokenization and stop strings.

Two things make streaming harder than decoding at the end:
- a byte-level token may hold only part of a UTF-8 character, and decoding it
  alone gives U+FFFD; so text is held until it no longer ends in U+FFFD;
- a stop string may arrive split over several tokens; so text that could be
  the start of a stop string is held until the next tokens settle it.
"""

from collections.abc import Iterable, Sequence

from tandem.engine.errors import EngineError

# Tokens of the prompt decoded together with the output, so that the first
# output token keeps the leading space a SentencePiece-style decoder drops
# from the start of a sequence (the same trick vLLM and TGI use).
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns token ids pushed one by one into text pieces that are safe to show.

    The text is decoded over a short sliding window: `_prefix` marks where the
    window starts and `_read` where the text already emitted ends, so every
    step decodes only a few tokens however long the output grows.
    """

    def __init__(self, tokenizer, context_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        context = [int(t) for t in context_ids][-_CONTEXT_TOKENS:]
        # A prompt that ends inside a UTF-8 character would make the window's
        # first text end in U+FFFD and later text fail to line up; use less context then.
        while context and self._decode(context).endswith(_REPLACEMENT):
            context = context[1:]
        self._ids: list[int] = context
        self._prefix = 0
        self._read = len(context)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(
            list(ids), skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False
        )

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became complete (often "")."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Return whatever is still held (at the end of generation an unfinished character is U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :]


class StopStringMatcher:
    """Finds stop strings in streamed text and holds back what might start one.

    Invariant: no stop string starts inside the text already released, because
    every release keeps back the longest tail of the text that is a prefix of a
    stop string; so searching only the held text finds every match.
    """

    def __init__(self, stop_strings: Iterable[str] = ()) -> None:
        stops = tuple(stop_strings)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise EngineError(f"stop strings must be non-empty strings, got {s!r}")
        self.stop_strings = stops
        self._held = ""
        self.matched: str | None = None

    def _held_back_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stop_strings:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text now safe to release, whether a stop string was found).

        On a match the released text ends right before the earliest stop string
        and everything after it is dropped.
        """
        if self.matched is not None:
            raise EngineError("text pushed after a stop string already matched")
        self._held += text
        first, found = -1, None
        for stop in self.stop_strings:
            at = self._held.find(stop)
            if at >= 0 and (first < 0 or at < first):
                first, found = at, stop
        if found is not None:
            self.matched = found
            out, self._held = self._held[:first], ""
            return out, True
        keep = self._held_back_len(self._held)
        cut = len(self._held) - keep
        out, self._held = self._held[:cut], self._held[cut:]
        return out, False

    def flush(self) -> str:
        """Release the held text: the output ended, so it did not become a stop string."""
        out, self._held = self._held, ""
        return out


class TextStream:
    """Detokenizer and stop strings together: push token ids, get text pieces to show."""

    def __init__(self, tokenizer, stop_strings: Iterable[str] = (), context_ids: Sequence[int] = ()) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, context_ids)
        self._stops = StopStringMatcher(stop_strings)
        self.stopped = False

    @property
    def matched_stop(self) -> str | None:
        return self._stops.matched

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text safe to show. Sets `stopped` on a stop string."""
        if self.stopped:
            raise EngineError("token pushed after the stream stopped")
        piece = self._detok.push(token_id)
        if not piece:
            return ""
        out, self.stopped = self._stops.push(piece)
        return out

    def flush(self) -> str:
        """The remaining text once generation ends without a stop string."""
        if self.stopped:
            return ""
        out, self.stopped = self._stops.push(self._detok.flush())
        if self.stopped:
            return out
        return out + self._stops.flush()
