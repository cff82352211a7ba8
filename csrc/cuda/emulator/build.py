"""Builds libflashattn_emulator.so: the CUDA sources of csrc/cuda compiled by g++ against the host
emulator (FLASHATTN_CUDA_EMULATE), plus the emulator itself. Torch-free; needs only g++, ninja and
the CUDA toolkit's headers (cuda_fp16.h, cuda_bf16.h, the runtime's declarations).

The kernel translation units are compiled with -fsanitize=thread, which makes g++ call a hook
before every memory access; the emulator defines those hooks (shared_memory.cpp) and no
ThreadSanitizer runtime is linked. Builds are incremental (ninja, depfiles).

Used by setup.py (FLASHATTN_BUILD_EMULATOR=1) and by mutate.py.
"""

import os
import shutil
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.dirname(os.path.dirname(HERE))
LIBRARY = "libflashattn_emulator.so"

COMMON = ["-std=c++17", "-O2", "-g1", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing", "-Wall",
          "-Wno-unknown-pragmas", "-DFLASHATTN_CUDA_EMULATE"]
KERNEL = ["-x", "c++", "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"]


def find_cuda_include():
    """The CUDA toolkit's include directory, or None."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(real)), "include"))
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include"))
    candidates += ["/usr/local/cuda/include", "/usr/include"]
    for c in candidates:
        if os.path.exists(os.path.join(c, "cuda_fp16.h")) and os.path.exists(os.path.join(c, "cuda_runtime_api.h")):
            return c
    return None


def missing_reason():
    """Why the emulator cannot be built here (one line), or None."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401
        except ImportError:
            return "ninja not found (pip install ninja)"
    if find_cuda_include() is None:
        return "the CUDA toolkit headers (cuda_fp16.h, cuda_runtime_api.h) were not found (set CUDA_HOME)"
    return None


def _ninja():
    exe = shutil.which("ninja")
    if exe:
        return exe
    import ninja
    return os.path.join(ninja.BIN_DIR, "ninja")


def run_ninja(build_dir, text, jobs=None, verbose=False):
    """Writes build_dir/build.ninja (only when its text changed) and runs ninja there."""
    os.makedirs(build_dir, exist_ok=True)
    ninja_file = os.path.join(build_dir, "build.ninja")
    if not os.path.exists(ninja_file) or open(ninja_file).read() != text:
        with open(ninja_file, "w") as f:
            f.write(text)
    cmd = [_ninja(), "-C", build_dir]
    if jobs:
        cmd += ["-j", str(jobs)]
    if verbose:
        cmd.append("-v")
    subprocess.run(cmd, check=True)


def kernel_sources(csrc=CSRC):
    """Every .cu of the GPU build (csrc/cuda and csrc/cuda/instantiations; build() adds the
    emulator's own self-test kernels)."""
    out = []
    for sub in ("", "instantiations"):
        d = os.path.join(csrc, "cuda", sub)
        out += [os.path.join(d, f) for f in os.listdir(d) if f.endswith(".cu")]
    return sorted(out)


def build(build_dir, kernel_files, defines=(), jobs=None, csrc=CSRC, verbose=False):
    """Compiles `kernel_files` (paths under csrc/cuda) and the emulator into build_dir/LIBRARY
    and returns its path. `defines`: extra flags (setup.py's -I of the restricted table header,
    the same as for the GPU build)."""
    include = find_cuda_include()
    if include is None:
        raise RuntimeError(missing_reason())
    emulator = os.path.join(csrc, "cuda", "emulator")
    os.makedirs(build_dir, exist_ok=True)
    cxx = os.environ.get("CXX", "g++")
    flags = " ".join(COMMON + list(defines) + ["-I", csrc, "-I", include])
    lines = [
        f"cxx = {cxx}",
        f"flags = {flags}",
        "rule kernel",
        f"  command = $cxx $flags {' '.join(KERNEL)} -MMD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = emulator kernel $in",
        "rule core",
        "  command = $cxx $flags -O3 -MMD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = emulator $in",
        "rule link",
        f"  command = $cxx -shared -o $out $in -Wl,--no-undefined -Wl,--version-script={os.path.join(emulator, 'exports.map')}",
        "  description = link $out",
    ]
    objects = []
    selftest = sorted(os.path.join(emulator, n) for n in os.listdir(emulator) if n.endswith(".cu"))
    for src in list(kernel_files) + selftest:
        rel = os.path.relpath(src, os.path.join(csrc, "cuda")).replace(os.sep, "_")
        obj = os.path.join(build_dir, "obj", rel + ".o")
        objects.append(obj)
        lines.append(f"build {obj}: kernel {src}")
    for name in sorted(os.listdir(emulator)):
        if name.endswith(".cpp") or name.endswith(".S"):
            obj = os.path.join(build_dir, "obj", "emulator_" + name + ".o")
            objects.append(obj)
            lines.append(f"build {obj}: core {os.path.join(emulator, name)}")
    out = os.path.join(build_dir, LIBRARY)
    lines.append(f"build {out}: link {' '.join(objects)} | {os.path.join(emulator, 'exports.map')}")
    lines.append(f"default {out}")
    run_ninja(build_dir, "\n".join(lines) + "\n", jobs=jobs, verbose=verbose)
    return out
