#!/usr/bin/env python3
"""Attention throughput on the GPU: flashattn_ext next to torch SDPA's FLASH, EFFICIENT and CUDNN
backends and FlexAttention (torch.compile), in the same run.

The field's sweep (FlashAttention papers): bf16, hidden size 2048 (H = 2048 / D), B * S = 16k
tokens, S from 512 to 16k, head dims 64 / 128 / 256, causal and not. FLOPs: forward 4 B H L S D
(halved for causal), backward 2.5 x forward, forward + backward 3.5 x forward.
Times are medians of CUDA-event timings over rotating input sets (the first calls, FlexAttention's
compilation included, are untimed warmup); peak memory is max_memory_allocated above the inputs
during one forward + backward.

Writes <out>/<gpu-slug>/bench_attention[_<tag>].{csv,json,png} (the JSON records the GPU, torch
and CUDA versions and the command line; the tag names a subset: _quick, _d128, ...) and prints a
table and the ratios against FLASH and CUDNN. FlexAttention compiles once per shape (~10-30 s
each), so the full sweep is best run one head dim per call (--headdims 128) on a time limit.

    python benchmarks/bench_attention.py                 # full sweep (~5 min on an H100)
    python benchmarks/bench_attention.py --quick         # D=128, S in {1k, 4k, 16k}, fwd and fwd+bwd, vs FLASH, CUDNN
"""

import argparse
import csv
import datetime
import json
import os
import platform
import re
import statistics
import sys

import torch

from plotting import pyplot  # noqa: E402  (benchmarks/)

ROOT = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ["ours", "flash", "efficient", "cudnn", "flex"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="the first GPU run's subset: D=128, S in {1k, 4k, 16k}, causal and not, fwd and fwd+bwd, "
                         "vs torch's FLASH and CUDNN backends")
    ap.add_argument("--headdims", default="64,128,256")
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--causal", default="both", choices=["both", "true", "false"])
    ap.add_argument("--modes", default="fwd,bwd,fwd_bwd")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"subset of {BACKENDS}")
    ap.add_argument("--tokens", type=int, default=16384, help="B * S")
    ap.add_argument("--hidden", type=int, default=2048, help="H * D")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rotate", type=int, default=3, help="input sets cycled through (defeats L2 reuse)")
    ap.add_argument("--out", default=os.path.join(ROOT, "results"))
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.headdims, args.seqlens, args.causal = "128", "1024,4096,16384", "both"
        args.modes, args.backends = "fwd,fwd_bwd", "ours,flash,cudnn"
    return args


def slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def flops(b, h, s, d, causal, mode):
    f = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
    return f * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]


