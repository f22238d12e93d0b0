"""Qwen3-0.6B decode GEMMs: cuBLAS against cuBLASLt (torch's preferred_blas_library),
CUDA-graph timing, plus the whole layer's four GEMMs summed."""
import torch
from triton.testing import do_bench_cudagraph

dev = torch.device("cuda")
shapes = {"qkv": (1024, 4096), "o": (2048, 1024), "gate_up": (1024, 6144),
          "down": (3072, 1024), "head": (1024, 151936)}
ws = {n: [torch.randn(o, i, dtype=torch.bfloat16, device=dev) * 0.02 for _ in range(3)]
      for n, (i, o) in shapes.items()}
print(f"{'M':>4} " + " ".join(f"{n:>18s}" for n in shapes) + "   layer(us) blas/lt")
for m in (1, 8, 16, 32, 64, 96, 128, 192, 256):
    res = {}
    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        for n, (i, o) in shapes.items():
            x = torch.randn(m, i, dtype=torch.bfloat16, device=dev)
            out = torch.empty(m, o, dtype=torch.bfloat16, device=dev)
            w = ws[n]

            def fn():
                for wi in w:  # rotate weights: not from L2
                    torch.mm(x, wi.t(), out=out)
            res[(lib, n)] = do_bench_cudagraph(fn, rep=40) / 3
    torch.backends.cuda.preferred_blas_library("cublas")
    cells = " ".join(f"{res[('cublas', n)] * 1e3:8.1f}/{res[('cublaslt', n)] * 1e3:8.1f}"
                     for n in shapes)
    lay = [sum(res[(lib, n)] for n in ("qkv", "o", "gate_up", "down")) * 1e3
           for lib in ("cublas", "cublaslt")]
    print(f"{m:4d} {cells}   {lay[0]:6.1f}/{lay[1]:6.1f}", flush=True)
