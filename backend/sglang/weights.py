"""Fill a native model's parameters: from a safetensors checkpoint, or random (dummy).

Checkpoint names are Hugging Face's; q/k/v and gate/up land in row slices of the merged
`qkv_proj` / `gate_up_proj` parameters (see `MergedLinear.shard_rows`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from backend.sglang.layers import CausalLM, MergedLinear, RMSNorm

logger = logging.getLogger(__name__)

_MERGED_SHARDS: dict[str, tuple[str, str]] = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(model_path: str) -> list[str]:
    """The safetensors files of a HF folder: those its index names, else model*.safetensors,
    else every *.safetensors (a folder may also hold non-HF files like consolidated.*)."""
    index_path = os.path.join(model_path, _INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        found = sorted(n for n in os.listdir(model_path) if n.endswith(".safetensors"))
        names = [n for n in found if n.startswith("model")] or found
    if not names:
        raise FileNotFoundError(f"no *.safetensors weights in {model_path}")
    return [os.path.join(model_path, n) for n in names]


def _iter_tensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def _count_tensors(files: list[str]) -> int:
    total = 0
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            total += len(list(f.keys()))
    return total


def _target(name: str) -> tuple[str, str | None]:
    """Our parameter name for a checkpoint name, and the merged shard it fills if any."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in _MERGED_SHARDS:
        merged, shard = _MERGED_SHARDS[parts[-2]]
        return ".".join([*parts[:-2], merged, parts[-1]]), shard
    return name, None


def _expected(model: CausalLM) -> set[tuple[str, str | None]]:
    expected: set[tuple[str, str | None]] = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, MergedLinear):
                expected.update((full, shard) for shard in module.shard_rows)
            else:
                expected.add((full, None))
    return expected


def load_weights(model: CausalLM, model_path: str) -> None:
    """Copy every checkpoint tensor into `model` (cast to its dtype and device).

    Raises ValueError when a parameter of the model is missing from the checkpoint or a
    tensor's shape does not match.
    """
    files = checkpoint_files(model_path)
    params = dict(model.named_parameters())
    missing = _expected(model)
    tied = model.lm_head is None
    with torch.no_grad():
        for name, tensor in tqdm(_iter_tensors(files), total=_count_tensors(files),
                                 desc="Loading weights", unit="tensor", leave=False):
            if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                continue
            target, shard = _target(name)
            if target not in params:
                logger.warning("checkpoint tensor %s has no place in the model; skipped", name)
                continue
            _copy_into(model, params[target], target, shard, tensor)
            missing.discard((target, shard))
    if missing:
        names = sorted(f"{n}[{s}]" if s else n for n, s in missing)
        raise ValueError(f"checkpoint {model_path} lacks {len(names)} tensors: {names[:8]}")


def _copy_into(model: nn.Module, param: torch.Tensor, target: str, shard: str | None,
               tensor: torch.Tensor) -> None:
    destination = param
    if shard is not None:
        module = model.get_submodule(target.rsplit(".", 1)[0])
        assert isinstance(module, MergedLinear)
        start, end = module.shard_rows[shard]
        destination = param[start:end]
    if destination.shape != tensor.shape:
        raise ValueError(
            f"{target}{f'[{shard}]' if shard else ''}: checkpoint shape {tuple(tensor.shape)} "
            f"!= model shape {tuple(destination.shape)}"
        )
    destination.copy_(tensor)


def init_dummy_weights(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Random weights for benchmarks: normal(0, std) everywhere, norms at 1.0.

    Deterministic for a given seed, dtype and device type.
    """
    generator_device = "cuda" if any(p.is_cuda for p in model.parameters()) else "cpu"
    generator = torch.Generator(device=generator_device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                if isinstance(module, RMSNorm):
                    param.fill_(1.0)
                elif param.device.type == generator_device:
                    param.normal_(0.0, std, generator=generator)
                else:
                    cpu = torch.empty(param.shape, dtype=torch.float32)
                    param.copy_(cpu.normal_(0.0, std, generator=generator))
