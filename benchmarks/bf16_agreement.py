"""How far the native runner in a low precision drifts from HF transformers in float32.

    python3 -m benchmarks.bf16_agreement --config model_configs/qwen3-0.6b   # on a GPU
    python3 -m benchmarks.bf16_agreement --device cpu --prompts 2 --new-tokens 8 \\
        --config <tiny model folder>                                        # smoke run

A random-weight model is built from `--config` (a config.json folder), saved once, and loaded
by both sides. HF runs float32 greedy `generate` for the reference continuation and one
float32 forward over prompt + continuation for the reference logits. The native runner (its
default kernels on the device: Triton and CUDA graphs on CUDA) is then teacher-forced along
the same tokens in `--dtype`: prefill of the prompt, then one decode step per reference
token. Reported: the share of positions where its argmax equals the reference token (the
agreement rate), the same over the positions where the reference's top-1 margin is at least
DECISIVE_MARGIN (random weights give flat distributions, where any rounding flips near-ties),
and the largest and mean absolute logit difference; beside it the same figures of HF
transformers itself in `--dtype`, the yardstick for what the precision alone costs. Writes a
JSON beside the other results.
"""

from __future__ import annotations

import argparse
import importlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from backend.batch import build_forward_batch
from backend.sglang.runner import NativeRunner

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="model_configs/qwen3-0.6b",
                        help="folder with the config.json of the architecture")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--kernel-set", default=None,
                        help="the runner's kernel set (default: the device's)")
    parser.add_argument("--reference-ops", default="",
                        help="comma-separated ops taken from the torch reference set instead "
                             "(bisects which kernel costs precision)")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--kv-dtype", default="auto", choices=["auto", "fp8_e4m3"],
                        help="the native runner's KV pool (KV_CACHE_DTYPE)")
    return parser.parse_args(argv)


def mixed_kernel_set(base: str, reference_ops: list[str]) -> str:
    """Register and name a kernel set: `base` with `reference_ops` from torch_ops."""
    import sys
    import types

    from backend.sglang import kernels
    from backend.sglang.kernels import torch_ops

    base_module = importlib.import_module(kernels.KERNEL_SETS[base])
    mixed = types.ModuleType(f"{base_module.__name__}_with_reference_ops")
    for name in dir(base_module):
        if not name.startswith("_"):
            setattr(mixed, name, getattr(base_module, name))
    for name in reference_ops:
        setattr(mixed, name, getattr(torch_ops, name))
    sys.modules[mixed.__name__] = mixed
    kernels.KERNEL_SETS[mixed.__name__] = mixed.__name__
    return mixed.__name__


def build_model(config_dir: str, folder: Path, seed: int) -> None:
    """Random float32 weights for the architecture, saved as a HF folder."""
    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(folder))


def teacher_forced_logits(runner: NativeRunner, tokens: list[int], prompt_len: int) -> torch.Tensor:
    """float32 logits [len(tokens) - prompt_len + 1, vocab]: after the prompt, then after each
    following token, through prefill and decode steps. Each row is copied at once: a CUDA
    graph replay returns a view of its static output, which the next replay overwrites."""
    device = runner.device
    slots = list(range(1, len(tokens) + 1))
    batch = build_forward_batch([tokens[:prompt_len]], [0], [slots[:prompt_len]], [True], device)
    rows = [runner.forward(batch)[0].to(torch.float32, copy=True)]
    for position in range(prompt_len, len(tokens)):
        batch = build_forward_batch([[tokens[position]]], [position], [slots[: position + 1]],
                                    [True], device)
        rows.append(runner.forward(batch)[0].to(torch.float32, copy=True))
    return torch.stack(rows)


DECISIVE_MARGIN = 0.5  # logits between the reference's first and second choice


