"""Builds flashattn_ext._C with torch.utils.cpp_extension.

    pip install --no-build-isolation -e .

Environment:
  FLASHATTN_BUILD_CUDA=auto|1|0   CUDA sources are compiled when torch has CUDA and nvcc is found
                                  (auto); 1 forces them (fails without nvcc), 0 leaves them out.
  FLASHATTN_CUDA_HEADDIMS=64,128  only these tensor-core head-dim buckets (development builds)
  FLASHATTN_CUDA_DTYPES=bf16      only these tensor-core dtypes (fp16, bf16)
  TORCH_CUDA_ARCH_LIST            target GPUs; default "8.0;9.0+PTX"
  FLASHATTN_CPU_CAPABILITY        AVX512 | AVX2 | DEFAULT; default: what torch detects on the build
                                  machine (the CPU kernels are compiled for it)
  FLASHATTN_BUILD_EMULATOR=1      also build flashattn_ext/libflashattn_emulator.so: the CUDA kernels
                                  compiled by g++ for the host emulator (csrc/cuda/emulator), which
                                  the cuda_emulated tests run on the CPU; needs g++ and the CUDA
                                  headers only (no GPU, no CUDA torch). Honours the two restrictions
                                  above.
  MAX_JOBS                        parallel compile jobs (ninja)
"""

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "csrc", "cuda", "tools"))
import table as cuda_table  # noqa: E402  (csrc/cuda/tools/table.py: the head-dim x dtype table of buckets.h)

sys.path.pop(0)
CUDA_HEADDIMS = tuple(cuda_table.headdims())
CUDA_DTYPES = tuple(cuda_table.dtypes())


def env_flag(name, default="auto"):
    value = os.environ.get(name, default).strip().lower()
    if value not in ("auto", "0", "1"):
        sys.exit(f"{name} must be auto, 0 or 1 (got {value!r})")
    return value


def want_cuda():
    mode = env_flag("FLASHATTN_BUILD_CUDA")
    nvcc = CUDA_HOME is not None and (
        os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc") is not None)
    has_torch_cuda = torch.version.cuda is not None
    if mode == "0":
        return False
    if mode == "1":
        if not (nvcc and has_torch_cuda):
            sys.exit("FLASHATTN_BUILD_CUDA=1 needs a CUDA build of torch and nvcc "
                     f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
        return True
    return nvcc and has_torch_cuda


def cpu_capability_flags():
    cap = os.environ.get("FLASHATTN_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()
    cap = cap.upper()
    if cap in ("AVX512", "AVX512_BF16", "AMX"):
        return ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
                "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"]
    if cap == "AVX2":
        return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


def selected(env, allowed, cast):
    raw = os.environ.get(env, "").strip()
    if not raw:
        return list(allowed)
    chosen = [cast(x) for x in re.split(r"[,\s]+", raw) if x]
    bad = [x for x in chosen if x not in allowed]
    if bad:
        sys.exit(f"{env}: {bad} not in {list(allowed)}")
    return chosen


def cuda_sources_and_defines():
    """The CUDA sources to compile and the flags that restrict the table to them: with
    FLASHATTN_CUDA_HEADDIMS / FLASHATTN_CUDA_DTYPES set, a generated flashattn_cuda_restriction.h
    (read by csrc/cuda/buckets.h) on the include path."""
    headdims = selected("FLASHATTN_CUDA_HEADDIMS", CUDA_HEADDIMS, int)
    dtypes = selected("FLASHATTN_CUDA_DTYPES", CUDA_DTYPES, str)
    sources = sorted(glob.glob("csrc/cuda/*.cu"))
    sources += [os.path.join("csrc", "cuda", cuda_table.instantiation_file(direction, d, t))
                for direction, d, t in cuda_table.entries() if d in headdims and t in dtypes]
    flags = []
    if tuple(headdims) != CUDA_HEADDIMS or tuple(dtypes) != CUDA_DTYPES:
        folder = os.path.join(ROOT, "build", "cuda_restriction")
        os.makedirs(folder, exist_ok=True)
        built_h = [d for d in CUDA_HEADDIMS if d in headdims]
        built_t = [t for t in CUDA_DTYPES if t in dtypes]
        text = (f"#define FLASHATTN_CUDA_BUILT_HEADDIMS {', '.join(map(str, built_h))}\n"
                f"#define FLASHATTN_CUDA_BUILT_DTYPES {', '.join(built_t)}\n")
        path = os.path.join(folder, "flashattn_cuda_restriction.h")
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)
        flags = [f"-I{folder}"]
    return sources, flags


def nvcc_flags():
    """csrc/cuda/nvcc_flags.txt: the nvcc flags (.ci/compile_cuda.sh reads the same file)."""
    with open(os.path.join(ROOT, "csrc", "cuda", "nvcc_flags.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def build_emulator(ext_dir):
    """FLASHATTN_BUILD_EMULATOR=1: builds the emulated CUDA backend beside _C (incremental)."""
    if os.environ.get("FLASHATTN_BUILD_EMULATOR", "0").strip() != "1":
        return
    sys.path.insert(0, os.path.join(ROOT, "csrc", "cuda", "emulator"))
    import build as emulator_build  # csrc/cuda/emulator/build.py
    sys.path.pop(0)
    why = emulator_build.missing_reason()
    if why:
        print(f"flashattn_ext: CUDA emulator not built: {why}; the cuda_emulated tests will skip")
        return
    sources, defines = cuda_sources_and_defines()
    jobs = os.environ.get("MAX_JOBS")
    lib = emulator_build.build(os.path.join(ROOT, "build", "emulator"), [os.path.join(ROOT, s) for s in sources],
                               defines, jobs=int(jobs) if jobs else None)
    os.makedirs(ext_dir, exist_ok=True)
    shutil.copy2(lib, os.path.join(ext_dir, emulator_build.LIBRARY))


class BuildExt(BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)):
    def run(self):
        super().run()
        build_emulator(os.path.dirname(self.get_ext_fullpath("flashattn_ext._C")))


def make_extension():
    os.chdir(ROOT)
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-sign-compare", "-Wno-maybe-uninitialized"] + cpu_capability_flags()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    sources = [s for s in sources if not s.endswith("ops_cuda.cpp")]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not want_cuda():
        return CppExtension("flashattn_ext._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp", "-ldl"])
    # sm_80 and sm_90 machine code, plus sm_90 PTX so newer GPUs JIT it instead of failing.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    cuda_sources, defines = cuda_sources_and_defines()
    nvcc = nvcc_flags() + defines
    return CUDAExtension("flashattn_ext._C", sources + ["csrc/ops_cuda.cpp"] + cuda_sources,
                         include_dirs=include_dirs,
                         define_macros=[("FLASHATTN_WITH_CUDA", "1")],
                         extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc},
                         extra_link_args=["-fopenmp", "-ldl"])


# Name, version (flashattn_ext/__init__.py), dependencies and metadata: pyproject.toml.
setup(
    packages=find_packages(include=["flashattn_ext", "flashattn_ext.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExt},
)
