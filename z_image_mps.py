"""Generate images with Z-Image-Turbo (or any diffusers image pipeline) from the command line.

    python3 z_image_mps.py -p "a lighthouse at dawn, oil painting" --aspect 16:9 --seed 7
    python3 z_image_mps.py -p "a red fox" --num-images 4 --outdir out/ --model-dir ./z-image

Device: MPS, then CUDA, then CPU (--device to choose). Defaults follow Z-Image-Turbo: 9
scheduler steps (8 transformer evaluations), guidance 0.0, 1024x1024, bf16 on a GPU. Writes
PNG files: --output for one image (numbered when there are several), else --outdir.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from backend.diffusion.images import (
    ASPECT_PRESETS,
    DEFAULT_SIZE,
    ImageRequest,
    ImageRequestError,
    generate_images,
    load_pipeline,
    validate,
)

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
MAX_IMAGES = 16


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-p", "--prompt", required=True)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("-s", "--steps", type=int, default=None,
                        help="scheduler steps (Z-Image default 9)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance (Z-Image-Turbo default 0.0)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--aspect", choices=sorted(ASPECT_PRESETS), default=None,
                        help="a size preset (overrides --height/--width)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("-o", "--output", default=None, help="PNG path (numbered if several)")
    parser.add_argument("--outdir", default=".", help="folder for the PNGs without --output")
    parser.add_argument("--device", default="auto", choices=["auto", "mps", "cuda", "cpu"])
    parser.add_argument("--attention-backend", default="",
                        help="diffusers attention backend of the transformer")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    parser.add_argument("--cpu-offload", action="store_true",
                        help="offload idle pipeline parts to the CPU (CUDA)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id of the pipeline")
    parser.add_argument("--model-dir", default=None, help="local pipeline folder (wins)")
    return parser.parse_args(argv)


def output_paths(args: argparse.Namespace, count: int, seed: int) -> list[Path]:
    if args.output:
        path = Path(args.output)
        if count == 1:
            return [path]
        return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(count)]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return [Path(args.outdir) / f"z-image-{stamp}-seed{seed}-{i}.png" for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    width, height = ASPECT_PRESETS[args.aspect] if args.aspect else (
        args.width or DEFAULT_SIZE, args.height or DEFAULT_SIZE)
    seed = args.seed if args.seed is not None else int(torch.seed() % 2**31)
    request = ImageRequest(prompt=args.prompt, n=args.num_images, width=width, height=height,
                           steps=args.steps, guidance_scale=args.guidance_scale,
                           negative_prompt=args.negative_prompt, seed=seed)
    try:
        validate(request, MAX_IMAGES)
    except ImageRequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = pick_device(args.device)
    dtype = torch.float32 if device.type == "cpu" else (
        torch.float16 if device.type == "mps" else torch.bfloat16)
    pipeline = load_pipeline(args.model_dir or args.model, device, dtype,
                             attention_backend=args.attention_backend,
                             compile_transformer=args.compile, cpu_offload=args.cpu_offload)
    start = time.perf_counter()
    images = generate_images(pipeline, request, device, progress=True)
    elapsed = time.perf_counter() - start
    for image, path in zip(images, output_paths(args, len(images), seed), strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(f"wrote {path} ({image.width}x{image.height})")
    print(f"{len(images)} image(s) in {elapsed:.1f} s on {device} ({dtype}), seed {seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
