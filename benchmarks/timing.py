"""Timing shared by the CPU benchmarks (run as `python benchmarks/<name>.py`, so this folder is on
sys.path)."""

import statistics
import time


def median_time(fn, repeats, warmup=1, device="cpu"):
    """Median wall time of fn() in seconds over `repeats` calls, after `warmup` untimed ones; on a
    CUDA device each call is waited for (torch.cuda.synchronize)."""
    if str(device).startswith("cuda"):
        import torch

        call = fn

        def fn():
            call()
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
