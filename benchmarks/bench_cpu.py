"""CPU benchmark: flashattn_ext against torch's CPU SDPA (its flash kernel) and the math path.

Same inputs, one run, medians; forward and forward+backward time printed as ratios (torch time /
flashattn_ext time: > 1 means flashattn_ext is faster), and peak memory growth measured in a fresh
process per variant (max RSS after the call minus before it).

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
from timing import median_time  # noqa: E402  (benchmarks/timing.py)

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
    print("ratio = torch time / flashattn_ext time (> 1: flashattn_ext faster)\n")
    rows = []
    header = (f"{'dtype':<5} {'causal':<6} | {'fwd ms: ours':>12} {'torch':>8} {'math':>8} {'ratio':>6} | "
              f"{'fwd+bwd ms: ours':>16} {'torch':>8} {'math':>8} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for dtype_name, dtype in DTYPES.items():
        for causal in (False, True):
            r = time_config(B, H, L, D, dtype, causal, repeats, VARIANTS)
            r.update(dtype=dtype_name, causal=causal, B=B, H=H, L=L, D=D)
            r["fwd_ratio_vs_torch_flash"] = r["torch_flash_fwd_ms"] / r["flashattn_ext_fwd_ms"]
            r["fwdbwd_ratio_vs_torch_flash"] = r["torch_flash_fwdbwd_ms"] / r["flashattn_ext_fwdbwd_ms"]
            rows.append(r)
            print(f"{dtype_name:<5} {str(causal):<6} | {r['flashattn_ext_fwd_ms']:>12.1f} {r['torch_flash_fwd_ms']:>8.1f} "
                  f"{r['torch_math_fwd_ms']:>8.1f} {r['fwd_ratio_vs_torch_flash']:>6.2f} | "
                  f"{r['flashattn_ext_fwdbwd_ms']:>16.1f} {r['torch_flash_fwdbwd_ms']:>8.1f} "
                  f"{r['torch_math_fwdbwd_ms']:>8.1f} {r['fwdbwd_ratio_vs_torch_flash']:>6.2f}")

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
            json.dump({"info": info, "timing": rows, "memory": mem}, f, indent=1)
        print(f"\nsaved {path}")


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
