"""Per-call overhead (issue 12): µs per call on a tiny problem, q (1, 1, 1, 8), k/v (1, 1, 4, 8), through
each entry point, all in the same run (medians over rounds of many calls).

    python benchmarks/bench_overhead.py                 # fp32, forward only, no grad
    python benchmarks/bench_overhead.py --grad          # inputs requiring grad (autograd node per call)
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import flashattn_ext


def per_call_us(fns, calls, rounds):
    """Median µs per call of each fn; the rounds interleave the fns, so that the machine's drift
    (a shared VM's speed moves by 2x between seconds) falls on all of them alike."""
    for fn in fns:
        for _ in range(calls // 10 + 10):
            fn()
    ts = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            ts[i].append((time.perf_counter() - t0) / calls * 1e6)
    return [statistics.median(t) for t in ts]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--grad", action="store_true")
    p.add_argument("--S", type=int, default=4)
    a = p.parse_args()
    torch.manual_seed(0)
    q = torch.randn(1, 1, 1, 8, requires_grad=a.grad)
    k = torch.randn(1, 1, a.S, 8, requires_grad=a.grad)
    v = torch.randn(1, 1, a.S, 8, requires_grad=a.grad)
    torch_sdpa = F.scaled_dot_product_attention
    ours = flashattn_ext.scaled_dot_product_attention
    op = torch.ops.flashattn_ext.fwd
    ctx = torch.no_grad() if not a.grad else torch.enable_grad()
    with ctx, flashattn_ext.patch_sdpa() as patch:
        patched = F.scaled_dot_product_attention
        names = ["torch F.scaled_dot_product_attention", "torch.ops.flashattn_ext.fwd (bare op)",
                 "flashattn_ext.scaled_dot_product_attention", "patch_sdpa: F.scaled_dot_product_attention"]
        fns = [lambda: torch_sdpa(q, k, v), lambda: op(q, k, v), lambda: ours(q, k, v), lambda: patched(q, k, v)]
        rows = list(zip(names, per_call_us(fns, a.calls, a.rounds)))
    assert patch.calls > 0 and not patch.fallbacks
    base = rows[0][1]
    print(f"q (1, 1, 1, 8), k/v (1, 1, {a.S}, 8) fp32, requires_grad={a.grad}, threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}")
    for name, us in rows:
        print(f"  {name:<46} {us:7.2f} µs/call  ({us / base:4.2f}x torch)")


if __name__ == "__main__":
    main()
