"""Two-batch overlap probe: 8 decoder-like layers at Qwen3-0.6B decode shapes (bf16), one
stream with the whole batch against two streams with half the batch each (fork/join inside
one CUDA graph). Attention = the engine's decode kernel over uniform 100-2048-token contexts;
GEMMs through F.linear; norms and SiLU-and-mul through the engine's Triton kernels."""
import random, torch, torch.nn.functional as F
from triton.testing import do_bench_cudagraph
from backend.sglang.kernels.triton.decode_attention import decode_attention, choose_num_splits
from backend.sglang.kernels.triton.elementwise import silu_and_mul
from backend.sglang.kernels.triton.norm import rms_norm
dev = "cuda"; bf = torch.bfloat16; H, KVH, D, HID, INTER, L = 16, 8, 128, 1024, 3072, 8
def run(B, lo, hi):
    rng = random.Random(0); lens = [rng.randint(lo, hi) for _ in range(B)]
    total = sum(lens); cum = [0]
    for n in lens: cum.append(cum[-1] + n)
    perm = torch.randperm(total, device=dev)  # slots scattered over the pool
    k = [torch.randn(total, KVH, D, device=dev, dtype=bf) for _ in range(L)]
    v = [torch.randn(total, KVH, D, device=dev, dtype=bf) for _ in range(L)]
    W = [dict(qkv=torch.randn(4096, HID, device=dev, dtype=bf) * .02, o=torch.randn(HID, 2048, device=dev, dtype=bf) * .02,
              gu=torch.randn(2 * INTER, HID, device=dev, dtype=bf) * .02, d=torch.randn(HID, INTER, device=dev, dtype=bf) * .02,
              n=torch.ones(HID, device=dev, dtype=bf)) for _ in range(L)]
    def make(rows):
        ip = torch.tensor([c - cum[rows.start] for c in cum[rows.start:rows.stop + 1]], device=dev)
        idx = perm[cum[rows.start]:cum[rows.stop]].contiguous()
        h = torch.randn(rows.stop - rows.start, HID, device=dev, dtype=bf)
        ns = choose_num_splits(rows.stop - rows.start, KVH, max(lens[rows.start:rows.stop]), torch.device(dev))
        att = (dict(num_splits=1, block_n=128, num_stages=2) if ns == 1 else dict(num_splits=ns, block_n=64))
        def layers():
            x = h
            for l in range(L):
                w = W[l]
                y = F.linear(rms_norm(x, w["n"], 1e-6), w["qkv"])
                q = y[:, :2048].reshape(-1, H, D)
                a = decode_attention(q, k[l], v[l], ip, idx, 0.088, **att)
                x = x + F.linear(a.reshape(-1, 2048), w["o"])
                x = x + F.linear(silu_and_mul(F.linear(rms_norm(x, w["n"], 1e-6), w["gu"])), w["d"])
            return x
        return layers
    one = make(range(0, B))
    h1, h2 = make(range(0, B // 2)), make(range(B // 2, B))
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    def two():
        cur = torch.cuda.current_stream()
        s1.wait_stream(cur); s2.wait_stream(cur)
        with torch.cuda.stream(s1): h1()
        with torch.cuda.stream(s2): h2()
        cur.wait_stream(s1); cur.wait_stream(s2)
    t_one = do_bench_cudagraph(one, rep=100); t_two = do_bench_cudagraph(two, rep=100)
    t_h = do_bench_cudagraph(h1, rep=100)
    kv = total * KVH * D * 2 * 2 * L
    print(f"B={B:3d} ctx {lo}-{hi}: one stream {t_one*1e3/L:7.1f} us/layer, two streams {t_two*1e3/L:7.1f} ({100*(t_one/t_two-1):+5.1f}%), one half alone {t_h*1e3/L:7.1f}; attn bytes/layer {kv/L/1e6:.0f} MB")
for B, lo, hi in ((256, 100, 2048), (256, 100, 1024), (192, 500, 2048), (128, 600, 2048), (64, 1000, 2048), (32, 1200, 2048)):
    run(B, lo, hi)
