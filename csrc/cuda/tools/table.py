"""The tensor-core instantiation table of csrc/cuda/buckets.h (head-dim buckets x dtypes), parsed
from that header so Python (setup.py, the CI scripts, the emulator build, the tools and the tests)
never restates it."""

import os
import re

BUCKETS_H = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "buckets.h")


def _list(name):
    text = open(BUCKETS_H).read()
    m = re.search(rf"^#define {name} (.+)$", text, re.M)
    if not m:
        raise RuntimeError(f"{BUCKETS_H} has no #define {name}")
    return [x.strip() for x in m.group(1).split(",")]


def headdims():
    """The head-dim buckets, increasing: [32, 64, ...]."""
    return [int(x) for x in _list("FLASHATTN_CUDA_HEADDIMS")]


def dtypes():
    """The tensor-core element types by their file-name tags: ["fp16", "bf16"]."""
    return _list("FLASHATTN_CUDA_DTYPES")


def sm90_headdims():
    """The buckets that also have a Hopper (sm_90a) forward: [64, 128, 256]."""
    return [int(x) for x in _list("FLASHATTN_CUDA_SM90_HEADDIMS")]


def sm90_bwd_headdims():
    """The buckets that also have a Hopper (sm_90a) backward: [64, 128]."""
    return [int(x) for x in _list("FLASHATTN_CUDA_SM90_BWD_HEADDIMS")]


def instantiation_file(direction, headdim, dtype):
    """Path relative to csrc/cuda of the translation unit of one table entry."""
    return f"instantiations/{direction}_hdim{headdim}_{dtype}.cu"


def entries():
    """(direction, head dim, dtype) for every table entry."""
    return ([(direction, d, t) for direction in ("fwd", "bwd") for d in headdims() for t in dtypes()] +
            [("fwd_sm90", d, t) for d in sm90_headdims() for t in dtypes()] +
            [("bwd_sm90", d, t) for d in sm90_bwd_headdims() for t in dtypes()])


def tile_configs(build_dir=None):
    """Every kernel configuration of kernel_configs.h (dicts: dir, role, headdim, block_m, ...),
    from tools/tile_configs.cpp compiled with g++ against the CUDA headers (no GPU, no nvcc).
    Raises RuntimeError where the headers are missing."""
    import json
    import subprocess
    import sys

    cuda = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(cuda, "emulator"))
    import build as emulator_build  # noqa: E402 (finds the CUDA headers the same way)

    sys.path.pop(0)
    include = emulator_build.find_cuda_include()
    if include is None:
        raise RuntimeError("CUDA headers not found (cuda_fp16.h): set CUDA_HOME")
    build_dir = build_dir or os.path.join(os.path.dirname(os.path.dirname(cuda)), "build", "tools")
    os.makedirs(build_dir, exist_ok=True)
    exe = os.path.join(build_dir, "tile_configs")
    src = os.path.join(cuda, "tools", "tile_configs.cpp")
    deps = [src] + [os.path.join(cuda, f) for f in ("kernel_configs.h", "kernel_traits.h", "buckets.h", "smem_layout.h")]
    if not os.path.exists(exe) or any(os.path.getmtime(d) > os.path.getmtime(exe) for d in deps):
        subprocess.run([os.environ.get("CXX", "g++"), "-std=c++17", "-O0", "-DFLASHATTN_CUDA_EMULATE", "-I",
                        os.path.dirname(cuda), "-I", include, src, "-o", exe], check=True)
    out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]
