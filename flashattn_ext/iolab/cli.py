"""Command line of the I/O lab: ``python -m flashattn_ext.iolab {simulate,compare,sweep,tune,measure}``."""

from __future__ import annotations

import argparse
import json
import re
import sys

from . import bounds, schedules
from .plans import CacheTooSmall
from .simulate import predict, simulate

H100_SMEM_BYTES = 227 * 1024  # shared memory a CTA can have on an H100 (228 KB per SM)

_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000 ** 2, "mib": 1024 ** 2, "gb": 1000 ** 3, "gib": 1024 ** 3}


def parse_cache(text: str, word_bytes: int = 2) -> int:
    """M in words: a plain number is words; a size such as ``227KiB`` or ``96KB`` is bytes,
    divided by ``word_bytes`` (rounded down)."""
    t = str(text).strip().replace("_", "")
    if re.fullmatch(r"\d+", t):
        return int(t)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]+)", t)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"cannot read cache size {text!r}: use words (116224) or bytes (227KiB, 96KB, 4096B)")
    size_bytes = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if word_bytes < 1:
        raise argparse.ArgumentTypeError("--word-bytes must be positive")
    return int(size_bytes // word_bytes)


def _fmt_int(x) -> str:
    return f"{int(x):,}"


def _fmt_tiles(tiles: dict) -> str:
    parts = []
    for k, v in tiles.items():
        if k.startswith("paper_"):
            continue
        parts.append(f"{k}={'x'.join(map(str, v)) if isinstance(v, (tuple, list)) else v}")
    return " ".join(parts)


def _regime(d: int, M: int) -> str:
    if M < d * d:
        return f"small cache (M < d^2 = {d * d}): the N^2 d / sqrt(M) regime"
    return f"large cache (M >= d^2 = {d * d}): the N^2 d^2 / M regime"


def _run_one(name, args, M, *, closed_form=False, backward=False):
    kw = dict(causal=args.causal, density=getattr(args, "density", None), seed=args.seed)
    if name != "block-sparse":
        kw.pop("density")
    if closed_form:
        return predict(name, args.seqlen, args.headdim, M, backward=backward, **kw)
    return simulate(name, args.seqlen, args.headdim, M, backward=backward, **kw)


# ------------------------------------------------------------------------------------ simulate
def cmd_simulate(args) -> int:
    M = parse_cache(args.cache, args.word_bytes)
    sched = schedules.get(args.algorithm, args.backward)
    if args.density is not None and sched.name != "block-sparse":
        print(f"note: --density applies to block-sparse only; ignored for {sched.name}", file=sys.stderr)
    try:
        res = simulate(sched.name, args.seqlen, args.headdim, M, causal=args.causal, density=args.density,
                       seed=args.seed, word_level=args.word_level)
    except (CacheTooSmall, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res.to_json(), indent=2))
        return 0
    exact = "equals" if res.io_words == res.closed_form_io_words else "DIFFERS FROM"
    print(f"{res.algorithm}{' (causal)' if res.causal else ''}: N={res.seqlen} d={res.headdim} "
          f"M={_fmt_int(M)} words  [{_regime(res.headdim, M)}]")
    print(f"  tiles            {_fmt_tiles(res.tiles)}" + (f"  ({res.note})" if res.note else ""))
    if res.density is not None:
        print(f"  block density    {res.density:.4f}")
    print(f"  reads            {_fmt_int(res.reads_words)} words  " +
          ", ".join(f"{k} {_fmt_int(v)}" for k, v in res.reads_by_array.items()))
    print(f"  writes           {_fmt_int(res.writes_words)} words  " +
          ", ".join(f"{k} {_fmt_int(v)}" for k, v in res.writes_by_array.items()))
    print(f"  I/O              {_fmt_int(res.io_words)} words ({exact} the closed form {_fmt_int(res.closed_form_io_words)})")
    print(f"  peak fast memory {_fmt_int(res.peak_words)} of {_fmt_int(M)} words")
    print(f"  lower bound      {res.lower_bound_words:,.0f} words; ratio {res.ratio_to_lower_bound:.2f}")
    print(f"  max |error|      {res.max_abs_error:.2e} vs float64 reference{' (gradients)' if res.backward else ''}")
    print(f"  simulated in     {res.seconds:.2f} s")
    return 0


