"""CPU benchmark: flashattn_ext against torch's CPU SDPA (its flash kernel) and the math path.

Same inputs, one run, medians; forward and forward+backward time printed as ratios (torch time /
flashattn_ext time: > 1 means flashattn_ext is faster), GFLOP/s (REFERENCE.md's accounting: forward
4·B·H·L·S·D, half when causal, fwd+bwd 3.5×) and their share of the machine's peaks measured in the
same run: bf16 torch.mm (2048³), the fp32 GEMM micro-kernel the CPU kernels use on a hot 64×64×128
tile, and read bandwidth. Then a sweep over sequence length — training (fwd+bwd), GQA prefill
(forward), GQA decode (flash_attn_with_kvcache, GB/s) — drawn with the peaks as lines into
results/cpu/throughput.png (needs matplotlib), and peak memory growth measured in a fresh process
per variant (max RSS after the call minus before it).

    python benchmarks/bench_cpu.py                 # the issue's configurations, saves JSON
    python benchmarks/bench_cpu.py --quick         # a small smoke run
"""

import argparse
import json
import os
import platform
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashattn_ext
from plotting import pyplot  # noqa: E402  (benchmarks/)
from machine_peaks import compute_peak, machine_peaks  # noqa: E402  (benchmarks/)
from timing import median_time  # noqa: E402

