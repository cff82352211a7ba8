"""The machine's own limits, measured in the same run as the kernels they are compared with
(imported by the CPU benchmarks, which run from this folder)."""

import torch

import flashattn_ext
from timing import median_time


def read_bandwidth(repeats, gib=1.0, device="cpu"):
    """GB/s of summing a large fp32 tensor: the read-bandwidth floor a memory-bound kernel meets."""
    x = torch.ones(int(gib * 2**30 / 4), dtype=torch.float32, device=device)
    t = median_time(lambda: x.sum(), repeats, warmup=2, device=device)
    return x.numel() * 4 / t / 1e9


def mm_peak(dtype, repeats, n=2048, device="cpu"):
    """GFLOP/s of torch.mm on n x n matrices of `dtype` (the bf16 / fp32 compute roof)."""
    a, b = torch.randn(n, n).to(dtype).to(device), torch.randn(n, n).to(dtype).to(device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    t = median_time(lambda: torch.mm(a, b, out=out), repeats, warmup=2, device=device)
    return 2 * n**3 / t / 1e9


def roofline_ms(flops, bytes_moved, peak_gflops, bw_gbs):
    """The time no kernel beats: the slower of computing the FLOPs at the peak and moving the bytes."""
    return max(flops / (peak_gflops * 1e9), bytes_moved / (bw_gbs * 1e9)) * 1e3


def machine_peaks(repeats, device="cpu"):
    """GFLOP/s and GB/s roofs, measured now (machines differ from day to day): torch.mm on 2048³,
    the GEMM micro-kernel the CPU kernels use on a hot 64×64×128 tile (all threads), read bandwidth.
    On a GPU: torch.mm on 8192³ (fp32 without TF32) and the read bandwidth of a 4 GiB sum."""
    cpu = device == "cpu"
    n, gib = (2048, 1.0) if cpu else (8192, 4.0)
    peaks = {
        "bf16_mm_gflops": mm_peak(torch.bfloat16, repeats, n=n, device=device),
        "fp32_mm_gflops": mm_peak(torch.float32, repeats, n=n, device=device),
        "read_gbs": read_bandwidth(repeats, gib=gib, device=device),
    }
    if cpu:
        peaks["bf16_hot_tile_gflops"] = flashattn_ext._C._cpu_gemm_hot_tile_gflops(True, 64, 64, 128, 20000)
        peaks["fp32_hot_tile_gflops"] = flashattn_ext._C._cpu_gemm_hot_tile_gflops(False, 64, 64, 128, 20000)
    return peaks


def compute_peak(peaks, dtype_name):
    """The compute roof a case's share is taken of: bf16 mm for bf16; the fp32 micro-kernel's hot
    tile for fp32 (torch's fp32 mm does not reach it here)."""
    if dtype_name == "bf16":
        return peaks["bf16_mm_gflops"]
    return peaks.get("fp32_hot_tile_gflops", peaks["fp32_mm_gflops"])
