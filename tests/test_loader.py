"""Model resolution, the embedded SmolLM2 conversion, GGUF conversion and EOS discovery."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from backend.loader import (
    CHATML_TEMPLATE,
    COMPLETE_MARKER,
    EMBEDDED_NAME,
    ModelLoadError,
    embedded_model_dir,
    eos_token_ids,
    load_tokenizer,
    resolve_model,
)
from config import Config, load_config

CHATML_TURN = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def _config(**overrides: object) -> Config:
    return load_config({}, **overrides)


def _write_tiny_gguf(path: Path) -> None:
    """A 1-layer llama GGUF with a 261-token byte-level tokenizer and a ChatML template."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values()]
    tokens += ["he", "ll"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(16)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["h e", "l l"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHATML_TEMPLATE)
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (len(tokens), 64),
        "blk.0.attn_q.weight": (64, 64),
        "blk.0.attn_k.weight": (32, 64),
        "blk.0.attn_v.weight": (32, 64),
        "blk.0.attn_output.weight": (64, 64),
        "blk.0.ffn_gate.weight": (128, 64),
        "blk.0.ffn_up.weight": (128, 64),
        "blk.0.ffn_down.weight": (64, 128),
    }
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        writer.add_tensor(name, np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    _write_tiny_gguf(path)
    return path


def _assert_clean_config(folder: str) -> dict:
    data = json.loads((Path(folder) / "config.json").read_text())
    assert "quantization_config" not in data
    assert isinstance(data["rope_theta"], float)
    assert (Path(folder) / COMPLETE_MARKER).is_file()
    assert list(Path(folder).glob("*.safetensors"))
    return data


def test_embedded_conversion_reloads_with_transformers(smollm2_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    data = _assert_clean_config(smollm2_dir)
    assert data["rope_theta"] == 100000.0
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([[1, 504, 3458]])).logits
    assert logits.shape == (1, 3, 49152)
    assert torch.isfinite(logits).all()


def test_embedded_tokenizer_renders_chatml_and_declares_im_end(
    smollm2_dir: str, model_cache_dir: str
) -> None:
    source = resolve_model(_config(model_cache_dir=model_cache_dir))
    assert source.path == smollm2_dir
    assert source.name == EMBEDDED_NAME
    tokenizer = load_tokenizer(source)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(text, str) and text.endswith(CHATML_TURN)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in eos_token_ids(source, tokenizer)
    assert tokenizer.eos_token == "<|im_end|>"


def test_embedded_model_is_converted_once(smollm2_dir: str, model_cache_dir: str) -> None:
    marker = Path(smollm2_dir) / COMPLETE_MARKER
    before = marker.stat().st_mtime_ns
    started = time.monotonic()
    assert embedded_model_dir(_config(model_cache_dir=model_cache_dir)) == smollm2_dir
    assert time.monotonic() - started < 1.0
    assert marker.stat().st_mtime_ns == before


def test_model_local_dir_wins_over_model_name(tiny_model_factory: Callable[[str], str]) -> None:
    llama, qwen3 = tiny_model_factory("llama"), tiny_model_factory("qwen3")
    source = resolve_model(_config(model_local_dir=llama, model_name=qwen3))
    assert source.path == str(Path(llama).resolve())
    assert source.hf_config.model_type == "llama"
    assert source.name == "llama"
    by_name = resolve_model(_config(model_name=qwen3))
    assert by_name.hf_config.model_type == "qwen3"


def test_gguf_path_is_converted_once_into_the_cache(tiny_gguf: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cache = tmp_path / "cache"
    source = resolve_model(_config(model_local_dir=str(tiny_gguf), model_cache_dir=str(cache)))
    assert Path(source.path).parent == cache / "converted"
    assert Path(source.path).name.startswith("tiny-llama-")
    assert source.name == "tiny-llama"
    _assert_clean_config(source.path)
    model = AutoModelForCausalLM.from_pretrained(source.path)
    assert model.config.num_hidden_layers == 1
    tokenizer = load_tokenizer(source)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == CHATML_TURN
    assert eos_token_ids(source, tokenizer) == (2,)

    marker = Path(source.path) / COMPLETE_MARKER
    before = marker.stat().st_mtime_ns
    again = resolve_model(_config(model_name=str(tiny_gguf), model_cache_dir=str(cache)))
    assert again.path == source.path
    assert marker.stat().st_mtime_ns == before

    replaced = tmp_path / "replaced.gguf"  # a file rewritten in place, same size: converted anew
    shutil.copy(tiny_gguf, replaced)
    first = resolve_model(_config(model_name=str(replaced), model_cache_dir=str(cache)))
    os.utime(replaced, ns=(time.time_ns(), replaced.stat().st_mtime_ns + 10**9))
    second = resolve_model(_config(model_name=str(replaced), model_cache_dir=str(cache)))
    assert second.path != first.path


def test_a_truncated_gguf_is_a_load_error_naming_it(tiny_gguf: Path, tmp_path: Path) -> None:
    """A download cut short fails with the file named and nothing left in the cache; the
    suffix is matched without regard to case."""
    cut = tmp_path / "CUT.GGUF"
    data = tiny_gguf.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="CUT.GGUF.*corrupt or incomplete"):
        resolve_model(_config(model_local_dir=str(cut), model_cache_dir=str(cache)))
    assert not [p for p in (cache / "converted").iterdir() if p.suffix != ".lock"]


def test_a_missing_path_says_so(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere")
    for flags in ({"model_local_dir": missing}, {"model_name": missing}):
        with pytest.raises(ModelLoadError, match="does not exist"):
            resolve_model(_config(**flags))


def test_interrupted_conversion_leftovers_are_replaced(tiny_gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = resolve_model(_config(model_local_dir=str(tiny_gguf), model_cache_dir=str(cache)))
    target = Path(first.path)
    shutil.rmtree(target)
    target.mkdir()
    (target / "config.json").write_text("{}")
    stale = target.parent / f".{target.name}.tmp-interrupted"
    stale.mkdir()
    source = resolve_model(_config(model_local_dir=str(tiny_gguf), model_cache_dir=str(cache)))
    assert source.path == str(target)
    _assert_clean_config(source.path)
    assert not stale.exists()


def test_concurrent_conversions_convert_once(
    tiny_gguf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(model_local_dir=str(tiny_gguf), model_cache_dir=str(tmp_path))
    paths: list[str] = []
    caplog.set_level(logging.INFO, logger="backend.loader")
    threads = [threading.Thread(target=lambda: paths.append(resolve_model(config).path))]
    threads.append(threading.Thread(target=lambda: paths.append(resolve_model(config).path)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(paths) == 2 and paths[0] == paths[1]
    assert sum("converting" in r.getMessage() for r in caplog.records) == 1
    leftovers = [p.name for p in (tmp_path / "converted").iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_dummy_format_needs_only_config_json(
    tmp_path: Path, tiny_model_factory: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    shutil.copy(Path(tiny_model_factory("qwen3")) / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match="no weights"):
        resolve_model(_config(model_local_dir=str(tmp_path)))
    source = resolve_model(_config(model_local_dir=str(tmp_path), load_format="dummy"))
    assert source.hf_config.model_type == "qwen3"
    with caplog.at_level(logging.WARNING, logger="backend.loader"):
        tokenizer = load_tokenizer(source)
    assert "no tokenizer files" in caplog.text
    assert tokenizer.eos_token == "<|im_end|>"


def test_bad_hub_id_offline_fails_fast_and_clearly() -> None:
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model") as info:
        resolve_model(_config(model_name="no-such-org/no-such-model"))
    assert time.monotonic() - started < 10.0
    assert "MODEL_LOCAL_DIR" in str(info.value)


def test_missing_local_paths_are_errors_not_hub_lookups(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="MODEL_LOCAL_DIR"):
        resolve_model(_config(model_local_dir=str(tmp_path / "absent")))
    with pytest.raises(ModelLoadError, match="MODEL_NAME"):
        resolve_model(_config(model_name=str(tmp_path / "absent" / "model.gguf")))
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(_config(model_local_dir=str(tmp_path)))


def test_eos_ids_merge_config_generation_config_and_tokenizer(
    tmp_path: Path, tiny_model_factory: Callable[[str], str], smollm2_tokenizer: Any
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = [7, 0]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5]}))
    source = resolve_model(_config(model_local_dir=str(folder)))
    assert eos_token_ids(source) == (7, 0, 5)
    assert eos_token_ids(source, smollm2_tokenizer) == (7, 0, 5, 2)
