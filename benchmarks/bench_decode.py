"""CPU decode and varlen benchmark.

Decode: flash_attn_with_kvcache (one new query token against a full cache, no append) against
torch's SDPA and our dense path (flash_attn_func) on the same inputs, in one run, medians. GB/s
counts K and V once (B * S * Hk * D * 2 * bytes), and "share" is that rate over the machine's read
bandwidth measured in the same run (sum of a large fp32 tensor). Decode is memory-bound only while
each K/V element costs few FLOPs: MQA's 32 query heads per kv head do 4 * 32 FLOPs per element, and
then the roof is the compute peak (bf16 mm; fp32: the GEMM micro-kernel's hot-tile rate; measured in the same run too). "roof" is the share of the roofline
time max(FLOPs / mm peak, bytes / bandwidth).

Varlen: flash_attn_varlen_func forward+backward on a packed batch against the dense kernel on the
same tokens per sequence (equal lengths: one (B, L) dense call; mixed lengths: one dense call per
sequence), bf16, causal.

    python benchmarks/bench_decode.py             # everything, prints the table (on the GPU if there is one)
    python benchmarks/bench_decode.py --quick     # small smoke run
    python benchmarks/bench_decode.py --device cpu

On a GPU the same cases run with CUDA tensors (each call waited for), plus one large GQA batch, and
the roofs are the GPU's (torch.mm 8192³, a 4 GiB sum).
"""

import argparse
import os
import platform
import sys

import torch
import torch.nn.functional as F

import flashattn_ext
from machine_peaks import compute_peak, machine_peaks, roofline_ms  # noqa: E402  (benchmarks/)
from timing import median_time  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


DEVICE = "cpu"  # main() sets it


def timed(fn, repeats):
    return median_time(fn, repeats, device=DEVICE)


def paged(cache, page):
    """(B, S, H, D) -> (num_blocks, page, H, D) in a shuffled block order, and the block table."""
    B, S = cache.shape[:2]
    n = S // page
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(B * n, generator=g)
    table = perm.view(B, n).to(torch.int32)
    blocks = torch.empty(B * n, page, *cache.shape[2:], dtype=cache.dtype)
    blocks[perm] = cache.reshape(B * n, page, *cache.shape[2:])
    return blocks.to(DEVICE), table.to(DEVICE)


def decode_case(B, S, Hq, Hk, D, dtype, repeats, bw, peak, page=256):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 1, Hq, D, generator=g).to(dtype).to(DEVICE)
    k_cache = torch.randn(B, S, Hk, D, generator=g).to(dtype)
    v_cache = torch.randn(B, S, Hk, D, generator=g).to(dtype)
    seqlens = torch.full((B,), S, dtype=torch.int32, device=DEVICE)
    kv_bytes = 2 * B * S * Hk * D * k_cache.element_size()
    flops = 4 * B * Hq * S * D
    rows = []
    kb, table = paged(k_cache, page)
    vb, _ = paged(v_cache, page)
    k_cache, v_cache = k_cache.to(DEVICE), v_cache.to(DEVICE)
    ours = lambda: flashattn_ext.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens)  # noqa: E731
    t_ours = timed(ours, repeats)
    # torch SDPA on the same tensors in its (B, H, S, D) layout (strided views of the cache).
    qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    sdpa = lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=Hq != Hk)  # noqa: E731
    t_sdpa = timed(sdpa, repeats)
    dense = lambda: flashattn_ext.flash_attn_func(q, k_cache, v_cache)  # noqa: E731
    t_dense = timed(dense, repeats)
    rows.append(("contiguous", t_ours, t_sdpa, t_dense))
    del k_cache, v_cache, kt, vt
    t_paged = timed(lambda: flashattn_ext.flash_attn_with_kvcache(q, kb, vb, cache_seqlens=seqlens,
                                                                        block_table=table), repeats)
    rows.append((f"paged{page}", t_paged, t_sdpa, t_dense))
    out = []
    for layout, t, ts, td in rows:
        gbs = kv_bytes / t / 1e9
        out.append(dict(layout=layout, ms=t * 1e3, gbs=gbs, share=gbs / bw, sdpa_ms=ts * 1e3, dense_ms=td * 1e3,
                        speedup_vs_sdpa=ts / t, mb=kv_bytes / 1e6,
                        roof=roofline_ms(flops, kv_bytes, peak, bw) / (t * 1e3)))
    return out


