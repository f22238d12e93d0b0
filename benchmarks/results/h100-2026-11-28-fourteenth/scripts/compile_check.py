"""Compile this run's new Triton kernels for sm_90 on a machine without a GPU (Triton's
NVIDIA backend and its ptxas): run from a tree with both patches applied
(scripts/fusions.sh, .gpu/v_both)."""
import inspect
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, ".")
from backend.sglang.kernels.triton import decode_attention as da  # noqa: E402
from backend.sglang.kernels.triton import gemv, norm, split_k  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
P, I = "*bf16", "i32"


def build(fn, types, constexprs, name, **opts):
    params = list(inspect.signature(fn.fn).parameters)
    sig = {p: "constexpr" if p in constexprs else types[p] for p in params}
    try:
        src = ASTSource(fn=fn, signature=sig,
                        constexprs={(params.index(k),): v for k, v in constexprs.items()})
        kernel = triton.compile(src, target=TARGET, options=opts)
        print(f"OK   {name}: {kernel.metadata.shared} B shared")
    except Exception as exc:  # noqa: BLE001
        print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:400]}")


types = dict(x_ptr=P, w_ptr=P, out_ptr="*fp32", M=I, N=I, K=I, stride_xm=I, stride_wn=I,
             stride_os=I, stride_om=I)
for gated in (False, True):
    for bm in (16, 64):
        build(split_k._split_k_kernel, types,
              dict(K_PER_SPLIT=768, BLOCK_M=bm, BLOCK_N=32, BLOCK_K=128, DOT_PRECISION="tf32",
                   UPCAST_DOTS=False, GATED=gated), f"split_k bm{bm} gated={gated}",
              num_warps=4)
types = dict(x_ptr="*fp32", residual_ptr=P, weight_ptr=P, out_ptr=P, residual_out_ptr=P,
             inner=I, stride_x_outer=I, stride_x_inner=I, stride_r_outer=I, stride_r_inner=I,
             dim=I, eps="fp32", stride_x_split=I)
build(norm._rms_norm_kernel, types, dict(HAS_RESIDUAL=True, BLOCK_D=1024, SPLITS=4),
      "add + rms_norm of 4 partials")
types = dict(x_ptr=P, w_ptr=P, b_ptr=P, y_ptr=P, N=I, K=I, stride_xm=I, stride_wn=I,
             stride_ym=I)
for cfg in gemv.CANDIDATES:
    block_k = min(cfg.block_k, 3072)
    build(gemv._gemv_kernel, types,
          dict(M=1, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
               NUM_K_BLOCKS=3072 // block_k, GATED=True), f"gated gemv {cfg}",
          num_warps=cfg.num_warps)
types = dict(
    q_ptr=P, k_pool_ptr=P, v_pool_ptr=P, kv_indptr_ptr="*i32", kv_indices_ptr="*i32",
    out_ptr="*fp32", lse_ptr="*fp32", stride_qt=I, stride_qh=I, stride_k_slot=I,
    stride_k_head=I, stride_v_slot=I, stride_v_head=I, stride_ob=I, stride_oh=I, stride_os=I,
    stride_lb=I, stride_lh=I, scale_log2="fp32", group_size=I, head_dim=I, num_splits=I,
    row_group_ptr="*i32", group_prefix_ptr="*i32", req_ids_ptr="*i64", qkv_ptr=P,
    positions_ptr="*i64", cache_ptr="*fp32", out_slots_ptr="*i64", q_norm_ptr=P,
    k_norm_ptr=P, stride_qkv=I, stride_cache=I, num_q_heads=I, num_kv_heads=I, eps="fp32")
for prepare in (True, False):
    for lse, block_n in ((True, 128), (False, 128), (True, 64)):
        consts = dict(BLOCK_H=16, BLOCK_N=block_n, BLOCK_D=128, DOT_PRECISION="tf32",
                      UPCAST_DOTS=False, WRITE_LSE=lse, HAS_CASCADE=False, HAS_REQ_IDS=False,
                      PREPARE=prepare, HAS_NORM=True, BLOCK_HALF=64, EMULATE_FP8=False)
        build(da._decode_split_kernel, dict(types, out_ptr="*fp32" if lse else P), consts,
              f"decode prepare={prepare} lse={lse} block_n={block_n}", num_warps=4,
              num_stages=2 if block_n == 128 else 3)
