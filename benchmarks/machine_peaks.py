"""The machine's own limits, measured in the same run as the kernels they are compared with
(imported by the CPU benchmarks, which run from this folder)."""

import torch

from timing import median_time


def read_bandwidth(repeats, gib=1.0):
    """GB/s of summing a large fp32 tensor: the read-bandwidth floor a memory-bound kernel meets."""
    x = torch.ones(int(gib * 2**30 / 4), dtype=torch.float32)
    t = median_time(lambda: x.sum(), repeats, warmup=2)
    return x.numel() * 4 / t / 1e9


def mm_peak(dtype, repeats, n=2048):
    """GFLOP/s of torch.mm on n x n matrices of `dtype` (the bf16 / fp32 compute roof)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    t = median_time(lambda: torch.mm(a, b, out=out), repeats, warmup=2)
    return 2 * n**3 / t / 1e9


def roofline_ms(flops, bytes_moved, peak_gflops, bw_gbs):
    """The time no kernel beats: the slower of computing the FLOPs at the peak and moving the bytes."""
    return max(flops / (peak_gflops * 1e9), bytes_moved / (bw_gbs * 1e9)) * 1e3
