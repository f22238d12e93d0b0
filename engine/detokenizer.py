"""Incremental detokenization and stop-string matching for streamed outputs.

`IncrementalDetokenizer` turns one token at a time into text deltas. It decodes only a
small window: the tokens already emitted since the previous read point (the prefix, which
gives SentencePiece-style leading spaces their context) plus the new ones, and returns
the part of that decode beyond the prefix's text. While the decoded tail ends with U+FFFD
(a byte-level token carrying part of a multi-byte character) it holds the text back.

`StopChecker` sits after it: it holds back the text that could still become a stop
string and cuts the output right before the first stop string that appears.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from tokenizers.decoders import DecodeStream

logger = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Streams the text of generated tokens; the deltas add up to the full decode.

    Without `prompt_ids`, the concatenation of every `add` delta and `flush` equals
    `tokenizer.decode(generated_ids, skip_special_tokens=...)` exactly. With `prompt_ids`,
    the first tokens are decoded in the context of the prompt's last few tokens (as vLLM
    does), so a tokenizer that strips the leading space of a sequence keeps the space of a
    continuation; for byte-level BPE tokenizers both give the same text.

    A fast tokenizer whose wrapper adds nothing to the Rust decode (no clean-up of spaces)
    streams through the tokenizers library's own `DecodeStream`: one call into Rust per
    token, ~5x cheaper than two window decodes from Python. Others decode the window here.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self._skip_special_tokens = skip_special_tokens
        self._backend = _stream_backend(tokenizer)
        self._decode_ids = _decoder(tokenizer, self._backend)
        context = self._prompt_context(prompt_ids or [], skip_special_tokens)
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text: str | None = None  # decode of [prefix_offset, read_offset)
        self._text = ""
        self._stream = _decode_stream(context, skip_special_tokens, self._backend)

    def _prompt_context(self, prompt_ids: Sequence[int], skip_special: bool) -> list[int]:
        """The prompt's last few tokens, less any that begin inside a character (a
        byte-fallback decoder turns a whole byte run that starts mid-character into U+FFFD,
        which would read as the prompt ending inside one); none when the prompt does end
        inside a character (its text would leak out)."""
        context = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        while context and self._decode_ids(context, skip_special).startswith(
                _REPLACEMENT_CHAR):
            del context[0]
        if context and self._decode_ids(context, skip_special).endswith(_REPLACEMENT_CHAR):
            return []
        return context

    @property
    def text(self) -> str:
        """All text emitted so far (by `add` and `flush`)."""
        return self._text

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes (may be "")."""
        self._ids.append(token_id)
        if self._stream is not None:
            try:
                chunk = self._stream.step(self._backend, token_id)
            except Exception:  # the library refused its own state: go on by windows
                logger.debug("DecodeStream failed; decoding windows instead", exc_info=True)
                self._leave_stream()
            else:
                if chunk is None:
                    return ""
                self._prefix_offset = self._read_offset = len(self._ids)
                self._text += chunk
                return chunk
        prefix_text = self._prefix()
        window_text = self._decode(self._prefix_offset, len(self._ids))
        if len(window_text) <= len(prefix_text) or window_text.endswith(_REPLACEMENT_CHAR):
            return ""
        return self._emit(window_text[len(prefix_text) :])

    def flush(self) -> str:
        """Text held back at the end of the sequence (an unfinished character, say)."""
        if self._stream is not None and self._read_offset < len(self._ids):
            self._leave_stream()  # the held tokens, decoded here
        prefix_text = self._prefix()
        window_text = self._decode(self._prefix_offset, len(self._ids))
        if len(window_text) <= len(prefix_text):
            return ""
        return self._emit(window_text[len(prefix_text) :])

    def _leave_stream(self) -> None:
        """Decode by windows from here on: the tokens after the last emitted text, in the
        context of a few emitted ones."""
        self._stream = None
        self._prefix_offset = max(0, self._read_offset - _PROMPT_CONTEXT_TOKENS)
        self._prefix_text = None

    def _prefix(self) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        return self._prefix_text

    def _emit(self, delta: str) -> str:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = None
        self._text += delta
        return delta

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._decode_ids(self._ids[start:end], self._skip_special_tokens)


def _stream_backend(tokenizer: Any) -> Any:
    """The Rust tokenizer when `DecodeStream` gives exactly the wrapper's decode, else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    return backend


def _decode_stream(context: list[int], skip_special_tokens: bool, backend: Any) -> Any:
    """A `DecodeStream` primed with the prompt's last tokens, or None without a backend or
    with a tokenizers release whose stream takes no initial ids."""
    if backend is None:
        return None
    try:
        return DecodeStream(context, skip_special_tokens)
    except TypeError:
        return None


def _decoder(tokenizer: Any, backend: Any) -> Any:
    """`decode(ids, skip_special_tokens) -> str`: the Rust tokenizer's own decode when the
    transformers wrapper would add nothing to it (`backend`, from `_stream_backend`), which
    skips the wrapper's per-call conversions; else the wrapper's."""
    if backend is not None:
        return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


class StopChecker:
    """Cuts streamed text before the first stop string, which may span several deltas."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stops = [s for s in stop if s]
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def process(self, delta: str) -> tuple[str, bool]:
        """Feed new text; return (text safe to emit now, whether a stop string matched).

        Once stopped, later calls return ("", True).
        """
        if self._stopped:
            return "", True
        if not self._stops:
            return delta, False
        pending = self._pending + delta
        cut = self._first_stop(pending)
        if cut is not None:
            self._pending = ""
            self._stopped = True
            return pending[:cut], True
        hold = self._held_suffix_length(pending)
        self._pending = pending[len(pending) - hold :]
        return pending[: len(pending) - hold], False

    def flush(self) -> str:
        """Held-back text at the end of the stream; "" after a stop string matched."""
        held, self._pending = self._pending, ""
        return "" if self._stopped else held

    def _first_stop(self, text: str) -> int | None:
        positions = [index for s in self._stops if (index := text.find(s)) >= 0]
        return min(positions) if positions else None

    def _held_suffix_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for length in range(min(len(text), self._max_hold), 0, -1):
            suffix = text[len(text) - length :]
            if any(s.startswith(suffix) for s in self._stops):
                return length
        return 0
