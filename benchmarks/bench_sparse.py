"""Block-sparse benchmark: time against dense flashattn_ext on the same inputs at densities 50 %,
25 % and 10 % (target: time proportional to density, >= 3x faster than dense at 25 %); on a GPU
also FlexAttention (compiled) with the same BlockMask, and a 64K-token forward+backward with a 1K
sliding window (bf16, head dim 64) with its time and peak memory.

    python benchmarks/bench_sparse.py                  # CPU (and GPU parts when CUDA is present)
    python benchmarks/bench_sparse.py --device cuda
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

import flashattn_ext
from flashattn_ext import sparse


def timed(fn, device, repeats):
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_block_mask(density, nb, heads, seed=0):
    """Random kept blocks with exactly round(density * nb) blocks per query-block row."""
    g = torch.Generator().manual_seed(seed)
    per_row = max(1, round(density * nb))
    scores = torch.rand(1, heads, nb, nb, generator=g)
    idx = scores.argsort(dim=-1)[..., :per_row]
    kept = torch.zeros(1, heads, nb, nb, dtype=torch.bool)
    kept.scatter_(-1, idx, True)
    return kept


def to_flex(mask, device):
    from torch.nn.attention.flex_attention import BlockMask
    kept = mask.kept.to(device)
    num = kept.sum(-1).to(torch.int32)
    indices = torch.argsort((~kept).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    zeros = torch.zeros_like(num)
    return BlockMask.from_kv_blocks(zeros, indices, num, indices, BLOCK_SIZE=mask.block_size,
                                    seq_lengths=(mask.seqlen_q, mask.seqlen_k))


def run_density_sweep(device, dtype, B, H, N, D, repeats, with_flex):
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, N, D, device=device, dtype=dtype)

    def fwd_bwd(fn):
        def run():
            out = fn()
            torch.autograd.grad(out, (q, k, v), grad)
        return run

    dense_fwd = timed(lambda: flashattn_ext.scaled_dot_product_attention(q, k, v), device, repeats)
    dense_fb = timed(fwd_bwd(lambda: flashattn_ext.scaled_dot_product_attention(q, k, v)), device, repeats)
    rows = []
    flex = None
    if with_flex:
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention)
    nb = N // 128
    for density in (0.5, 0.25, 0.1):
        mask = sparse.BlockSparseMask.from_blocks(random_block_mask(density, nb, H), N, N).to(device)
        f = lambda: flashattn_ext.block_sparse_attention(q, k, v, mask)  # noqa: E731
        r = dict(density=mask.density, sparse_fwd_ms=1e3 * timed(f, device, repeats),
                 sparse_fwdbwd_ms=1e3 * timed(fwd_bwd(f), device, repeats),
                 dense_fwd_ms=1e3 * dense_fwd, dense_fwdbwd_ms=1e3 * dense_fb)
        r["speedup_fwd"] = r["dense_fwd_ms"] / r["sparse_fwd_ms"]
        r["speedup_fwdbwd"] = r["dense_fwdbwd_ms"] / r["sparse_fwdbwd_ms"]
        if flex is not None:
            fm = to_flex(mask, device)
            g = lambda: flex(q, k, v, block_mask=fm)  # noqa: E731
            r["flex_fwd_ms"] = 1e3 * timed(g, device, repeats)
            r["flex_fwdbwd_ms"] = 1e3 * timed(fwd_bwd(g), device, repeats)
            r["vs_flex_fwd"] = r["flex_fwd_ms"] / r["sparse_fwd_ms"]
            r["vs_flex_fwdbwd"] = r["flex_fwdbwd_ms"] / r["sparse_fwdbwd_ms"]
        rows.append(r)
    return rows


def run_long_sliding_window(N=65536, window=1024, D=64, H=16):
    """64K tokens, bf16, head dim 64, causal sliding window of 1K: forward+backward time and peak memory."""
    q, k, v = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16)

    def run():
        out = flashattn_ext.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
        torch.autograd.grad(out, (q, k, v), grad)

    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t = timed(run, "cuda", 5)
    peak = torch.cuda.max_memory_allocated() - base
    flops = 4 * H * N * window * D * 3.5  # each query sees ~window keys; fwd+bwd = 3.5x fwd
    return dict(seqlen=N, window=window, heads=H, headdim=D, fwdbwd_ms=1e3 * t, peak_extra_mib=peak / 2**20,
                tflops=flops / t / 1e12)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    cuda = args.device == "cuda"
    B, H, N, D = (1, 2, 1024, 64) if args.quick else ((4, 16, 8192, 64) if cuda else (1, 8, 4096, 64))
    dtype = torch.bfloat16 if cuda else torch.float32
    repeats = 2 if args.quick else args.repeats
    info = dict(command=" ".join([os.path.basename(sys.executable)] + sys.argv), torch=torch.__version__,
                device=torch.cuda.get_device_name() if cuda else "cpu", threads=torch.get_num_threads(),
                B=B, H=H, N=N, D=D, dtype=str(dtype), block_size=(128, 128))
    print(f"block-sparse vs dense flashattn_ext on {info['device']}: B={B} H={H} L=S={N} D={D} {dtype}, "
          f"128x128 blocks, random block masks, {repeats} repeats (medians)")
    rows = run_density_sweep(args.device, dtype, B, H, N, D, repeats, with_flex=cuda)
    print(f"{'density':>8} {'fwd ms':>8} {'dense':>8} {'speedup':>8} | {'fwd+bwd ms':>10} {'dense':>8} {'speedup':>8}"
          + (f" | {'vs flex fwd':>11} {'fwd+bwd':>8}" if cuda else ""))
    for r in rows:
        line = (f"{r['density']:>8.3f} {r['sparse_fwd_ms']:>8.1f} {r['dense_fwd_ms']:>8.1f} {r['speedup_fwd']:>8.2f} | "
                f"{r['sparse_fwdbwd_ms']:>10.1f} {r['dense_fwdbwd_ms']:>8.1f} {r['speedup_fwdbwd']:>8.2f}")
        if cuda:
            line += f" | {r['vs_flex_fwd']:>11.2f} {r['vs_flex_fwdbwd']:>8.2f}"
        print(line)
    result = dict(info=info, density_sweep=rows)
    if cuda and not args.quick:
        long = run_long_sliding_window()
        result["long_sliding_window"] = long
        print(f"64K tokens, sliding window 1K, bf16, D=64, H=16: fwd+bwd {long['fwdbwd_ms']:.1f} ms "
              f"({long['tflops']:.0f} TFLOP/s), peak extra memory {long['peak_extra_mib']:.0f} MiB")
    if not args.quick:
        sub = "cpu" if not cuda else torch.cuda.get_device_name().lower().replace(" ", "_")
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
        path = os.path.join(args.out, sub, "bench_sparse.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"saved {path}")


if __name__ == "__main__":
    main()
