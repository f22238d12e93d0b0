"""The whole gated MLP of a few rows in one kernel: gate/up, SiLU-and-mul and down.

At one or two rows the MLP is three launches (the gate/up GEMV, SiLU-and-mul, the down
GEMV), each paying a few µs to start, fill and drain for 6-13 MB of weights. Here program p
owns BLOCK_I columns of the intermediate: it computes their gate and up values from its
rows of the gate/up weight, gates them, and multiplies them straight into its BLOCK_I
columns of the down weight, adding that part of the output into a float32 buffer with
relaxed atomic adds (reductions the program does not wait on; they do meet in L2). The
intermediate never leaves the program, so there is no grid-wide wait, and the layer is one
kernel (after a memset of the output) that streams both weights once. No bias.
The output is a one-slice `SplitSum` for the fused residual-add + RMSNorm after it to read
(the order of the atomic adds varies, so the last bits of the sum may differ from run to
run).

Not yet chosen by the engine: `benchmarks/matmul_sweep.py --mlp` times it against the three
launches, as the start-up choices time kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from backend.sglang.kernels.torch_ops import SplitSum

FUSED_MLP_MAX_ROWS = 4  # each row adds an atomic per output column per program


@dataclass(frozen=True)
class MlpConfig:
    block_i: int  # intermediate columns per program
    block_k: int  # hidden-size chunk of the gate/up rows
    block_n: int  # output chunk of the down columns
    num_warps: int


@triton.jit
def _fused_mlp_kernel(
    x_ptr, gate_up_ptr, down_ptr, out_ptr, K, INTER, N, stride_xm, stride_gu, stride_dn,
    stride_om,
    M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_K_BLOCKS: tl.constexpr, NUM_N_BLOCKS: tl.constexpr,
):
    pid = tl.program_id(0)
    i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    i_mask = i < INTER
    rows = tl.arange(0, BLOCK_M)
    gate = tl.zeros([BLOCK_M, BLOCK_I], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_I], dtype=tl.float32)
    for kb in tl.static_range(NUM_K_BLOCKS):
        k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = k < K
        w_mask = i_mask[:, None] & k_mask[None, :]
        w_gate = tl.load(gate_up_ptr + i[:, None] * stride_gu + k[None, :], mask=w_mask,
                         other=0.0).to(tl.float32)
        w_up = tl.load(gate_up_ptr + (INTER + i)[:, None] * stride_gu + k[None, :], mask=w_mask,
                       other=0.0).to(tl.float32)
        for m in tl.static_range(M):
            x = tl.load(x_ptr + m * stride_xm + k, mask=k_mask, other=0.0).to(tl.float32)
            is_row = rows[:, None] == m
            gate = tl.where(is_row, gate + tl.sum(w_gate * x[None, :], axis=1)[None, :], gate)
            up = tl.where(is_row, up + tl.sum(w_up * x[None, :], axis=1)[None, :], up)
    # rounded to the activations' dtype, as the three-launch path stores it (that path also
    # rounds gate and up first: the two are close, not bit for bit the same)
    act = (gate / (1.0 + tl.exp(-gate)) * up).to(x_ptr.dtype.element_ty).to(tl.float32)
    for nb in tl.static_range(NUM_N_BLOCKS):
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < N
        w_down = tl.load(down_ptr + n[:, None] * stride_dn + i[None, :],
                         mask=n_mask[:, None] & i_mask[None, :], other=0.0).to(tl.float32)
        for m in tl.static_range(M):
            act_row = tl.sum(tl.where(rows[:, None] == m, act, 0.0), axis=0)
            part = tl.sum(w_down * act_row[None, :], axis=1)
            tl.atomic_add(out_ptr + m * stride_om + n, part, mask=n_mask, sem="relaxed")


def fused_mlp(x: torch.Tensor, gate_up_weight: torch.Tensor, down_weight: torch.Tensor,
              config: MlpConfig = MlpConfig(16, 1024, 256, 8)) -> SplitSum:
    """`down(silu(gate(x)) * up(x))` for x [M <= FUSED_MLP_MAX_ROWS, K], gate_up_weight
    [2I, K] (gate rows first), down_weight [N, I], rows contiguous, one dtype and device;
    a one-slice SplitSum. (The default shape keeps its two float32 gate/up tiles in
    registers on an H100, 168-175 a thread by ptxas.)"""
    _check_mlp_inputs(x, gate_up_weight, down_weight, config)
    rows, k = x.shape
    inter = gate_up_weight.shape[0] // 2
    n = down_weight.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.zeros((1, rows, n), dtype=torch.float32, device=x.device)
    if rows:
        block_k = min(config.block_k, triton.next_power_of_2(k))
        block_n = min(config.block_n, triton.next_power_of_2(n))
        _fused_mlp_kernel[(triton.cdiv(inter, config.block_i),)](
            x, gate_up_weight, down_weight, out, k, inter, n, x.stride(0),
            gate_up_weight.stride(0), down_weight.stride(0), out.stride(1),
            M=rows, BLOCK_M=triton.next_power_of_2(rows), BLOCK_I=config.block_i,
            BLOCK_K=block_k, BLOCK_N=block_n, NUM_K_BLOCKS=triton.cdiv(k, block_k),
            NUM_N_BLOCKS=triton.cdiv(n, block_n), num_warps=config.num_warps,
        )
    return SplitSum(out, x.dtype)


def _check_mlp_inputs(x: torch.Tensor, gate_up_weight: torch.Tensor,
                      down_weight: torch.Tensor, config: MlpConfig) -> None:
    """Shapes the kernel would otherwise read past silently."""
    if x.dim() != 2 or x.shape[0] > FUSED_MLP_MAX_ROWS:
        raise ValueError(f"fused_mlp takes [rows <= {FUSED_MLP_MAX_ROWS}, K], got "
                         f"{tuple(x.shape)}")
    two_inter, k = gate_up_weight.shape
    if k != x.shape[1] or two_inter % 2 or down_weight.shape[1] != two_inter // 2:
        raise ValueError(f"fused_mlp shapes do not chain: x {tuple(x.shape)}, gate_up "
                         f"{tuple(gate_up_weight.shape)}, down {tuple(down_weight.shape)}")
    if len({x.dtype, gate_up_weight.dtype, down_weight.dtype}) != 1 or len(
            {x.device, gate_up_weight.device, down_weight.device}) != 1:
        raise ValueError("fused_mlp needs x and both weights in one dtype, on one device")
    if gate_up_weight.stride(1) != 1 or down_weight.stride(1) != 1:
        raise ValueError("fused_mlp needs weight rows contiguous in their input dim")
    if config.block_i & (config.block_i - 1):
        raise ValueError(f"block_i must be a power of two, got {config.block_i}")