def varlen_case(lengths, H, D, dtype, repeats):
    g = torch.Generator().manual_seed(0)
    total = sum(lengths)
    q, k, v = (torch.randn(total, H, D, generator=g).to(dtype).to(DEVICE).requires_grad_() for _ in range(3))
    grad = torch.randn(total, H, D, generator=g).to(dtype).to(DEVICE)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    mx = max(lengths)

    def varlen():
        out = flashattn_ext.flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=True)
        torch.autograd.grad(out, (q, k, v), grad)

    if len(set(lengths)) == 1:
        B, L = len(lengths), lengths[0]
        qd, kd, vd = (x.detach().view(B, L, H, D).requires_grad_() for x in (q, k, v))
        gd = grad.view(B, L, H, D)

        def dense():
            out = flashattn_ext.flash_attn_func(qd, kd, vd, causal=True)
            torch.autograd.grad(out, (qd, kd, vd), gd)
    else:
        seqs = []
        for b in range(len(lengths)):
            s, n = int(cu[b]), lengths[b]
            seqs.append(tuple(x.detach()[s:s + n].unsqueeze(0).requires_grad_() for x in (q, k, v)) +
                        (grad[s:s + n].unsqueeze(0),))

        def dense():
            for qs, ks, vs, gs in seqs:
                out = flashattn_ext.flash_attn_func(qs, ks, vs, causal=True)
                torch.autograd.grad(out, (qs, ks, vs), gs)

    t_varlen = timed(varlen, repeats)
    t_dense = timed(dense, repeats)
    return t_varlen, t_dense


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    repeats = 2 if args.quick else args.repeats
    S, S_long = (512, 2048) if args.quick else (4096, 32768)
    print("command:", " ".join([os.path.basename(sys.executable)] + sys.argv))
    where = (torch.cuda.get_device_name(DEVICE) if DEVICE != "cpu" else
             f"{torch.get_num_threads()} threads, {platform.machine()}, build {flashattn_ext.build_info().get('cpu_gemm')}")
    print(f"torch {torch.__version__}, device {DEVICE}: {where}")
    peaks = machine_peaks(repeats, DEVICE)
    bw = peaks["read_gbs"]
    print(f"read bandwidth (sum of a large fp32 tensor): {bw:.1f} GB/s; compute roofs (GFLOP/s): bf16 mm "
          f"{compute_peak(peaks, 'bf16'):.0f}, fp32 {compute_peak(peaks, 'fp32'):.0f} "
          f"({'the GEMM micro-kernel on a hot tile' if DEVICE == 'cpu' else 'mm'})\n")
    print("decode: 1 query token, full cache, D=128; GB/s counts K and V once; share = GB/s / read bandwidth; "
          "roof = roofline time / ours")
    header = (f"{'case':<28} {'dtype':<5} {'layout':<10} {'MB':>7} {'ours ms':>8} {'GB/s':>6} {'share':>6} "
              f"{'roof':>5} {'sdpa ms':>8} {'x sdpa':>7} {'dense ms':>9}")
    print(header)
    print("-" * len(header))
    cases = [("MHA B=4 Hq=Hk=32", 4, S, 32, 32), ("GQA B=4 Hq=32 Hk=8", 4, S, 32, 8),
             ("GQA B=16 Hq=32 Hk=8 S=512", 16, 512, 32, 8), (f"GQA B=1 Hq=32 Hk=8 S={S_long}", 1, S_long, 32, 8),
             ("MQA B=4 Hq=32 Hk=1", 4, S, 32, 1), (f"MQA B=1 Hq=32 Hk=1 S={S_long}", 1, S_long, 32, 1)]
    if DEVICE != "cpu" and not args.quick:  # a batch that fills the GPU's bandwidth (1 GiB of bf16 K/V)
        cases.append(("GQA B=32 Hq=32 Hk=8 S=8192", 32, 8192, 32, 8))
    for name, B, s, Hq, Hk in cases:
        label = name if "S=" in name else f"{name} S={s}"
        for dname, dtype in DTYPES.items():
            for r in decode_case(B, s, Hq, Hk, 128, dtype, repeats, bw, compute_peak(peaks, dname)):
                print(f"{label:<28} {dname:<5} {r['layout']:<10} {r['mb']:>7.1f} {r['ms']:>8.2f} {r['gbs']:>6.1f} "
                      f"{r['share']:>6.0%} {r['roof']:>5.0%} {r['sdpa_ms']:>8.2f} {r['speedup_vs_sdpa']:>7.2f} {r['dense_ms']:>9.2f}",
                      flush=True)

    print("\nvarlen forward+backward vs the dense kernel on the same tokens per sequence (bf16, causal, H=8, D=64)")
    header = f"{'lengths':<40} {'varlen ms':>10} {'dense ms':>9} {'varlen/dense':>13}"
    print(header)
    print("-" * len(header))
    mixes = ([[256] * 4, [512, 128, 384, 64]] if args.quick else
             [[1024] * 8, [2048, 256, 1024, 512, 1536, 768, 1792, 256], [128] * 32, [37, 500, 1, 0, 900, 311, 2000]])
    for lengths in mixes:
        tv, td = varlen_case(lengths, 8, 64, torch.bfloat16, max(3, repeats // 2))
        label = f"{lengths[0]} x {len(lengths)}" if len(set(lengths)) == 1 else ",".join(map(str, lengths))
        print(f"{label:<40} {tv * 1e3:>10.1f} {td * 1e3:>9.1f} {tv / td:>13.3f}", flush=True)


if __name__ == "__main__":
    main()
