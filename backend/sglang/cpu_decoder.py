"""The compiled CPU decoder: a whole forward step of an int8 model in one C call.

On a CPU, torch ops cost microseconds each and a decode step of a small model is hundreds
of them, so the step is bound by dispatch, not by the matmuls. `kernels/cpu/decoder.c`
runs the decoder stack (norms, int8 x float32 matmuls with fused epilogues, rotary, KV
writes, paged attention) in one OpenMP team; the LM head stays the model's own
(`CausalLM.logits`). The runner uses it for int8 weights with float32 activations on the
CPU (`CPU_KERNEL`): the library is compiled once per host with the system C compiler into
`<MODEL_CACHE_DIR>/kernels/`, and the torch ops stay the fallback when no compiler works.

The numbers differ from the torch int8 path only by rounding: the C matmuls quantize each
activation row to int16 (its own scale) where torch's packed int8 kernel rounds to bfloat16,
and everything around them (norms, rotary, attention, K/V) stays float32.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from backend.batch import ForwardBatch
from backend.kv_pool import KVPool
from backend.sglang.layers import CausalLM, DecoderLayer, Linear

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "cpu" / "decoder.c"
CPU_KERNEL_CHOICES = ("auto", "c", "torch")
_BASE_FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared")
# Tried in order: the first set the compiler accepts builds the library.
_FLAG_SETS = (("-march=native", "-fopenmp"), ("-fopenmp",), ("-march=native",), ())
_MAX_HEAD_DIM = 256
_MAX_GROUP = 32
_BATCH_TENSORS = ("input_ids", "positions", "out_slots", "qo_indptr", "kv_indptr", "kv_indices")
_build_lock = threading.Lock()


class CpuKernelUnavailable(RuntimeError):
    """The compiled decoder cannot run this model here (reason in the message)."""


class _QLinear(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("n_out", ctypes.c_int64), ("n_in", ctypes.c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p),
                ("qkv", _QLinear), ("o", _QLinear), ("gate_up", _QLinear), ("down", _QLinear),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


class _Model(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_int64), ("intermediate", ctypes.c_int64),
                ("num_layers", ctypes.c_int64), ("num_heads", ctypes.c_int64),
                ("num_kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64),
                ("eps", ctypes.c_float), ("attn_scale", ctypes.c_float),
                ("embed", ctypes.c_void_p), ("final_norm", ctypes.c_void_p),
                ("rope", ctypes.c_void_p), ("layers", ctypes.POINTER(_Layer))]


class _Step(ctypes.Structure):
    _fields_ = [("num_tokens", ctypes.c_int64), ("batch_size", ctypes.c_int64),
                ("num_out", ctypes.c_int64), ("num_threads", ctypes.c_int64),
                *((name, ctypes.c_void_p) for name in (
                    "input_ids", "positions", "out_slots", "qo_indptr", "kv_indptr",
                    "kv_indices", "out_rows", "residual", "normed", "qkv", "act",
                    "token_request", "xq", "xq_scale", "out"))]


def find_compiler() -> str | None:
    """The C compiler the decoder is built with: $CC, else cc, gcc or clang on PATH."""
    for name in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _host_key(compiler: str) -> str:
    """What the built library depends on: source, compiler and this CPU (-march=native)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             check=False).stdout
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu += next((line for line in f if line.startswith("flags")), "")
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version, cpu, " ".join(_BASE_FLAGS)):
        digest.update(part if isinstance(part, bytes) else part.encode())
    return digest.hexdigest()[:16]


def build_library(cache_dir: str) -> Path:
    """The compiled decoder for this host, built into `cache_dir` on first use."""
    compiler = find_compiler()
    if compiler is None:
        raise CpuKernelUnavailable("no C compiler found (set CC, or install gcc or clang)")
    target = Path(cache_dir) / f"decoder-{_host_key(compiler)}.so"
    with _build_lock:
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        errors = []
        for flags in _FLAG_SETS:
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            command = [compiler, *_BASE_FLAGS, *flags, str(SOURCE), "-o", tmp, "-lm"]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode == 0:
                os.replace(tmp, target)
                logger.info("compiled the CPU decoder (%s %s)", compiler, " ".join(flags))
                return target
            os.unlink(tmp)
            errors.append(result.stderr.strip().splitlines()[-1:] or ["?"])
        raise CpuKernelUnavailable(f"{compiler} could not build {SOURCE.name}: {errors[0][0]}")


def load_library(cache_dir: str) -> ctypes.CDLL:
    library = ctypes.CDLL(str(build_library(cache_dir)))
    library.msg_decoder_forward.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(_Step)]
    library.msg_decoder_forward.restype = ctypes.c_int
    library.msg_decoder_threaded.argtypes = []
    library.msg_decoder_threaded.restype = ctypes.c_int
    return library


