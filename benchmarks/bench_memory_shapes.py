"""RSS growth over many distinct attention shapes (issue 12): each call is a forward + backward on a
new (L, S, E, Ev); a cache of generated GEMM micro-kernels keyed by shape would grow without bound.

    python benchmarks/bench_memory_shapes.py --shapes 3000            # fp32, flashattn_ext
    python benchmarks/bench_memory_shapes.py --shapes 3000 --dtype bf16
    python benchmarks/bench_memory_shapes.py --shapes 1000 --repeat-one   # one shape again and again

    python benchmarks/bench_memory_shapes.py --speed      # fwd+bwd ms on training and odd shapes

Prints the RSS after a warm-up, after the run, and the growth (MB). --speed times forward+backward
(medians) of flashattn_ext and torch's CPU flash kernel on a few shapes instead: the micro-kernel
budget must not cost speed on training shapes.
"""

import argparse
import random
import resource  # noqa: F401
import time

import torch

import flashattn_ext
from timing import median_time  # noqa: E402  (benchmarks/timing.py)


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


SPEED_SHAPES = [  # (B, H, L, D): training shapes, then lengths that leave edge tiles
    (2, 8, 1024, 64), (1, 16, 2048, 128), (2, 8, 1000, 64), (4, 8, 77, 64), (8, 8, 1, 64)]


def speed(repeats):

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print(f"fwd+bwd ms (median of {repeats}), threads {torch.get_num_threads()}")
    for dtype in (torch.float32, torch.bfloat16):
        for B, H, L, D in SPEED_SHAPES:
            for causal in (False, True):
                g = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(B, H, L, D, generator=g).to(dtype).requires_grad_() for _ in range(3))
                row = []
                for name in ("flashattn_ext", "torch_flash"):
                    def run():
                        if name == "flashattn_ext":
                            out = flashattn_ext.scaled_dot_product_attention(q, k, v, is_causal=causal)
                        else:
                            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                        torch.autograd.grad(out.sum(), (q, k, v))
                    row.append(1e3 * median_time(run, repeats))
                print(f"  {str(dtype).split('.')[1]:<8} B={B} H={H} L=S={L:<5} D={D} causal={int(causal)}: "
                      f"ours {row[0]:9.3f}  torch {row[1]:9.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=int, default=3000)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "fp64"])
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    p.add_argument("--repeat-one", action="store_true", help="the same shape every call (a control)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed", action="store_true", help="time fwd+bwd on a few shapes instead")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.speed:
        speed(a.repeats)
        return
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}[a.dtype]
    rng = random.Random(a.seed)
    seen, shapes = set(), []
    while len(shapes) < a.shapes:
        s = (rng.randint(1, 160), rng.randint(1, 160), rng.randint(1, 96), rng.randint(1, 96))
        if s not in seen:
            seen.add(s)
            shapes.append(s)
    if a.repeat_one:
        shapes = [shapes[0]] * a.shapes

    def step(L, S, E, Ev):
        q = torch.randn(1, 2, L, E, dtype=dtype, requires_grad=True)
        k = torch.randn(1, 2, S, E, dtype=dtype, requires_grad=True)
        v = torch.randn(1, 2, S, Ev, dtype=dtype, requires_grad=True)
        flashattn_ext.scaled_dot_product_attention(q, k, v).sum().backward()

    for s in [(64, 64, 64, 64), (17, 33, 8, 8), (128, 128, 32, 32)]:  # warm-up: allocator, probes
        step(*s)
    before = rss_mb()
    t0 = time.perf_counter()
    for i, s in enumerate(shapes):
        step(*s)
        if (i + 1) % max(1, a.shapes // 5) == 0:
            print(f"  after {i + 1:5d} shapes: RSS {rss_mb():8.1f} MB (+{rss_mb() - before:.1f})", flush=True)
    after = rss_mb()
    print(f"dtype {a.dtype}, {a.shapes} {'repeats of one shape' if a.repeat_one else 'distinct shapes'}, "
          f"threads {torch.get_num_threads()}: RSS {before:.1f} -> {after:.1f} MB, growth {after - before:.1f} MB, "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