def median_ms(fn, warmup, reps):
    """Median of `reps` CUDA-event timings after `warmup` untimed calls (counts, not ms)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_attention(backend, causal):
    """A function (q, k, v) -> out for one backend, or raise if it is unavailable."""
    import torch.nn.functional as F

    if backend == "ours":
        import flashattn_ext

        return lambda q, k, v: flashattn_ext.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        masks = {}

        def run(q, k, v):
            if not causal:
                return compiled(q, k, v)
            key = (q.shape[-2], k.shape[-2])
            if key not in masks:
                masks[key] = create_block_mask(lambda b, h, i, j: i >= j, None, None, key[0], key[1], device=q.device)
            return compiled(q, k, v, block_mask=masks[key])

        return run
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run(q, k, v):
        with sdpa_kernel([which]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def bench_one(backend, b, h, s, d, causal, dtype, args):
    attn = make_attention(backend, causal)
    sets = []
    for _ in range(args.rotate):
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        sets.append((q, k, v, torch.randn(b, h, s, d, device="cuda", dtype=dtype)))
    counter = [0]

    def next_set():
        counter[0] = (counter[0] + 1) % len(sets)
        return sets[counter[0]]

    row = {}
    modes = args.modes.split(",")
    if "fwd" in modes:
        def fwd():
            q, k, v, _ = next_set()
            with torch.no_grad():
                attn(q, k, v)

        row["fwd"] = median_ms(fwd, args.warmup, args.reps)
    if "bwd" in modes:
        outs = [attn(q, k, v) for q, k, v, _ in sets]

        def bwd():
            i = counter[0] = (counter[0] + 1) % len(sets)
            q, k, v, dout = sets[i]
            torch.autograd.grad(outs[i], (q, k, v), dout, retain_graph=True)

        row["bwd"] = median_ms(bwd, args.warmup, args.reps)
        del outs
    if "fwd_bwd" in modes:
        def fwd_bwd():
            q, k, v, dout = next_set()
            out = attn(q, k, v)
            torch.autograd.grad(out, (q, k, v), dout)

        row["fwd_bwd"] = median_ms(fwd_bwd, args.warmup, args.reps)
    # Peak memory of one forward + backward above what the inputs already hold.
    q, k, v, dout = sets[0]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = attn(q, k, v)
    torch.autograd.grad(out, (q, k, v), dout)
    del out
    torch.cuda.synchronize()
    row["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def print_table(rows, modes):
    hdr = f"{'D':>4} {'S':>6} {'B':>3} {'H':>3} {'causal':>6} {'backend':>10} " + " ".join(
        f"{m + ' TF/s':>12}" for m in modes) + f" {'peak MB':>9}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        cells = " ".join(f"{r.get(m + '_tflops', float('nan')):12.1f}" for m in modes)
        err = f"  ({r['error']})" if r.get("error") else ""
        print(f"{r['headdim']:>4} {r['seqlen']:>6} {r['batch']:>3} {r['heads']:>3} {str(r['causal']):>6} "
              f"{r['backend']:>10} {cells} {r.get('peak_mem_mb', float('nan')):9.1f}{err}")


def ratios(rows, modes):
    """ours / reference for each config and mode, for the FLASH and CUDNN backends."""
    by_key = {}
    for r in rows:
        by_key[(r["headdim"], r["seqlen"], r["causal"], r["backend"])] = r
    out = []
    for r in rows:
        if r["backend"] != "ours":
            continue
        for ref in ("flash", "cudnn"):
            o = by_key.get((r["headdim"], r["seqlen"], r["causal"], ref))
            if not o:
                continue
            entry = {"headdim": r["headdim"], "seqlen": r["seqlen"], "causal": r["causal"], "vs": ref}
            for m in modes + ["peak_mem_mb"]:
                key = m if m == "peak_mem_mb" else m + "_tflops"
                a, b = r.get(key), o.get(key)
                if a and b:
                    entry[m] = a / b
            out.append(entry)
    return out


def plot(rows, modes, path):
    plt = pyplot()
    if plt is None:
        return False
    configs = sorted({(r["headdim"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(len(configs), len(modes), figsize=(5 * len(modes), 3.2 * len(configs)), squeeze=False)
    for ci, (d, causal) in enumerate(configs):
        for mi, m in enumerate(modes):
            ax = axes[ci][mi]
            for backend in BACKENDS:
                pts = sorted((r["seqlen"], r.get(m + "_tflops")) for r in rows
                             if r["headdim"] == d and r["causal"] == causal and r["backend"] == backend
                             and r.get(m + "_tflops"))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{m}, d={d}, {'causal' if causal else 'non-causal'}")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention.py: no CUDA device; nothing to measure")
        return 1
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    backends = args.backends.split(",")
    modes = args.modes.split(",")
    causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
    gpu = torch.cuda.get_device_name()
    out_dir = os.path.join(args.out, slug(gpu))
    os.makedirs(out_dir, exist_ok=True)
    meta = {
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": args.dtype,
        "tokens": args.tokens,
        "hidden": args.hidden,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("FLASHATTN_", "TORCH_CUDA_ARCH"))},
    }
    try:
        import flashattn_ext

        meta["flashattn_ext_build"] = {k: (list(v) if isinstance(v, (list, tuple)) else v)
                                       for k, v in flashattn_ext.build_info().items()}
    except Exception as e:  # noqa: BLE001
        meta["flashattn_ext_build"] = f"unavailable: {e}"
    print(f"{gpu} | torch {torch.__version__} | CUDA {torch.version.cuda} | {args.dtype}")

    rows = []
    for d in [int(x) for x in args.headdims.split(",")]:
        h = args.hidden // d
        for s in [int(x) for x in args.seqlens.split(",")]:
            b = max(1, args.tokens // s)
            for causal in causals:
                for backend in backends:
                    row = {"headdim": d, "seqlen": s, "batch": b, "heads": h, "causal": causal, "backend": backend}
                    try:
                        res = bench_one(backend, b, h, s, d, causal, dtype, args)
                        for m in modes:
                            if m in res:
                                row[m + "_ms"] = res[m]
                                row[m + "_tflops"] = flops(b, h, s, d, causal, m) / (res[m] * 1e-3) / 1e12
                        row["peak_mem_mb"] = res["peak_mem_mb"]
                    except Exception as e:  # noqa: BLE001 - a backend may not support a config
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                    rows.append(row)
                    torch.cuda.empty_cache()
                    t = " ".join(f"{m}={row.get(m + '_tflops', float('nan')):.1f}" for m in modes)
                    print(f"  d={d} S={s} causal={causal} {backend}: {t} TF/s"
                          + (f"  [{row['error']}]" if "error" in row else ""), flush=True)

    print()
    print_table(rows, modes)
    rat = ratios(rows, modes)
    print("\nRatios ours / reference (same run):")
    for r in rat:
        cells = " ".join(f"{m}={r[m]:.2f}" for m in modes + ["peak_mem_mb"] if m in r)
        print(f"  d={r['headdim']} S={r['seqlen']} causal={r['causal']} vs {r['vs']}: {cells}")

    tag = "_quick" if args.quick else ("" if args.headdims == "64,128,256" else "_d" + args.headdims.replace(",", "-"))
    base = os.path.join(out_dir, "bench_attention" + tag)
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("headdim", "seqlen", "batch", "heads",
                                                                           "causal", "backend"), k))
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "ratios": rat}, f, indent=1, default=str)
    if not args.no_plot:
        plot(rows, modes, base + ".png")
    print(f"\nwrote {base}.csv / .json" + ("" if args.no_plot else " / .png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
