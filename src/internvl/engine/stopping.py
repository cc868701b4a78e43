"""Streaming text for one generated sequence: UTF-8-safe incremental detokenization and stop strings.

Decoding follows `internvl.tokenizer.decode_keep_grounding` (INTERNVL.md §8.6): bos/eos/pad/unk, additional special
tokens and template control tokens (`<|im_end|>`, `<|end|>`, ...) are dropped, the nine InternVL tokens
(`<ref>`, `</ref>`, `<box>`, `</box>`, ...) are kept. The drop rule is per id, so filtering ids as they arrive and
decoding the kept ones equals decoding the whole sequence at the end.

Incremental decoding keeps two offsets into the kept ids: text is decoded over a small window that starts one
emission back (`prefix_offset`), so tokenizer rules that depend on the left context (SentencePiece's leading space,
byte-level merges) give the same characters as a full decode; the new text is the part of the window's decode past
the previous window's. A decode that ends in U+FFFD is an incomplete multibyte character (a byte token without its
continuation bytes): nothing is emitted until the character completes, so half a character is never sent.

Stop strings: text that could still be the start of a stop string is held back; once a stop string appears, the text
before it is emitted and the rest (the stop string included) never is. Held-back text that can no longer match is
released, and at the end of the sequence whatever is left is flushed.
"""

from __future__ import annotations

from collections.abc import Iterable

from internvl.tokenizer import _ids_to_drop

REPLACEMENT_CHAR = "\ufffd"


def dropped_ids(tokenizer) -> frozenset[int]:
    """Ids `decode_keep_grounding` removes (special and template control tokens, never the InternVL tokens)."""
    return frozenset(_ids_to_drop(tokenizer))


class IncrementalDetokenizer:
    """Token ids in, newly completed text out."""

    def __init__(self, tokenizer, drop: frozenset[int] | None = None):
        self.tokenizer = tokenizer
        self.drop = dropped_ids(tokenizer) if drop is None else drop
        self.ids: list[int] = []  # kept ids only
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Feed one token; return the text it completes ("" while a multibyte character is incomplete)."""
        if token_id in self.drop:
            return ""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of the sequence: whatever is still pending, even an incomplete character (as U+FFFD)."""
        if self.read_offset == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        delta = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta


class StopStrings:
    """Hold back possible stop-string prefixes; cut at the first stop string."""

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(stops)
        self.pending = ""
        self.matched: str | None = None

    def feed(self, text: str, enabled: bool = True) -> str:
        """Add text; return what is safe to emit now. After a match nothing more is emitted.

        enabled=False (before min_new_tokens) passes text through without matching.
        """
        if self.matched is not None:
            return ""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        if not enabled:
            out, self.pending = self.pending, ""
            return out
        best = None
        for stop in self.stops:
            i = self.pending.find(stop)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, stop)
        if best is not None:
            out = self.pending[: best[0]]
            self.pending, self.matched = "", best[1]
            return out
        hold = 0
        for stop in self.stops:  # longest suffix of pending that is a proper prefix of a stop string
            for k in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        """End of sequence: release held-back text (it can no longer become a stop string)."""
        out, self.pending = ("" if self.matched is not None else self.pending), ""
        return out


class SequenceText:
    """Detokenizer + stop strings for one sequence. `add` returns (text delta, matched stop string or None)."""

    def __init__(self, tokenizer, stops: Iterable[str] = (), drop: frozenset[int] | None = None):
        self.detok = IncrementalDetokenizer(tokenizer, drop)
        self.stops = StopStrings(stops)
        self.text = ""  # emitted text

    def add(self, token_id: int, check_stops: bool = True) -> tuple[str, str | None]:
        out = self.stops.feed(self.detok.add(token_id), enabled=check_stops)
        self.text += out
        return out, self.stops.matched

    def finish(self) -> tuple[str, str | None]:
        """End of sequence (not by a stop string): flush the detokenizer, then the held-back text."""
        if self.stops.matched is not None:
            return "", self.stops.matched
        out = self.stops.feed(self.detok.flush())
        if self.stops.matched is None:
            out += self.stops.flush()
        self.text += out
        return out, self.stops.matched
