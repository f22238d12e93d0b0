"""The merge kernel: HEAD's fixed 64-slice block against the working tree's 8-slice loop."""
import importlib.util

import torch
from triton.testing import do_bench_cudagraph

from backend.sglang.kernels.triton import decode_attention as new

spec = importlib.util.spec_from_file_location(
    "old_decode", ".gpu/v_head/backend/sglang/kernels/triton/decode_attention.py")
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)

dev = "cuda"
for rows, own, prefix in ((256, 1, 3), (256, 1, 0), (120, 2, 0), (53, 3, 0), (21, 7, 0),
                          (4, 32, 0), (64, 3, 2)):
    slices = own + prefix
    partial = torch.randn(rows, 16, slices, 128, device=dev)
    lse = torch.randn(rows, 16, slices, device=dev)
    group = torch.arange(rows, device=dev, dtype=torch.int64) // 16 if prefix else None
    out_o = torch.empty(rows, 16, 128, device=dev, dtype=torch.bfloat16)
    out_n = torch.empty_like(out_o)

    def run(mod, out):
        return lambda: mod.merge_splits(partial, lse, out, own, group, prefix)
    run(old, out_o)()
    run(new, out_n)()
    err = (out_o.float() - out_n.float()).abs().max().item()
    t_o = do_bench_cudagraph(run(old, out_o), rep=100) * 1e3
    t_n = do_bench_cudagraph(run(new, out_n), rep=100) * 1e3
    print(f"merge rows {rows:3d} slices {own}+{prefix}: old {t_o:6.1f} us  new {t_n:6.1f} us"
          f"  x{t_o / t_n:.2f}  err {err:.1e}", flush=True)
