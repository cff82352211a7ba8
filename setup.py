"""Builds flashattn_ext._C with torch.utils.cpp_extension.

    pip install --no-build-isolation -e .

Environment:
  FLASHATTN_BUILD_CUDA=auto|1|0   CUDA sources are compiled when torch has CUDA and nvcc is found
                                  (auto); 1 forces them (fails without nvcc), 0 leaves them out.
  FLASHATTN_CUDA_HEADDIMS=64,128  only these tensor-core head-dim buckets (development builds)
  FLASHATTN_CUDA_DTYPES=bf16      only these tensor-core dtypes (fp16, bf16)
  TORCH_CUDA_ARCH_LIST            target GPUs; default "8.0;9.0+PTX"
  FLASHATTN_CPU_ISAS=AVX512       the CPU kernels are compiled once per instruction set (DEFAULT,
                                  AVX2, AVX512 on x86-64; DEFAULT elsewhere) and chosen at run time
                                  (csrc/cpu/isa.h); this builds only DEFAULT and the ones named
                                  (development builds)
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


# The CPU kernels' instruction sets: name -> g++ flags (csrc/cpu/isa.h). DEFAULT is the baseline.
CPU_ISAS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}
# csrc/cpu/*.cpp compiled once per ISA; the rest of csrc is compiled once, for the baseline.
CPU_BASELINE_SOURCES = ("csrc/cpu/blas.cpp",)
# -g0: Python's CFLAGS (which torch's BuildExtension passes first) carry -g; debug info nearly
# doubles the compile time of the large op-layer units (ops_varlen.cpp: 77 s -> 41 s).
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-sign-compare", "-Wno-maybe-uninitialized"]


def cpu_isas():
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["DEFAULT"]
    names = selected("FLASHATTN_CPU_ISAS", tuple(CPU_ISAS), str.upper)
    return ["DEFAULT"] + [n for n in CPU_ISAS if n != "DEFAULT" and n in names]


def cpu_isa_sources():
    return sorted(s for s in glob.glob("csrc/cpu/*.cpp") if s not in CPU_BASELINE_SOURCES)


def build_cpu_isa_objects(build_dir, jobs=None):
    """Compiles cpu_isa_sources() once per ISA (incremental: ninja with depfiles) and returns the
    objects, baseline ISA first (the link order csrc/cpu/isa.h relies on)."""
    from torch.utils.cpp_extension import include_paths
    import sysconfig
    sys.path.insert(0, os.path.join(ROOT, "csrc", "cuda", "emulator"))
    import build as emulator_build  # its ninja runner
    sys.path.pop(0)
    # As torch's BuildExtension compiles the baseline sources (Python's -DNDEBUG -fwrapv included).
    # -ffp-contract=off: no implicit FMA (csrc/cpu/scores.h's ScaledExp needs x * f - m rounded twice).
    common = ["-std=c++20", "-fPIC", "-DNDEBUG", "-fwrapv", "-ffp-contract=off"] + CXX_FLAGS + [f"-I{os.path.join(ROOT, 'csrc')}"]
    common += [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    if hasattr(torch._C, "_GLIBCXX_USE_CXX11_ABI"):
        common.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
    lines = [f"cxx = {os.environ.get('CXX', 'c++')}", f"common = {' '.join(common)}"]
    objects = []
    for isa in cpu_isas():
        lines += [f"rule cxx_{isa}",
                  f"  command = $cxx $common -DCPU_CAPABILITY={isa} -DCPU_CAPABILITY_{isa} "
                  f"{' '.join(CPU_ISAS[isa])} -MMD -MF $out.d -c $in -o $out",
                  "  depfile = $out.d", "  deps = gcc", f"  description = {isa} $in"]
        for src in cpu_isa_sources():
            obj = os.path.join(build_dir, isa, os.path.basename(src) + ".o")
            objects.append(obj)
            lines.append(f"build {obj}: cxx_{isa} {os.path.join(ROOT, src)}")
    emulator_build.run_ninja(build_dir, "\n".join(lines) + "\n", jobs=jobs)
    return objects


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
    def build_extensions(self):
        jobs = os.environ.get("MAX_JOBS")
        objects = build_cpu_isa_objects(os.path.join(ROOT, "build", "cpu_isa"), int(jobs) if jobs else None)
        for ext in self.extensions:
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extensions()

    def run(self):
        super().run()
        build_emulator(os.path.dirname(self.get_ext_fullpath("flashattn_ext._C")))


def make_extension():
    os.chdir(ROOT)
    cxx = CXX_FLAGS + [f"-DFLASHATTN_CPU_BUILT_{isa}" for isa in cpu_isas() if isa != "DEFAULT"]
    sources = sorted(glob.glob("csrc/*.cpp")) + list(CPU_BASELINE_SOURCES)
    sources = [s for s in sources if not s.endswith("ops_cuda.cpp")]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not want_cuda():
        return CppExtension("flashattn_ext._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp", "-ldl"])
    # sm_80 machine code and PTX (newer GPUs JIT it instead of failing) and sm_90a machine code:
    # H100/H200 run the Hopper forward (wgmma, setmaxnreg need the arch-specific target) and the
    # FA2 kernels. With 9.0a in the list, dispatch.cu is told so (FLASHATTN_CUDA_SM90A).
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX;9.0a")
    cuda_sources, defines = cuda_sources_and_defines()
    nvcc = nvcc_flags() + defines
    if "9.0a" in re.split(r"[;\s]+", os.environ["TORCH_CUDA_ARCH_LIST"].replace("+PTX", "")):
        nvcc.append("-DFLASHATTN_CUDA_SM90A")
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