# ------------------------------------------------------------------------------------ compare
def _names(args):
    names = list(schedules.BACKWARD if args.backward else schedules.FORWARD)
    if not args.backward and getattr(args, "density", None) is None:
        names.remove("block-sparse")
    if args.causal:
        names = [n for n in names if schedules.SCHEDULES[n].causal]
    return names


def compare_rows(args, M):
    rows = []
    for name in _names(args):
        try:
            rows.append(_run_one(name, args, M, closed_form=args.closed_form, backward=args.backward))
        except CacheTooSmall as e:
            print(f"  ({e})", file=sys.stderr)
    dense = [r for r in rows if r.algorithm != "block-sparse"]
    best = min(dense, key=lambda r: r.io_words).algorithm if dense else None
    return rows, best


def cmd_compare(args) -> int:
    M = parse_cache(args.cache, args.word_bytes)
    N, d = args.seqlen, args.headdim
    rows, best = compare_rows(args, M)
    if args.json:
        print(json.dumps({"seqlen": N, "headdim": d, "cache_words": M, "best": best,
                          "rows": [r.to_json() for r in rows]}, indent=2))
        return 0
    print(compare_table(rows, best, N, d, M, args.backward, args.causal, args.closed_form))
    return 0


def compare_table(rows, best, N, d, M, backward=False, causal=False, closed_form=False) -> str:
    lb_std = (bounds.lower_bound_backward if backward else bounds.lower_bound_standard_matmul)(N, d, M)
    lines = [
        f"{'backward' if backward else 'forward'}{' causal' if causal else ''}: N={N} d={d} M={_fmt_int(M)} words "
        f"({M / (d * d):.3g} d^2) - {_regime(d, M)}",
        f"lower bounds: min(N^2d/sqrt(M), N^2d^2/M) = {lb_std:,.0f}" + ("" if backward else
        f"; any matmul min(N^2d^2/M, N^2) = {bounds.lower_bound_any_matmul(N, d, M):,.0f}") +
        f"; compulsory {_fmt_int((bounds.compulsory_backward if backward else bounds.compulsory_forward)(N, d))}",
        "",
        "| algorithm | tiles | reads | writes | I/O (words) | / bound | peak | max err | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " **best**" if r.algorithm == best else ""
        err = "-" if r.max_abs_error is None else f"{r.max_abs_error:.0e}"
        name = r.algorithm + (f" (s={r.density:.2f})" if r.density is not None else "")
        lines.append(f"| {name}{mark} | {_fmt_tiles(r.tiles)} | {_fmt_int(r.reads_words)} | {_fmt_int(r.writes_words)} | "
                     f"{_fmt_int(r.io_words)} | {r.ratio_to_lower_bound:.2f} | {_fmt_int(r.peak_words)} | {err} | {r.seconds:.1f} |")
    if closed_form:
        lines.append("\n(closed forms; the tests check they equal the simulated counts)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ sweep
def sweep_points(d: int, lo: float = 1 / 16, hi: float = 64, per_octave: int = 2):
    """Cache sizes from lo*d^2 to hi*d^2, per_octave points per doubling."""
    out, x = [], lo
    step = 2 ** (1 / per_octave)
    while x <= hi * (1 + 1e-9):
        out.append(max(1, int(round(x * d * d))))
        x *= step
    return sorted(set(out))


def sweep_data(args):
    names = [n for n in _names(args) if n != "block-sparse"]
    Ms = sweep_points(args.headdim, per_octave=args.per_octave)
    data = {n: [] for n in names}
    for M in Ms:
        for n in names:
            try:
                r = _run_one(n, args, M, closed_form=not args.simulate, backward=args.backward)
                data[n].append((M, r.io_words))
            except CacheTooSmall:
                pass
    return Ms, data


def cmd_sweep(args) -> int:
    N, d = args.seqlen, args.headdim
    Ms, data = sweep_data(args)
    names = list(data)
    print(f"{'backward' if args.backward else 'forward'} I/O (words), N={N} d={d}; "
          f"{'simulated' if args.simulate else 'closed forms (equal to the simulated counts)'}")
    print("| M | M/d^2 | " + " | ".join(names) + " | bound |")
    print("|---" * (len(names) + 3) + "|")
    lb = bounds.lower_bound_backward if args.backward else bounds.lower_bound_standard_matmul
    for M in Ms:
        cells = []
        for n in names:
            v = dict(data[n]).get(M)
            cells.append("-" if v is None else f"{v:.3e}")
        print(f"| {M} | {M / (d * d):.4g} | " + " | ".join(cells) + f" | {lb(N, d, M):.3e} |")
    if args.plot:
        plot_sweep(args.plot, N, d, Ms, data, args.backward)
        print(f"wrote {args.plot}")
    return 0


def plot_sweep(path, N, d, Ms, data, backward=False):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - depends on the environment
        raise SystemExit("sweep --plot needs matplotlib: pip install matplotlib")
    fig, ax = plt.subplots(figsize=(7.5, 5))
    styles = {"standard": "s-", "flash1": "v-", "flash2": "o-", "square-tiling": "D-",
              "flash-bwd": "o-", "tiled-bwd": "D-"}
    for name, pts in data.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, styles.get(name, ".-"), ms=4, label=name)
    lb = bounds.lower_bound_backward if backward else bounds.lower_bound_standard_matmul
    ax.plot(Ms, [lb(N, d, M) for M in Ms], "k--", lw=1,
            label="bound, const 1: " + ("Li et al." if backward else "min(N²d/√M, N²d²/M)"))
    if not backward:
        ax.plot(Ms, [bounds.lower_bound_any_matmul(N, d, M) for M in Ms], "k:", lw=1,
                label="any matmul: min(N²d²/M, N²)")
    compulsory = (bounds.compulsory_backward if backward else bounds.compulsory_forward)(N, d)
    ax.axhline(compulsory, color="0.6", ls=":", lw=1, label=f"compulsory {'8' if backward else '4'}Nd")
    ax.axvline(d * d, color="gray", lw=1, label=f"M = d² = {d * d} (regimes meet)")
    h100 = H100_SMEM_BYTES // 2
    if Ms[0] <= h100 <= Ms[-1]:
        ax.axvline(h100, color="tab:red", lw=1, ls="-.", label=f"H100 227 KiB smem = {h100} bf16 words")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("fast memory M (words)")
    ax.set_ylabel("slow-memory traffic (words)")
    ax.set_title(f"{'Backward' if backward else 'Forward'} attention I/O, N={N}, d={d}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ tune
KERNEL_BLOCK_M = (64, 128, 192, 256)
KERNEL_BLOCK_N = (32, 64, 128, 256)


def kernel_tile_rows(N, d, M):
    """FA2-order counts for tensor-core-style tiles (multiples of 32/64) that fit in M."""
    out = []
    for bm in KERNEL_BLOCK_M:
        for bn in KERNEL_BLOCK_N:
            cf = bounds.flash2_io(N, d, bm, bn)
            if cf.peak <= M:
                out.append((bm, bn, cf.io_words, cf.peak))
    return out


def cmd_tune(args) -> int:
    M = parse_cache(args.cache, args.word_bytes)
    N, d = args.seqlen, args.headdim
    args.closed_form = True
    rows, best = compare_rows(args, M)
    by_name = {r.algorithm: r for r in rows}
    if args.json:
        print(json.dumps({"cache_words": M, "best": best, "tiles": by_name[best].tiles,
                          "io_words": by_name[best].io_words,
                          "rows": [r.to_json() for r in rows]}, indent=2))
        return 0
    print(f"M = {args.cache} = {_fmt_int(M)} words of {args.word_bytes} bytes; N={N} d={d}; {_regime(d, M)}")
    for r in sorted(rows, key=lambda r: r.io_words):
        mark = "  <- best" if r.algorithm == best else ""
        print(f"  {r.algorithm:14s} {_fmt_int(r.io_words):>16s} words  ratio {r.ratio_to_lower_bound:5.2f}  "
              f"{_fmt_tiles(r.tiles)}{mark}")
    b = by_name[best]
    print(f"best: {best} with {_fmt_tiles(b.tiles)} (peak {_fmt_int(b.peak_words)} of {_fmt_int(M)} words)")
    if not args.backward:
        ktiles = kernel_tile_rows(N, d, M)
        if ktiles:
            opt = by_name.get("flash2")
            print("FA2-order kernel-style tiles that fit (block_m x block_n, Q/O/K/V/S/stats all in M):")
            for bm, bn, io, peak in ktiles:
                rel = f"  {io / opt.io_words:.2f}x the optimum" if opt else ""
                print(f"  {bm:4d} x {bn:<4d} I/O {_fmt_int(io):>14s} words  peak {_fmt_int(peak):>7s}{rel}")
    return 0


# ------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    names = "".join(f"\n  {n:14s} {s.summary}" for n, s in schedules.SCHEDULES.items())
    p = argparse.ArgumentParser(
        prog="python -m flashattn_ext.iolab",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="I/O complexity lab: attention schedules on a two-level memory model "
                    "(slow memory + M words of fast memory), their exact counts and the lower bounds.",
        epilog=f"algorithms:{names}",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, cache_required=True, cache_default=None):
        sp.add_argument("--seqlen", "-N", type=int, default=4096, help="sequence length N (default 4096)")
        sp.add_argument("--headdim", "-d", type=int, default=128, help="head dimension d (default 128)")
        if cache_required:
            sp.add_argument("--cache", "-M", required=cache_default is None, default=cache_default,
                            help="fast memory M: words (116224) or a size (227KiB) with --word-bytes")
        sp.add_argument("--word-bytes", type=int, default=2, help="bytes per word for sizes like 227KiB (default 2: bf16)")
        sp.add_argument("--causal", action="store_true", help="causal attention: fully masked tiles are skipped")
        sp.add_argument("--backward", action="store_true", help="the backward pass (dQ, dK, dV)")
        sp.add_argument("--seed", type=int, default=0, help="seed for inputs and random block masks")
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = sub.add_parser("simulate", help="run one schedule on the model and count its I/O",
                        epilog=f"algorithms:{names}", formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("--algorithm", "-a", required=True, choices=list(schedules.SCHEDULES),
                    help="schedule to run; with --backward a forward name picks its family's backward")
    common(sp)
    sp.add_argument("--density", type=float, default=None, help="block-sparse: fraction of non-zero blocks (random, seeded)")
    sp.add_argument("--word-level", action="store_true", help="count word by word (slow; small sizes only)")
    sp.set_defaults(func=cmd_simulate)

    sp = sub.add_parser("compare", help="every algorithm for one (N, d, M), ratio to the bound, best marked")
    common(sp)
    sp.add_argument("--density", type=float, default=None, help="also run block-sparse at this density")
    sp.add_argument("--closed-form", action="store_true", help="use the closed forms instead of simulating")
    sp.set_defaults(func=cmd_compare)

    sp = sub.add_parser("sweep", help="I/O against M from d^2/16 to 64 d^2 (log-log plot with --plot)")
    common(sp, cache_required=False)
    sp.add_argument("--plot", metavar="FILE.png", help="write the log-log plot (needs matplotlib)")
    sp.add_argument("--simulate", action="store_true", help="simulate every point (default: closed forms)")
    sp.add_argument("--per-octave", type=int, default=2, help="points per doubling of M (default 2)")
    sp.set_defaults(func=cmd_sweep)

    sp = sub.add_parser("tune", help="the best algorithm and tile sizes for a given M")
    common(sp, cache_default="227KiB")
    sp.set_defaults(func=cmd_tune)

    sp = sub.add_parser("measure", help="on a GPU: Nsight Compute bytes of our and torch's kernels vs the model")
    sp.add_argument("--seqlen", "-N", type=int, default=4096)
    sp.add_argument("--headdims", type=int, nargs="+", default=[64, 128])
    sp.add_argument("--heads", type=int, default=16)
    sp.add_argument("--batch", type=int, default=1)
    sp.add_argument("--ncu", default=None, help="path to ncu (default: from PATH or /usr/local/cuda/bin)")
    sp.add_argument("--keep", metavar="DIR", default=None, help="keep the driver script and raw CSV here")
    sp.set_defaults(func=_cmd_measure)
    return p


def _cmd_measure(args) -> int:
    from .measure import main as measure_main

    return measure_main(args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "causal", False) and args.command == "simulate":
        sched = schedules.get(args.algorithm, args.backward)
        if not sched.causal:
            print(f"error: {sched.name} has no causal variant", file=sys.stderr)
            return 2
    return args.func(args)


__all__ = ["main", "build_parser", "parse_cache", "sweep_points", "kernel_tile_rows", "compare_table"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