class CpuDecoder:
    """Runs a CPU `CausalLM` with int8 decoder weights and float32 activations through the
    compiled kernel; `unsupported_reason` says when it cannot."""

    def __init__(self, model: CausalLM, kv_pool: KVPool, cache_dir: str) -> None:
        reason = unsupported_reason(model, kv_pool)
        if reason is not None:
            raise CpuKernelUnavailable(reason)
        self.model = model
        self._lib = load_library(cache_dir)
        # Without OpenMP (a compiler lacking it) the library runs each step on one thread.
        self.threaded = bool(self._lib.msg_decoder_threaded())
        self._keep: list[torch.Tensor] = []  # everything the C structs point into
        config = model.config
        decoder_layers: list[DecoderLayer] = list(model.model.layers)  # type: ignore[arg-type]
        layers = (_Layer * config.num_layers)(
            *(self._layer(layer, kv_pool.k[i], kv_pool.v[i])
              for i, layer in enumerate(decoder_layers))
        )
        self._layers = layers
        self._struct = _Model(
            hidden=config.hidden_size, intermediate=config.intermediate_size,
            num_layers=config.num_layers, num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
            eps=config.rms_norm_eps, attn_scale=config.head_dim**-0.5,
            embed=self._hold(model.model.embed_tokens.weight),
            final_norm=self._hold(model.model.norm.weight),
            rope=self._hold(model.cos_sin_cache),
            layers=ctypes.cast(layers, ctypes.POINTER(_Layer)),
        )
        self._capacity = 0
        self._buffers: dict[str, torch.Tensor] = {}

    def _hold(self, t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        t = t.detach().contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _linear(self, linear: Linear) -> _QLinear:
        quantized = linear.quantized
        assert quantized is not None
        return _QLinear(
            weight=self._hold(quantized.packed), scale=self._hold(quantized.scales.float()),
            bias=self._hold(linear.bias), n_out=quantized.out_features,
            n_in=quantized.in_features,
        )

    def _layer(self, layer: DecoderLayer, k_cache: torch.Tensor,
               v_cache: torch.Tensor) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        return _Layer(
            input_norm=self._hold(layer.input_layernorm.weight),
            post_norm=self._hold(layer.post_attention_layernorm.weight),
            q_norm=self._hold(attn.q_norm.weight if attn.q_norm is not None else None),
            k_norm=self._hold(attn.k_norm.weight if attn.k_norm is not None else None),
            qkv=self._linear(attn.qkv_proj), o=self._linear(attn.o_proj),
            gate_up=self._linear(mlp.gate_up_proj), down=self._linear(mlp.down_proj),
            k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(),
        )

    def _workspace(self, num_tokens: int) -> dict[str, torch.Tensor]:
        if num_tokens > self._capacity:
            config = self.model.config
            q_size = config.num_heads * config.head_dim
            kv_size = config.num_kv_heads * config.head_dim
            widths = {"residual": config.hidden_size, "normed": max(config.hidden_size, q_size),
                      "qkv": q_size + 2 * kv_size, "act": config.intermediate_size}
            capacity = max(num_tokens, 2 * self._capacity)
            self._buffers = {name: torch.empty(capacity, width) for name, width in widths.items()}
            self._buffers["token_request"] = torch.empty(capacity, dtype=torch.int64)
            widest_input = max(config.hidden_size, q_size, config.intermediate_size)
            self._buffers["xq"] = torch.empty(capacity, widest_input, dtype=torch.int16)
            self._buffers["xq_scale"] = torch.empty(capacity)
            self._capacity = capacity
        return self._buffers

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """float32 logits [len(logits_indices), vocab] of the batch (K/V stored as usual)."""
        work = self._workspace(batch.num_tokens)
        # Held in locals for the call: `contiguous` may copy.
        inputs = {name: getattr(batch, name).contiguous() for name in _BATCH_TENSORS}
        rows = batch.logits_indices.contiguous()
        out = torch.empty(rows.shape[0], self.model.config.hidden_size)
        step = _Step(
            num_tokens=batch.num_tokens, batch_size=batch.batch_size, num_out=rows.shape[0],
            num_threads=torch.get_num_threads(), out_rows=rows.data_ptr(), out=out.data_ptr(),
            **{name: t.data_ptr() for name, t in (inputs | work).items()},
        )
        if self._lib.msg_decoder_forward(ctypes.byref(self._struct), ctypes.byref(step)) != 0:
            raise RuntimeError("the compiled CPU decoder rejected the model shape")
        return self.model.logits(out)


def unsupported_reason(model: CausalLM, kv_pool: KVPool) -> str | None:
    """Why the compiled decoder cannot run `model` over `kv_pool`; None when it can."""
    config = model.config
    weight = model.model.embed_tokens.weight
    if weight.device.type != "cpu":
        return f"the model runs on {weight.device.type}, not the CPU"
    if weight.dtype != torch.float32:
        return f"activations are {weight.dtype}; the C decoder runs float32 activations"
    if kv_pool.k[0].dtype != torch.float32:
        return f"the KV pool holds {kv_pool.k[0].dtype}; the C decoder reads float32 K/V"
    for linear in model.decoder_linears():
        quantized = linear.quantized
        if quantized is None or quantized.method != "int8" or quantized.int8_activations:
            return "the decoder weights are not int8 (WEIGHT_QUANT=int8)"
    if config.head_dim > _MAX_HEAD_DIM or config.head_dim % 2:
        return f"head_dim {config.head_dim} is odd or above {_MAX_HEAD_DIM}"
    group, uneven = divmod(config.num_heads, config.num_kv_heads)
    if uneven or group > _MAX_GROUP:
        return f"{config.num_heads} query heads over {config.num_kv_heads} KV heads"
    return None
