"""Decode attention by KV pool layout and slot placement: token-major [slot, head, d] (the
pool today) against head-major [head, slot, d] seen through a transposed view, with each
request's slots contiguous or, as decode leaves them, its second half interleaved with the
batch's other rows (one new slot per row per step)."""
import itertools
import random

import torch
from triton.testing import do_bench_cudagraph

from backend.sglang.kernels.triton.decode_attention import choose_num_splits, decode_attention


def slots_for(lens, interleave):
    b = len(lens)
    idx = []
    nxt = 1
    prompt = [l // 2 if interleave else l for l in lens]
    for p in prompt:
        idx.append(list(range(nxt, nxt + p)))
        nxt += p
    if interleave:
        steps = max(l - p for l, p in zip(lens, prompt))
        for s in range(steps):
            for r in range(b):
                if len(idx[r]) < lens[r]:
                    idx[r].append(nxt)
                    nxt += 1
    return [x for row in idx for x in row], nxt


def main():
    dev = torch.device("cuda")
    rng = random.Random(0)
    cases = [
        ("b256 100-2048", [rng.randint(100, 2048) for _ in range(256)]),
        ("b120 400-2048", [rng.randint(400, 2048) for _ in range(120)]),
        ("b53 800-2048", [rng.randint(800, 2048) for _ in range(53)]),
        ("b21 1100-2048", [rng.randint(1100, 2048) for _ in range(21)]),
    ]
    for name, lens in cases:
        total = sum(lens)
        indptr = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int64, device=dev)
        q = torch.randn(len(lens), 16, 128, dtype=torch.bfloat16, device=dev)
        nbytes = 2 * 2 * total * 8 * 128
        S = choose_num_splits(len(lens), 8, 40960, dev)
        row = []
        ref = None
        for inter in (False, True):
            flat, n_slots = slots_for(lens, inter)
            idx = torch.tensor(flat, dtype=torch.int64, device=dev)
            tm_k = torch.randn(n_slots, 8, 128, dtype=torch.bfloat16, device=dev)
            tm_v = torch.randn_like(tm_k)
            hm_k = tm_k.transpose(0, 1).contiguous().transpose(0, 1)
            hm_v = tm_v.transpose(0, 1).contiguous().transpose(0, 1)
            for lay, k, v in (("tok", tm_k, tm_v), ("head", hm_k, hm_v)):
                for s_mult, bn in ((1, 64), (1, 128), (2, 128)):
                    s = max(1, min(32, S * s_mult if s_mult >= 1 else S // 2))
                    out = decode_attention(q, k, v, indptr, idx, 0.088, s, block_n=bn)
                    if lay == "tok" and s_mult == 1 and bn == 64:
                        ref = out
                    err = (out.float() - ref.float()).abs().max().item()
                    ms = do_bench_cudagraph(
                        lambda: decode_attention(q, k, v, indptr, idx, 0.088, s, block_n=bn), rep=200)
                    row.append(f"{'il' if inter else 'ct'}-{lay} S{s} bn{bn} {nbytes / ms / 1e9:4.2f}"
                               + (f" ERR{err:.2g}" if err > 0.02 else ""))
            del tm_k, tm_v, hm_k, hm_v
        print(f"{name:14s} | " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
