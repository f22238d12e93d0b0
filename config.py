"""Every flag of mini-sglang: one typed table, read from the environment once, validated.

`load_config()` reads the environment, resolves nothing device-specific and raises
`ConfigError` naming the flag when a value is bad. `get_config()` caches the result for the
process. Components take the frozen `Config` (or a `dataclasses.replace` copy) as an
argument; nothing below this module reads `os.environ` for a flag. Every flag is documented
in docs/CONFIGURATION.md (a test keeps the two in step).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch


class ConfigError(ValueError):
    """A flag has a value that cannot be used; the message names the flag."""


@dataclass(frozen=True)
class Parser:
    """Reads a flag's raw text into its value (ValueError when it cannot); `accepts` says
    what it takes, as the values column of docs/CONFIGURATION.md."""

    read: Callable[[str], Any]
    accepts: str

    def __call__(self, raw: str) -> Any:
        return self.read(raw)


def _read_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected 0/1/true/false, got {raw!r}")


_parse_bool = Parser(_read_bool, "0, 1")


def _choice(*options: str) -> Parser:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError(f"expected one of {'|'.join(options)}, got {raw!r}")
        return value

    return Parser(parse, ", ".join(options))


def _int_at_least(low: int, high: int | None = None) -> Parser:
    def parse(raw: str) -> int:
        value = int(raw)
        if value < low:
            raise ValueError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise ValueError(f"must be <= {high}, got {value}")
        return value

    return Parser(parse, f"integer ≥ {low}" if high is None
                  else f"integer {low}-{high}")


def _read_fraction(raw: str) -> float:
    value = float(raw)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"must be in (0, 1], got {value}")
    return value


def _read_non_negative_float(raw: str) -> float:
    value = float(raw)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"must be a finite number >= 0, got {value}")
    return value


def _read_positive_float(raw: str) -> float:
    value = float(raw)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be a finite number > 0, got {value}")
    return value


_fraction = Parser(_read_fraction, "number in (0, 1]")
_non_negative_float = Parser(_read_non_negative_float, "number ≥ 0")
_positive_float = Parser(_read_positive_float, "number > 0")
_text = Parser(str.strip, "text")


@dataclass(frozen=True)
class Flag:
    """One environment flag: its name, the Config field it fills, its parser and default."""

    env: str
    attr: str
    parse: Parser
    default: str
    doc: str


FLAGS: tuple[Flag, ...] = (
    # Model
    Flag("MODEL_NAME", "model_name", _text, "",
         "Hugging Face hub id, local folder or .gguf file; empty = the embedded "
         "SmolLM2-135M-Instruct."),
    Flag("MODEL_LOCAL_DIR", "model_local_dir", _text, "",
         "Local Hugging Face format folder or .gguf file; wins over MODEL_NAME."),
    Flag("MODEL_CACHE_DIR", "model_cache_dir", _text, "~/.cache/mini-sglang",
         "Where converted models (GGUF to safetensors) are kept."),
    Flag("LOAD_FORMAT", "load_format", _choice("auto", "dummy"), "auto",
         "`dummy`: architecture from config.json, random weights (benchmarks)."),
    Flag("TRUST_REMOTE_CODE", "trust_remote_code", _parse_bool, "0",
         "Pass trust_remote_code=True to transformers loaders (operator opt-in)."),
    Flag("DTYPE", "dtype", _choice("auto", "float32", "bfloat16", "float16"), "auto",
         "Weights and KV dtype; auto = bfloat16 on CUDA, float16 on MPS; on CPU float32 "
         "activations for the int8 C decoder (WEIGHT_QUANT, CPU_KERNEL, KV_CACHE_DTYPE; "
         "not for a model served by transformers), else bfloat16 on "
         "CPUs with native bfloat16 (AVX512-BF16/AMX), float32 otherwise (mlx: the weights' "
         "own dtype)."),
    Flag("DEVICE", "device", _choice("auto", "cpu", "cuda", "mps"), "auto",
         "Device; auto picks CUDA, then MPS, then CPU."),
    Flag("BACKEND_IMPL", "backend_impl", _choice("auto", "sgl", "hf", "torch", "mlx"), "auto",
         "Runner: sgl/torch = native paged runner, hf = transformers model on the same "
         "paged cache, mlx = mlx-lm (its own engine; `pip install 'mlx[cpu]' mlx-lm` on "
         "Linux); auto = mlx on Apple Silicon when mlx and mlx-lm import, DEVICE is auto "
         "or mps and LOAD_FORMAT is not dummy, else native when the architecture is "
         "supported, else hf."),
    Flag("WEIGHT_QUANT", "weight_quant", _choice("auto", "none", "int8", "int4"), "auto",
         "Weight-only quantization of the native runner's matmuls (CPU): int8 per output "
         "channel, int4 in groups of 32 (LM head int8); auto = int8 on CPU unless DTYPE is "
         "float32 (int4 is faster but less accurate), none on CUDA/MPS."),
    Flag("CPU_KERNEL", "cpu_kernel", _choice("auto", "c", "torch"), "auto",
         "CPU forward of the native runner with int8 weights: c = the whole decoder stack in "
         "one compiled C call per step (built once per host into MODEL_CACHE_DIR/kernels "
         "with $CC, else cc, gcc or clang), torch = torch ops; auto = c when it builds (and, "
         "built without OpenMP, only with one torch thread), else torch."),
    Flag("NUM_THREADS", "num_threads", _int_at_least(0), "0",
         "torch intra-op threads on CPU; 0 = torch's default."),
    Flag("SEED", "seed", _int_at_least(0), "0", "Seed of the engine's default generator."),
    Flag("OVERLAP_SCHEDULE", "overlap_schedule", _choice("auto", "on", "off"), "auto",
         "Overlap scheduling: the host reads step N's tokens and prepares step N+1 while the "
         "device runs (one wait per step, for the sampled ids); auto = on for CUDA, off "
         "elsewhere (a synchronous device gains nothing)."),
    Flag("CUDA_GRAPH", "cuda_graph", _parse_bool, "1",
         "Replay decode steps of the native runner from CUDA graphs (CUDA, triton kernels); "
         "captured at start-up."),
    Flag("CUDA_GRAPH_MAX_BS", "cuda_graph_max_bs", _int_at_least(1), "256",
         "Largest decode batch run from a CUDA graph (buckets 1, 2, 4, 8, then every 16); "
         "larger batches run eagerly."),
    Flag("PIECEWISE_CUDA_GRAPH", "piecewise_cuda_graph", _parse_bool, "1",
         "Replay prefill and mixed steps of the native runner (CUDA, triton kernels) from "
         "CUDA graphs of each layer's work between attention calls, per token-count bucket "
         "up to the prefill budget (attention stays eager); captured at start-up."),
    Flag("CASCADE_ATTENTION", "cascade_attention", _choice("auto", "0", "1"), "auto",
         "Cascade decode attention: running requests that share a cached prefix (the same "
         "radix-cache slots) read it once per group of up to 16 instead of once each; auto = "
         "where the kernel set has it (triton, CUDA), 1 = required (start-up fails without "
         "it), 0 = off."),
    Flag("CASCADE_MIN_PREFIX", "cascade_min_prefix", _int_at_least(16), "256",
         "Fewest shared prefix tokens for decode requests to be grouped for cascade attention."),
    # KV cache and scheduling
    Flag("KV_CACHE_TOKENS", "kv_cache_tokens", _int_at_least(0), "0",
         "KV pool size in tokens; 0 = sized from KV_CACHE_MEM_FRACTION (CUDA) or "
         "KV_CACHE_CPU_TOKENS."),
    Flag("KV_CACHE_DTYPE", "kv_cache_dtype", _choice("auto", "fp8_e4m3"), "auto",
         "K/V storage; auto = DTYPE; fp8_e4m3 = 8-bit floats: twice the tokens in the same "
         "memory and half the bytes for attention to read, at a small cost in accuracy "
         "(stored unscaled, beyond ±448 saturates; native runner, on CUDA cards of compute "
         "capability 8.9 or later, or the CPU)."),
    Flag("KV_CACHE_MEM_FRACTION", "kv_cache_mem_fraction", _fraction, "0.85",
         "Fraction of free accelerator memory, after weights, for the KV pool."),
    Flag("KV_CACHE_CPU_TOKENS", "kv_cache_cpu_tokens", _int_at_least(16), "65536",
         "KV pool size in tokens on CPU/MPS when KV_CACHE_TOKENS is 0 (cut to what fits in a "
         "quarter of the RAM available at start-up)."),
    Flag("MAX_RUNNING_REQUESTS", "max_running_requests", _int_at_least(1, 65535), "256",
         "Most requests in the running batch at once (at most 65535: one CUDA grid axis)."),
    Flag("CHUNKED_PREFILL_SIZE", "chunked_prefill_size", _int_at_least(0), "0",
         "Token budget of one scheduler step (prefill chunks plus decode tokens); 0 = 8192 on "
         "CUDA (prefill steps run eagerly: fewer, larger ones), 2048 elsewhere."),
    Flag("MAX_NEW_TOKENS_DEFAULT", "max_new_tokens_default", _int_at_least(1), "256",
         "max_tokens when a request does not say."),
    Flag("PREFIX_CACHE", "prefix_cache", _parse_bool, "1",
         "Radix prefix cache on (1) or off (0)."),
    Flag("PREFIX_CACHE_SIZE", "prefix_cache_size", _int_at_least(0), "0",
         "Most cached sequences (radix leaves); 0 = no limit but the pool."),
    Flag("PREFIX_CACHE_MAX_TOKENS", "prefix_cache_max_tokens", _int_at_least(0), "0",
         "Longest prefix of a sequence kept in the radix cache; 0 = whole sequence."),
    Flag("PREFIX_CACHE_TOKEN_BUDGET", "prefix_cache_token_budget", _int_at_least(0), "0",
         "Most unreferenced tokens the radix cache keeps; 0 = no limit but the pool."),
    Flag("PREFILL_CACHE_SIZE", "prefill_cache_size", _int_at_least(0), "4",
         "Exact-match prefill cache entries (last-position logits of whole prompts); 0 = off "
         "(also off when PREFIX_CACHE=0)."),
    Flag("PREFILL_CACHE_TOKEN_BUDGET", "prefill_cache_token_budget", _int_at_least(0), "32768",
         "Most prompt tokens covered by the exact-match prefill cache; 0 = entries only."),
    # MLX backend
    Flag("MLX_PREFILL_STEP_SIZE", "mlx_prefill_step_size", _int_at_least(1), "2048",
         "BACKEND_IMPL=mlx: prompt tokens per prefill chunk (decode steps of running "
         "requests run between chunks)."),
    Flag("MLX_MAX_KV_SIZE", "mlx_max_kv_size", _int_at_least(0), "0",
         "BACKEND_IMPL=mlx: most tokens kept in a sequence's KV cache (a rotating cache of "
         "the latest tokens: attention over a sliding window); 0 = unbounded."),
    Flag("MLX_PROMPT_CACHE_SIZE", "mlx_prompt_cache_size", _int_at_least(0), "4",
         "BACKEND_IMPL=mlx: KV caches of finished sequences kept for reuse (LRU); a prompt "
         "that extends one prefills only the rest. 0 = off."),
    Flag("MLX_PROMPT_CACHE_TOKENS", "mlx_prompt_cache_tokens", _int_at_least(0), "65536",
         "BACKEND_IMPL=mlx: most tokens held by the prompt cache (LRU eviction); 0 = entries "
         "only."),
    # Server
    Flag("API_KEY", "api_key", _text, "",
         "When set, every endpoint but /health needs `Authorization: Bearer <key>` (else 401)."),
    Flag("REQUEST_TIMEOUT_S", "request_timeout_s", _non_negative_float, "0",
         "Longest a generation request may run; 0 = no limit. Past it the request is aborted "
         "(streams get a final error chunk, others a 504)."),
    Flag("MAX_REQUEST_BYTES", "max_request_bytes", _int_at_least(0), "8388608",
         "Largest request body in bytes (413 beyond); 0 = no limit."),
    Flag("MAX_N", "max_n", _int_at_least(1, 16), "16", "Most choices (`n`) per request."),
    Flag("MAX_PROMPTS", "max_prompts", _int_at_least(1), "64",
         "Most prompts in one /v1/completions prompt array (400 beyond); each gets `n` choices."),
    Flag("GENERATE_HF_MODE", "generate_hf_mode", _parse_bool, "0",
         "Let /generate take `mode: \"hf\"`: the plain transformers baseline, a second copy "
         "of the model loaded on first use (off: a 400)."),
    Flag("MAX_PENDING_REQUESTS", "max_pending_requests", _int_at_least(0), "0",
         "Most generation requests in flight in the server (429 beyond); 0 = no limit."),
    # Engine pool
    Flag("NUM_ENGINES", "num_engines", _int_at_least(0), "0",
         "Engines in the pool; 0 = one per CUDA GPU under ENABLE_MULTI_DEVICE, else 1. On a "
         "CPU several engines share the cores."),
    Flag("ENABLE_MULTI_DEVICE", "enable_multi_device", _parse_bool, "0",
         "One engine per CUDA GPU (NUM_ENGINES of them when set); ignored without CUDA or "
         "with DEVICE=cpu/mps (with a warning when NUM_ENGINES is 0)."),
    Flag("DEVICES", "devices", _text, "",
         "Comma-separated device per engine (e.g. cuda:0,cuda:1); overrides the two above."),
    Flag("ENGINE_PROCESSES", "engine_processes", _choice("auto", "0", "1"), "auto",
         "Run each engine of the pool in its own worker process (its own GIL): auto = when "
         "the pool has more than one engine on CUDA, 1 = always (any device), 0 = every "
         "engine as a thread of the server process."),
    Flag("SCHEDULER_MODE", "scheduler_mode", _choice("rr", "random", "fsfs", "cache_aware"),
         "cache_aware",
         "Routing of requests to engines: round robin, random, fewest sequences in flight, or "
         "the engine holding the longest share of the prompt (balanced by the thresholds)."),
    Flag("CACHE_AWARE_THRESHOLD", "cache_aware_threshold", _fraction, "0.5",
         "cache_aware: share of the prompt an engine must hold to get it (else least loaded)."),
    Flag("BALANCE_ABS_THRESHOLD", "balance_abs_threshold", _int_at_least(0), "32",
         "cache_aware: route by load while the busiest engine has this many more sequences in "
         "flight than the idlest..."),
    Flag("BALANCE_REL_THRESHOLD", "balance_rel_threshold", _non_negative_float, "1.5",
         "...and more than this multiple of them."),
    Flag("MAX_INFLIGHT_TOTAL", "max_inflight_total", _int_at_least(0), "0",
         "Sequences in flight in the whole pool before requests queue; 0 = no cap."),
    Flag("MAX_INFLIGHT_PER_ENGINE", "max_inflight_per_engine", _int_at_least(0), "0",
         "Sequences in flight per engine before requests queue; 0 = no cap."),
    Flag("MAX_QUEUE", "max_queue", _int_at_least(0), "256",
         "Requests waiting for room (FIFO); beyond it the server answers 429."),
    Flag("QUEUE_TIMEOUT_S", "queue_timeout_s", _positive_float, "30",
         "Longest wait in the queue before a 429 (with Retry-After); never unbounded."),
    Flag("ADAPTIVE_MAX_NEW_TOKENS", "adaptive_max_new_tokens", _parse_bool, "0",
         "Scale max_tokens down while the pool is loaded (the response reports it)."),
    Flag("ADAPTIVE_LOAD_THRESHOLD", "adaptive_load_threshold", _fraction, "0.8",
         "Load (in flight over the capped capacity) from which max_tokens is scaled."),
    Flag("ADAPTIVE_FACTOR", "adaptive_factor", _fraction, "0.5",
         "Factor applied to max_tokens under load."),
    Flag("WARM_PREFIXES", "warm_prefixes", _text, "",
         "Prompts (separated by ||, spaces around each dropped) cached in every engine at "
         "start-up."),
    Flag("ASYNC_PREFILL_QUEUE", "async_prefill_queue", _parse_bool, "1",
         "Warm prefixes asked for at run time (control plane `warm`) in a background "
         "thread, skipping those an engine already holds or computes."),
    Flag("METRIC_WINDOW", "metric_window_s", _positive_float, "60",
         "Seconds of the rolling latency/throughput window, per engine and in total."),
    Flag("ZMQ_CONTROL", "zmq_control", _parse_bool, "0",
         "Serve the ZMQ control plane (ipc/zmq_control.py) beside HTTP."),
    Flag("ZMQ_CONTROL_ENDPOINT", "zmq_control_endpoint", _text, "tcp://127.0.0.1:5557",
         "Where the control plane binds (loopback by default)."),
    Flag("ZMQ_CONTROL_TOKEN", "zmq_control_token", _text, "",
         "When set, control requests must carry it as \"token\"."),
    Flag("Z_IMAGE_MODEL_DIR", "z_image_model_dir", _text, "",
         "Folder of a Z-Image(-Turbo) diffusers pipeline: the default image model."),
    Flag("Z_IMAGE_MODEL_ID", "z_image_model_id", _text, "",
         "Hub id of a Z-Image pipeline (e.g. Tongyi-MAI/Z-Image-Turbo), when no folder is set."),
    Flag("IMAGE_MODEL_ID", "image_model_id", _text, "",
         "Another diffusers text-to-image pipeline (folder or hub id)."),
    Flag("IMAGE_MODEL_ALLOW", "image_model_allow", _text, "",
         "Comma-separated further image models a request may name (loaded at start-up)."),
    Flag("VIDEO_MODEL_ID", "video_model_id", _text, "",
         "A diffusers text-to-video pipeline (folder or hub id), e.g. Wan through WanPipeline."),
    Flag("VIDEO_I2V_MODEL_ID", "video_i2v_model_id", _text, "",
         "A diffusers image-to-video pipeline (folder or hub id), e.g. WanImageToVideoPipeline."),
    Flag("DIFFUSION_DEVICE", "diffusion_device", _choice("auto", "cpu", "cuda", "mps"), "auto",
         "Device of the diffusion pipelines; auto picks CUDA, then MPS, then CPU."),
    Flag("DIFFUSION_DTYPE", "diffusion_dtype",
         _choice("auto", "float32", "bfloat16", "float16"), "auto",
         "Pipeline dtype; auto = bfloat16 on CUDA, float16 on MPS, float32 on CPU."),
    Flag("DIFFUSION_ATTENTION_BACKEND", "diffusion_attention_backend", _text, "",
         "diffusers attention backend of the transformer (e.g. flash, _native_cudnn); "
         "empty = diffusers' default."),
    Flag("DIFFUSION_COMPILE", "diffusion_compile", _parse_bool, "0",
         "torch.compile the pipeline's transformer."),
    Flag("DIFFUSION_CPU_OFFLOAD", "diffusion_cpu_offload", _parse_bool, "0",
         "Keep pipeline components on the CPU between uses (CUDA only; saves GPU memory)."),
    Flag("DIFFUSION_QUEUE", "diffusion_queue", _int_at_least(1), "8",
         "Image jobs waiting behind the running one; beyond it the server answers 429."),
    Flag("MAX_IMAGES", "max_images", _int_at_least(1), "4",
         "Most images (`n`) per image request."),
    # Vision-language chat
    Flag("VLM_MODEL_NAME", "vlm_model_name", _text, "",
         "Vision-language model served beside the LLM for chat requests with image parts: "
         "a Hugging Face hub id (fetched like MODEL_NAME) or a local folder; empty = none."),
    Flag("VLM_MODEL_LOCAL_DIR", "vlm_model_local_dir", _text, "",
         "Local folder of the vision-language model; wins over VLM_MODEL_NAME."),
    Flag("VLM_BACKEND", "vlm_backend", _choice("auto", "hf", "mlx"), "auto",
         "Runner of the vision-language model: hf = transformers "
         "(AutoModelForImageTextToText + AutoProcessor), mlx = mlx-vlm; auto = mlx-vlm on "
         "Apple Silicon when it is installed, else hf."),
    Flag("VLM_DEVICE", "vlm_device", _choice("auto", "cpu", "cuda", "mps"), "auto",
         "Device of the hf vision-language runner; auto picks CUDA, then MPS, then CPU."),
    Flag("VLM_DTYPE", "vlm_dtype", _choice("auto", "float32", "bfloat16", "float16"), "auto",
         "dtype of the hf vision-language runner; auto = bfloat16 on CUDA, float16 on MPS, "
         "float32 on CPU."),
    Flag("VLM_QUEUE", "vlm_queue", _int_at_least(1), "16",
         "Vision-language requests waiting behind the running one; beyond it the server "
         "answers 429."),
    Flag("VLM_MAX_IMAGES", "vlm_max_images", _int_at_least(1), "8",
         "Most images in one chat request."),
    Flag("VLM_MAX_IMAGE_BYTES", "vlm_max_image_bytes", _int_at_least(1), "10485760",
         "Largest image in bytes (decoded data: URL, download, or file), enforced while "
         "downloading."),
    Flag("VLM_MAX_IMAGE_PIXELS", "vlm_max_image_pixels", _int_at_least(1), "16777216",
         "Most pixels (width x height) of one image; larger ones are refused before they "
         "are decoded (decompression bombs)."),
    Flag("VLM_IMAGE_HTTP_TIMEOUT_S", "vlm_image_http_timeout_s", _positive_float, "10",
         "Longest download of one http(s) image, redirects included."),
    Flag("VLM_IMAGE_MAX_REDIRECTS", "vlm_image_max_redirects", _int_at_least(0), "3",
         "Most redirects followed for one http(s) image (each hop's address checked)."),
    Flag("VLM_ALLOW_PRIVATE_IMAGE_URLS", "vlm_allow_private_image_urls", _parse_bool, "0",
         "Let http(s) image URLs reach loopback, private, link-local and other non-public "
         "addresses (off: such URLs and redirects to them are refused)."),
    Flag("VLM_PRIVATE_IMAGE_HOSTS", "vlm_private_image_hosts", _text, "",
         "Comma-separated hosts (names or IP literals, as written in the URL) that image URLs "
         "may name although they resolve to non-public addresses; every other host, "
         "redirect targets included, is still checked."),
    Flag("ALLOW_FILE_IMAGE_URL", "allow_file_image_url", _parse_bool, "0",
         "Accept file:// URLs and bare paths as images (files the server process can read; "
         "still size-capped)."),
    Flag("LOG_LEVEL", "log_level", _choice("debug", "info", "warning", "error"), "info",
         "Logging level (per-token lines only at debug)."),
)


@dataclass(frozen=True)
class Config:
    """All flags, typed. Build with `load_config()`; copy with `dataclasses.replace`."""

    model_name: str = ""
    model_local_dir: str = ""
    model_cache_dir: str = "~/.cache/mini-sglang"
    load_format: str = "auto"
    trust_remote_code: bool = False
    dtype: str = "auto"
    device: str = "auto"
    backend_impl: str = "auto"
    weight_quant: str = "auto"
    cpu_kernel: str = "auto"
    overlap_schedule: str = "auto"
    num_engines: int = 0
    enable_multi_device: bool = False
    devices: str = ""
    engine_processes: str = "auto"
    scheduler_mode: str = "cache_aware"
    cache_aware_threshold: float = 0.5
    balance_abs_threshold: int = 32
    balance_rel_threshold: float = 1.5
    max_inflight_total: int = 0
    max_inflight_per_engine: int = 0
    max_queue: int = 256
    queue_timeout_s: float = 30.0
    adaptive_max_new_tokens: bool = False
    adaptive_load_threshold: float = 0.8
    adaptive_factor: float = 0.5
    warm_prefixes: str = ""
    async_prefill_queue: bool = True
    metric_window_s: float = 60.0
    zmq_control: bool = False
    zmq_control_endpoint: str = "tcp://127.0.0.1:5557"
    zmq_control_token: str = ""
    z_image_model_dir: str = ""
    z_image_model_id: str = ""
    image_model_id: str = ""
    image_model_allow: str = ""
    video_model_id: str = ""
    video_i2v_model_id: str = ""
    diffusion_device: str = "auto"
    diffusion_dtype: str = "auto"
    diffusion_attention_backend: str = ""
    diffusion_compile: bool = False
    diffusion_cpu_offload: bool = False
    diffusion_queue: int = 8
    max_images: int = 4
    vlm_model_name: str = ""
    vlm_model_local_dir: str = ""
    vlm_backend: str = "auto"
    vlm_device: str = "auto"
    vlm_dtype: str = "auto"
    vlm_queue: int = 16
    vlm_max_images: int = 8
    vlm_max_image_bytes: int = 10485760
    vlm_max_image_pixels: int = 16777216
    vlm_image_http_timeout_s: float = 10.0
    vlm_image_max_redirects: int = 3
    vlm_allow_private_image_urls: bool = False
    vlm_private_image_hosts: str = ""
    allow_file_image_url: bool = False
    num_threads: int = 0
    seed: int = 0
    cuda_graph: bool = True
    cuda_graph_max_bs: int = 256
    piecewise_cuda_graph: bool = True
    cascade_attention: str = "auto"
    cascade_min_prefix: int = 256
    kv_cache_tokens: int = 0
    kv_cache_dtype: str = "auto"
    kv_cache_mem_fraction: float = 0.85
    kv_cache_cpu_tokens: int = 65536
    max_running_requests: int = 256
    chunked_prefill_size: int = 0
    max_new_tokens_default: int = 256
    prefix_cache: bool = True
    prefix_cache_size: int = 0
    prefix_cache_max_tokens: int = 0
    prefix_cache_token_budget: int = 0
    prefill_cache_size: int = 4
    prefill_cache_token_budget: int = 32768
    mlx_prefill_step_size: int = 2048
    mlx_max_kv_size: int = 0
    mlx_prompt_cache_size: int = 4
    mlx_prompt_cache_tokens: int = 65536
    api_key: str = ""
    request_timeout_s: float = 0.0
    max_request_bytes: int = 8388608
    max_n: int = 16
    max_prompts: int = 64
    generate_hf_mode: bool = False
    max_pending_requests: int = 0
    log_level: str = "info"

    @property
    def cache_dir(self) -> str:
        return os.path.expanduser(self.model_cache_dir)

    @property
    def vlm_configured(self) -> bool:
        """Whether a vision-language model is served beside the LLM."""
        return bool(self.vlm_model_local_dir or self.vlm_model_name)

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def resolved_chunked_prefill_size(self, device: torch.device) -> int:
        """CHUNKED_PREFILL_SIZE, or its device default when 0."""
        if self.chunked_prefill_size > 0:
            return self.chunked_prefill_size
        return 8192 if device.type == "cuda" else 2048

    def resolved_dtype(self) -> torch.dtype:
        """DTYPE, with `auto` resolved for the device (`resolve_dtype`); on CPU, float32
        when the native runner's int8 weights run in the compiled C decoder, whose
        activations are float32 (twice the speed of bfloat16 torch ops, even on CPUs with
        native bfloat16)."""
        device = self.resolved_device()
        if self.dtype == "auto" and device.type == "cpu" and self.cpu_int8_decoder:
            return torch.float32
        return resolve_dtype(self.dtype, device)

    @property
    def cpu_int8_decoder(self) -> bool:
        """Whether the flags ask for the native runner with int8 weights and the compiled
        C decoder (it runs where a C compiler builds it; else torch ops)."""
        return (self.backend_impl in ("auto", "sgl", "torch") and self.kv_cache_dtype == "auto"
                and self.weight_quant in ("auto", "int8") and self.cpu_kernel != "torch")

    def resolved_kv_dtype(self) -> torch.dtype:
        """The KV pool's dtype: DTYPE's, or float8 e4m3 under KV_CACHE_DTYPE=fp8_e4m3."""
        if self.kv_cache_dtype == "fp8_e4m3":
            return torch.float8_e4m3fn
        return self.resolved_dtype()


def resolve_device(name: str) -> torch.device:
    """`auto` → CUDA, then MPS, then CPU; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"DEVICE={name} but no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("DEVICE=mps but MPS is not available")
    return torch.device(name)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` → bfloat16 on CUDA and on CPUs with native bfloat16, float16 on MPS, else
    float32 (without native support bfloat16 matmuls run at half the float32 speed)."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "mps":
        return torch.float16
    if device.type == "cpu" and not cpu_has_native_bf16():
        return torch.float32
    return torch.bfloat16


def load_config(env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
    """Parse every flag from `env` (default: os.environ); keyword overrides win."""
    source = os.environ if env is None else env
    values: dict[str, Any] = {}
    for flag in FLAGS:
        raw = source.get(flag.env, flag.default)
        try:
            values[flag.attr] = flag.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{flag.env}={raw!r}: {exc}") from None
    values.update(overrides)
    config = Config(**values)
    _validate(config)
    return config


def _validate(config: Config) -> None:
    if config.prefix_cache_max_tokens and config.prefix_cache_max_tokens < 1:
        raise ConfigError("PREFIX_CACHE_MAX_TOKENS must be >= 1 or 0")
    if config.backend_impl == "mlx" and config.device not in ("auto", "cpu", "mps"):
        raise ConfigError("BACKEND_IMPL=mlx runs on CPU or MPS only")
    for name in config.devices.split(","):
        if name.strip():
            try:
                resolve_device(name.strip())
            except (ConfigError, RuntimeError) as exc:  # RuntimeError: not a device name
                raise ConfigError(f"DEVICES: {exc}") from None
    if config.vlm_configured and config.vlm_backend == "mlx" and not mlx_vlm_available():
        raise ConfigError("VLM_BACKEND=mlx needs the mlx-vlm package (pip install mlx-vlm); "
                          "it is not installed")


def mlx_vlm_available() -> bool:
    """Whether the mlx-vlm package can be imported (without importing it)."""
    return importlib.util.find_spec("mlx_vlm") is not None


def configure_logging(config: Config) -> None:
    """Send our loggers to stderr at LOG_LEVEL (once; a host that set up logging keeps it)."""
    import logging

    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("engine", "backend", "api", "config", "benchmarks", "multi_device", "ipc"):
        logging.getLogger(name).setLevel(config.log_level.upper())


@lru_cache(maxsize=1)
def get_config() -> Config:
    """The process-wide configuration, read from the environment on first use."""
    return load_config()


def replace(config: Config, **changes: Any) -> Config:
    """A copy of `config` with `changes` applied and validated."""
    new = dataclasses.replace(config, **changes)
    _validate(new)
    return new