class Agreement:
    """Running agreement and logit-difference figures of one side against the reference."""

    def __init__(self) -> None:
        self.agree = self.positions = 0
        self.decisive_agree = self.decisive = 0
        self.max_diff = self.total_diff = 0.0

    def add(self, logits: torch.Tensor, ref_logits: torch.Tensor, expected: torch.Tensor) -> None:
        hits = logits.argmax(-1) == expected
        top2 = ref_logits.topk(2, dim=-1).values
        decisive = (top2[:, 0] - top2[:, 1]) >= DECISIVE_MARGIN
        self.agree += int(hits.sum())
        self.positions += expected.numel()
        self.decisive_agree += int((hits & decisive).sum())
        self.decisive += int(decisive.sum())
        diff = (logits - ref_logits).abs()
        self.max_diff = max(self.max_diff, float(diff.max()))
        self.total_diff += float(diff.mean()) * expected.numel()

    def summary(self) -> dict[str, Any]:
        return {
            "positions": self.positions, "agreement_rate": self.agree / self.positions,
            "decisive_positions": self.decisive,
            "decisive_agreement_rate": self.decisive_agree / max(self.decisive, 1),
            "max_abs_logit_diff": self.max_diff,
            "mean_abs_logit_diff": self.total_diff / self.positions,
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build_model(args.config, folder, args.seed)
        reference: Any = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        reference = reference.to(device).eval()
        hf_low: Any = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        hf_low = hf_low.to(device).eval()
        config = AutoConfig.from_pretrained(str(folder))
        kernel_set = args.kernel_set
        if args.reference_ops:
            from backend.sglang.kernels import default_kernel_set

            kernel_set = mixed_kernel_set(kernel_set or default_kernel_set(device),
                                          args.reference_ops.split(","))
        runner = NativeRunner(str(folder), config, dtype=dtype, device=device,
                              num_kv_slots=args.prompt_len + args.new_tokens + 8,
                              kernel_set=kernel_set,
                              cuda_graph=device.type == "cuda" and not args.eager,
                              kv_dtype=torch.float8_e4m3fn if args.kv_dtype == "fp8_e4m3"
                              else None)
        generator = torch.Generator().manual_seed(args.seed)
        native, hf = Agreement(), Agreement()
        start = time.perf_counter()
        for _ in range(args.prompts):
            prompt = torch.randint(10, config.vocab_size - 1, (args.prompt_len,),
                                   generator=generator).tolist()
            with torch.inference_mode():
                out = reference.generate(
                    torch.tensor([prompt], device=device), max_new_tokens=args.new_tokens,
                    do_sample=False, eos_token_id=[], pad_token_id=0)
                tokens = out[0].tolist()
                ref_logits = reference(out).logits[0, args.prompt_len - 1 : -1].float()
                hf_logits = hf_low(out).logits[0, args.prompt_len - 1 : -1].float()
                ours = teacher_forced_logits(runner, tokens, args.prompt_len)[:-1]
            expected = torch.tensor(tokens[args.prompt_len :], device=device)
            native.add(ours, ref_logits, expected)
            hf.add(hf_logits, ref_logits, expected)
    result = {
        "config": args.config, "device": str(device), "dtype": args.dtype,
        "kv_dtype": args.kv_dtype,
        "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "kernel_set": kernel_set, "cuda_graph": device.type == "cuda" and not args.eager,
        "decisive_margin": DECISIVE_MARGIN, **native.summary(),
        "hf_same_dtype": hf.summary(), "seconds": time.perf_counter() - start,
    }
    print(json.dumps(result, indent=2))
    native_name = "native" if args.kv_dtype == "auto" else f"native (KV {args.kv_dtype})"
    for name, side in ((native_name, native), (f"HF {args.dtype}", hf)):
        figures = side.summary()
        print(f"SUMMARY bf16_agreement: {args.dtype} {name} vs float32 HF: agreement "
              f"{figures['agreement_rate']:.4f} over {figures['positions']} positions "
              f"({figures['decisive_agreement_rate']:.4f} over the "
              f"{figures['decisive_positions']} with a top-1 margin >= {DECISIVE_MARGIN}), "
              f"max |logit diff| {figures['max_abs_logit_diff']:.4f}, "
              f"mean {figures['mean_abs_logit_diff']:.5f}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"bf16_agreement-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
