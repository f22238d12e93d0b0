"""Token logprobs in OpenAI's two formats (chat and legacy completions).

`TokenTexts` turns a token id into its text and its exact bytes: byte-level BPE pieces
(GPT-2 style) and SentencePiece byte fallbacks (`<0xE4>`) map back to the raw bytes, so a
character split over several tokens shows its true bytes rather than a replacement character.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Any

from api.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from engine.request import TokenLogprob

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 byte values, inverted."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class TokenTexts:
    """Cached token id → (text, bytes) for one tokenizer; safe to share between threads."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._lock = threading.Lock()

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        with self._lock:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
            entry = (text, _piece_bytes(piece, text))
            self._cache[token_id] = entry
        return entry


def _piece_bytes(piece: Any, text: str) -> list[int]:
    if isinstance(piece, str) and piece:
        fallback = _BYTE_FALLBACK.match(piece)
        if fallback:
            return [int(fallback.group(1), 16)]
        decoder = byte_level_decoder()
        if "\ufffd" in text and all(ch in decoder for ch in piece):
            return [decoder[ch] for ch in piece]
    return list(text.encode("utf-8"))


def chat_logprobs(entries: list[TokenLogprob], texts: TokenTexts) -> ChatLogprobs:
    """`choices[].logprobs` of the chat API for these tokens."""
    content = []
    for entry in entries:
        text, raw = texts.get(entry.token_id)
        top = []
        for token_id, logprob in entry.top:
            top_text, top_raw = texts.get(token_id)
            top.append(TopLogprob(token=top_text, logprob=_finite(logprob), bytes=top_raw))
        content.append(
            ChatTokenLogprob(
                token=text, logprob=_finite(entry.logprob), bytes=raw, top_logprobs=top
            )
        )
    return ChatLogprobs(content=content)


def completion_logprobs(
    entries: list[TokenLogprob], texts: TokenTexts, start_offset: int
) -> CompletionLogprobs:
    """`choices[].logprobs` of the completions API; offsets count from `start_offset`.
    Each position's `top_logprobs` holds the sampled token too (up to `logprobs` + 1
    entries), as OpenAI's legacy API does."""
    out = CompletionLogprobs()
    offset = start_offset
    for entry in entries:
        text, _ = texts.get(entry.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(_finite(entry.logprob))
        # the sampled token first: tokens of the same text (partial UTF-8 bytes all read
        # U+FFFD) keep the first one's logprob
        top = {text: _finite(entry.logprob)}
        for token_id, logprob in entry.top:
            top.setdefault(texts.get(token_id)[0], _finite(logprob))
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(text)
    return out


def _finite(value: float) -> float:
    """JSON has no -inf: a probability of zero is reported as a very small logprob."""
    return value if value > -9999.0 else -9999.0