VARIANTS = ("flashattn_ext", "torch_flash", "torch_math")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def attention(variant, q, k, v, causal):
    if variant == "flashattn_ext":
        return flashattn_ext.scaled_dot_product_attention(q, k, v, is_causal=causal)
    backend = SDPBackend.FLASH_ATTENTION if variant == "torch_flash" else SDPBackend.MATH
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def make_inputs(B, H, L, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(B, H, L, D, generator=g).to(dtype)
    return q, k, v, grad


def time_config(B, H, L, D, dtype, causal, repeats, variants):
    q, k, v, grad = make_inputs(B, H, L, D, dtype)
    row = {}
    for variant in variants:
        fwd = lambda: attention(variant, q, k, v, causal)  # noqa: E731

        def fwd_bwd():
            out = attention(variant, q, k, v, causal)
            torch.autograd.grad(out, (q, k, v), grad)

        with torch.no_grad():
            row[f"{variant}_fwd_ms"] = 1e3 * median_time(fwd, repeats)
        row[f"{variant}_fwdbwd_ms"] = 1e3 * median_time(fwd_bwd, repeats)
    return row


def attention_flops(B, H, L, S, D, causal, backward):
    """REFERENCE.md: forward 4·B·H·L·S·D (half when causal); forward+backward 3.5× that."""
    f = 4 * B * H * L * S * D * (0.5 if causal else 1.0)
    return f * (3.5 if backward else 1.0)


def sweep(repeats, quick):
    """Throughput against sequence length, bf16 causal: training fwd+bwd (B·L = 8192 tokens, H=8,
    D=64), GQA prefill forward (Hq=32, Hk=8, D=128, B=1) and GQA decode (one token, same heads)."""
    lengths = [256, 512] if quick else [512, 1024, 2048, 4096]
    dec_lengths = [512, 2048] if quick else [512, 2048, 8192, 32768]
    out = {"training": [], "prefill": [], "decode": []}
    for L in lengths:
        B = max(1, 8192 // L)
        q, k, v, grad = make_inputs(B, 8, L, 64, torch.bfloat16)

        def train():
            o = flashattn_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
            torch.autograd.grad(o, (q, k, v), grad)

        t = median_time(train, repeats)
        out["training"].append(dict(L=L, B=B, ms=t * 1e3, gflops=attention_flops(B, 8, L, L, 64, True, True) / t / 1e9))
        g = torch.Generator().manual_seed(1)
        qp = torch.randn(1, L, 32, 128, generator=g).to(torch.bfloat16)
        kp, vp = (torch.randn(1, L, 8, 128, generator=g).to(torch.bfloat16) for _ in range(2))
        with torch.no_grad():
            t = median_time(lambda: flashattn_ext.flash_attn_func(qp, kp, vp, causal=True), repeats)
        out["prefill"].append(dict(L=L, ms=t * 1e3, gflops=attention_flops(1, 32, L, L, 128, True, False) / t / 1e9))
    for S in dec_lengths:
        g = torch.Generator().manual_seed(2)
        qd = torch.randn(1, 1, 32, 128, generator=g).to(torch.bfloat16)
        kc, vc = (torch.randn(1, S, 8, 128, generator=g).to(torch.bfloat16) for _ in range(2))
        lens = torch.full((1,), S, dtype=torch.int32)
        t = median_time(lambda: flashattn_ext.flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=lens), max(repeats, 7))
        out["decode"].append(dict(S=S, ms=t * 1e3, gbs=2 * kc.numel() * kc.element_size() / t / 1e9))
    return out


def plot(sw, peaks, path):
    plt = pyplot()
    if plt is None:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, marker in (("training", "training fwd+bwd (H=8, D=64)", "o"),
                               ("prefill", "GQA prefill fwd (Hq=32, Hk=8, D=128)", "s")):
        ax1.plot([r["L"] for r in sw[key]], [r["gflops"] for r in sw[key]], marker=marker, label=label)
    ax1.axhline(peaks["bf16_mm_gflops"], color="k", ls="--", lw=1, label="bf16 torch.mm peak")
    ax1.axhline(peaks["bf16_hot_tile_gflops"], color="gray", ls=":", lw=1, label="bf16 GEMM hot tile")
    ax1.set(xscale="log", xlabel="sequence length (causal, bf16)", ylabel="GFLOP/s", ylim=(0, None),
            title="compute-bound: training and prefill")
    ax1.legend(fontsize=8)
    ax2.plot([r["S"] for r in sw["decode"]], [r["gbs"] for r in sw["decode"]], marker="o",
             label="GQA decode (Hq=32, Hk=8, D=128, B=1)")
    ax2.axhline(peaks["read_gbs"], color="k", ls="--", lw=1, label="read bandwidth (fp32 sum)")
    ax2.set(xscale="log", xlabel="cache length (bf16)", ylabel="GB/s (K and V read once)", ylim=(0, None),
            title="memory-bound: decode")
    ax2.legend(fontsize=8)
    fig.suptitle(f"flashattn_ext on CPU ({_cpu_model()}, {torch.get_num_threads()} threads), peaks measured in the same run",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_worker(variant, B, H, L, D, dtype_name, causal):
    """Peak RSS growth (MiB) during one forward+backward, in this (fresh) process: the peak-RSS
    counter (VmHWM) is reset through /proc/self/clear_refs right before the call."""
    dtype = DTYPES[dtype_name]
    small = make_inputs(1, 1, 32, D, dtype)
    out = attention(variant, *small[:3], causal)
    torch.autograd.grad(out, small[:3], small[3])  # load libraries, start threads
    q, k, v, grad = make_inputs(B, H, L, D, dtype)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    out = attention(variant, q, k, v, causal)
    torch.autograd.grad(out, (q, k, v), grad)
    return (_status_kib("VmHWM") - before) / 1024


def measure_memory(variant, B, H, L, D, dtype_name, causal):
    cmd = [sys.executable, __file__, "--memory-worker", variant, str(B), str(H), str(L), str(D), dtype_name,
           str(int(causal))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu"))
    p.add_argument("--memory-worker", nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_worker:
        variant, B, H, L, D, dtype_name, causal = args.memory_worker
        print(memory_worker(variant, int(B), int(H), int(L), int(D), dtype_name, bool(int(causal))))
        return

    B, H, L, D = (1, 2, 512, 64) if args.quick else (2, 8, 2048, 64)
    mem_B, mem_H, mem_L = (1, 2, 1024) if args.quick else (1, 8, 8192)
    repeats = 2 if args.quick else args.repeats
    info = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "build": flashattn_ext.build_info(),
    }
    print(f"CPU benchmark: B={B} H={H} L=S={L} D={D}, {repeats} repeats (medians), {info['threads']} threads, "
          f"torch {info['torch']}, {info['cpu_model']}")
    peaks = machine_peaks(repeats)
    info["peaks"] = peaks
    print("peaks (this run): bf16 mm {bf16_mm_gflops:.0f}, fp32 mm {fp32_mm_gflops:.0f}, bf16 GEMM hot tile "
          "{bf16_hot_tile_gflops:.0f}, fp32 GEMM hot tile {fp32_hot_tile_gflops:.0f} GFLOP/s; read {read_gbs:.1f} GB/s"
          .format(**peaks))
    print("ratio = torch time / flashattn_ext time (> 1: flashattn_ext faster); GFLOP/s and share of the dtype's "
          "peak (bf16 mm / fp32 hot tile) are ours\n")
    rows = []
    header = (f"{'dtype':<5} {'causal':<6} | {'fwd ms: ours':>12} {'torch':>8} {'math':>8} {'ratio':>6} {'GFLOP/s':>8} "
              f"{'peak':>5} | {'fwd+bwd ms: ours':>16} {'torch':>8} {'math':>8} {'ratio':>6} {'GFLOP/s':>8} {'peak':>5}")
    print(header)
    print("-" * len(header))
    for dtype_name, dtype in DTYPES.items():
        for causal in (False, True):
            r = time_config(B, H, L, D, dtype, causal, repeats, VARIANTS)
            r.update(dtype=dtype_name, causal=causal, B=B, H=H, L=L, D=D)
            r["fwd_ratio_vs_torch_flash"] = r["torch_flash_fwd_ms"] / r["flashattn_ext_fwd_ms"]
            r["fwdbwd_ratio_vs_torch_flash"] = r["torch_flash_fwdbwd_ms"] / r["flashattn_ext_fwdbwd_ms"]
            for kind, bwd in (("fwd", False), ("fwdbwd", True)):
                r[f"{kind}_gflops"] = attention_flops(B, H, L, L, D, causal, bwd) / r[f"flashattn_ext_{kind}_ms"] / 1e6
                r[f"{kind}_peak_share"] = r[f"{kind}_gflops"] / compute_peak(peaks, dtype_name)
            rows.append(r)
            print(f"{dtype_name:<5} {str(causal):<6} | {r['flashattn_ext_fwd_ms']:>12.1f} {r['torch_flash_fwd_ms']:>8.1f} "
                  f"{r['torch_math_fwd_ms']:>8.1f} {r['fwd_ratio_vs_torch_flash']:>6.2f} {r['fwd_gflops']:>8.0f} "
                  f"{r['fwd_peak_share']:>5.0%} | "
                  f"{r['flashattn_ext_fwdbwd_ms']:>16.1f} {r['torch_flash_fwdbwd_ms']:>8.1f} "
                  f"{r['torch_math_fwdbwd_ms']:>8.1f} {r['fwdbwd_ratio_vs_torch_flash']:>6.2f} {r['fwdbwd_gflops']:>8.0f} "
                  f"{r['fwdbwd_peak_share']:>5.0%}")

    print("\nSweep (bf16, causal): training fwd+bwd, GQA prefill fwd — GFLOP/s and share of the bf16 mm peak; "
          "GQA decode — GB/s and share of read bandwidth")
    sw = sweep(repeats, args.quick)
    for r in sw["training"]:
        print(f"  training L={r['L']:<6} B={r['B']:<3} {r['ms']:8.1f} ms {r['gflops']:6.0f} GFLOP/s "
              f"{r['gflops'] / peaks['bf16_mm_gflops']:5.0%}")
    for r in sw["prefill"]:
        print(f"  prefill  L={r['L']:<6}       {r['ms']:8.1f} ms {r['gflops']:6.0f} GFLOP/s "
              f"{r['gflops'] / peaks['bf16_mm_gflops']:5.0%}")
    for r in sw["decode"]:
        print(f"  decode   S={r['S']:<6}       {r['ms']:8.3f} ms {r['gbs']:6.1f} GB/s    {r['gbs'] / peaks['read_gbs']:5.0%}")

    print(f"\nPeak memory growth of one forward+backward, B={mem_B} H={mem_H} L=S={mem_L} D={D} "
          f"(fresh process each):")
    mem = []
    for dtype_name in DTYPES:
        m = {v: measure_memory(v, mem_B, mem_H, mem_L, D, dtype_name, False) for v in VARIANTS}
        m.update(dtype=dtype_name, B=mem_B, H=mem_H, L=mem_L, D=D,
                 ours_over_torch_flash=m["flashattn_ext"] / max(m["torch_flash"], 1e-9),
                 math_over_ours=m["torch_math"] / max(m["flashattn_ext"], 1e-9))
        mem.append(m)
        print(f"  {dtype_name}: flashattn_ext {m['flashattn_ext']:.1f} MiB, torch flash {m['torch_flash']:.1f} MiB "
              f"(ours/torch {m['ours_over_torch_flash']:.3f}), math {m['torch_math']:.1f} MiB "
              f"(math/ours {m['math_over_ours']:.1f}x)")

    if not args.quick:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "bench_cpu.json")
        with open(path, "w") as f:
            json.dump({"info": info, "timing": rows, "sweep": sw, "memory": mem}, f, indent=1)
        print(f"\nsaved {path}")
        png = plot(sw, peaks, os.path.join(args.out, "throughput.png"))
        if png:
            print(f"saved {png}")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
