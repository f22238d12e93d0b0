"""Split-K o_proj/down_proj + fused add-norm against cuBLAS + the same norm (CUDA-graph
timing, weights rotated out of L2)."""
import itertools

import torch
from triton.testing import do_bench_cudagraph

from backend.sglang.kernels.triton.norm import fused_add_rms_norm
from backend.sglang.kernels.triton.split_k import SplitConfig, split_k_linear

dev = torch.device("cuda")
configs = [SplitConfig(bm, bn, bk, s, w) for bm, bn, bk, s, w in itertools.product(
    (16, 32, 64), (32, 64, 128), (64, 128), (2, 4, 8), (4,))]
print(len(configs), "configs")
summary = []
for name, (k, n) in {"o": (2048, 1024), "down": (3072, 1024)}.items():
    ws = [torch.randn(n, k, dtype=torch.bfloat16, device=dev) * 0.02 for _ in range(4)]
    nw = torch.ones(n, dtype=torch.bfloat16, device=dev)
    for m in (1, 4, 16, 32, 64, 128, 256):
        x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
        res = torch.randn(m, n, dtype=torch.bfloat16, device=dev)
        ref, _ = fused_add_rms_norm(torch.mm(x, ws[0].t()), res, nw, 1e-6)

        def base():
            for w in ws:
                fused_add_rms_norm(torch.mm(x, w.t()), res, nw, 1e-6)
        t0 = do_bench_cudagraph(base, rep=30) / 4
        out = []
        for c in configs:
            if c.block_m > max(16, 2 * m):
                continue
            try:
                got, _ = fused_add_rms_norm(split_k_linear(x, ws[0], c), res, nw, 1e-6)
                err = (got.float() - ref.float()).abs().max().item()
                def fn(c=c):
                    for w in ws:
                        fused_add_rms_norm(split_k_linear(x, w, c), res, nw, 1e-6)
                t = do_bench_cudagraph(fn, rep=15) / 4
            except Exception as e:  # noqa: BLE001
                print("fail", c, type(e).__name__, str(e)[:80])
                continue
            out.append((t, c, err))
        out.sort(key=lambda r: r[0])
        best = out[0]
        line = (f"{name:5s} M{m:4d} cublas+norm {t0*1e3:6.2f}us | best {best[0]*1e3:6.2f}us "
                f"{t0/best[0]:4.2f}x err {best[2]:.3f} {best[1]} | "
                + " ".join(f"{t*1e3:.2f}" for t, _, _ in out[1:4]))
        print(line, flush=True)
        summary.append((name, m, [(round(t0 / t, 2), c) for t, c, _ in out[:6]]))
print("TOP per M (ratio, config):")
for name, m, top in summary:
    print(name, m, top[:4])
