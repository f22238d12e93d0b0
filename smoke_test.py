"""Quick sanity check: load the configured model, stream one answer, print its timings.

    python3 smoke_test.py --max-new-tokens 32 "Hello mini-sglang"

The model comes from the usual flags (MODEL_LOCAL_DIR / MODEL_NAME, default: the embedded
SmolLM2-135M-Instruct). The prompt goes through the chat template unless `--raw` is given.
Exits non-zero when nothing was generated.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field

from backend.factory import create_engine
from config import ConfigError, get_config
from engine.base import EngineBase, Prompt
from engine.request import StreamDelta, Usage
from engine.sampling_params import InvalidRequestError, SamplingParams

logger = logging.getLogger("smoke_test")


@dataclass
class StreamTimings:
    """Arrival times of one streamed answer, measured from submission."""

    start: float
    first_token: float | None = None
    last_token: float | None = None
    num_tokens: int = 0
    finish_reason: str = ""
    usage: Usage | None = None
    error: str | None = None
    text: list[str] = field(default_factory=list)

    def record(self, delta: StreamDelta, now: float) -> None:
        if delta.token_ids:
            if self.first_token is None:
                self.first_token = now
            self.last_token = now
            self.num_tokens += len(delta.token_ids)
        self.text.append(delta.text)
        if delta.finished:
            self.finish_reason = delta.finish_reason or ""
            self.usage = delta.usage
            self.error = delta.error

    @property
    def ttft_s(self) -> float:
        return (self.first_token or time.perf_counter()) - self.start

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first, per second after the first arrived."""
        if self.first_token is None or self.last_token is None or self.num_tokens < 2:
            return 0.0
        elapsed = self.last_token - self.first_token
        return (self.num_tokens - 1) / elapsed if elapsed > 0 else 0.0


def stream_answer(engine: EngineBase, prompt: Prompt, params: SamplingParams) -> StreamTimings:
    """Stream `prompt`'s answer to stdout as it arrives; return its timings."""
    timings = StreamTimings(start=time.perf_counter())
    for delta in engine.stream(prompt, params):
        timings.record(delta, time.perf_counter())
        if delta.text:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return timings


def print_summary(timings: StreamTimings, total_s: float) -> None:
    usage = timings.usage or Usage(0, timings.num_tokens, 0)
    print("--- summary ---")
    print(f"prompt tokens:     {usage.prompt_tokens}")
    print(f"cached tokens:     {usage.cached_tokens}")
    print(f"generated tokens:  {usage.completion_tokens}")
    print(f"time to first tok: {timings.ttft_s * 1000:.1f} ms")
    print(f"decode speed:      {timings.decode_tok_s:.1f} tok/s")
    print(f"total time:        {total_s:.2f} s")
    print(f"finish reason:     {timings.finish_reason or '-'}")


def build_prompt(text: str, raw: bool) -> Prompt:
    return text if raw else [{"role": "user", "content": text}]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="*", help="prompt text (default: 'Hello mini-sglang')")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = get_config()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed
    )
    try:
        params.validate()
    except InvalidRequestError as exc:
        logger.error("%s", exc)
        return 2
    text = " ".join(args.prompt) or "Hello mini-sglang"
    load_start = time.perf_counter()
    try:
        engine = create_engine(config)
    except (RuntimeError, ValueError) as exc:  # the model did not load (ModelLoadError, ...)
        logger.error("%s", exc)
        return 1
    logger.info(
        "loaded %s on %s (%s) in %.1f s",
        engine.model_name, engine.device_name, engine.dtype_name,
        time.perf_counter() - load_start,
    )
    try:
        start = time.perf_counter()
        timings = stream_answer(engine, build_prompt(text, args.raw), params)
        print_summary(timings, time.perf_counter() - start)
    except InvalidRequestError as exc:  # e.g. prompt + max_new_tokens past the context
        logger.error("%s", exc)
        return 2
    finally:
        engine.shutdown()
    if timings.error:
        logger.error("generation failed: %s", timings.error)
        return 1
    if timings.num_tokens == 0:
        logger.error("nothing was generated")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
