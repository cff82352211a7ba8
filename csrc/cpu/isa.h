// The CPU kernels (csrc/cpu/*.cpp but blas.cpp) are compiled once per instruction set — DEFAULT,
// AVX2, AVX512, as ATen does — with -DCPU_CAPABILITY=<ISA> and that ISA's -m flags (setup.py,
// cpu_isa_build), and csrc/cpu_dispatch.cpp picks one at run time from the CPU torch detects
// (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY). Everything those files define
// lives in namespace flashattn::cpu::<ISA>, so the three copies never collide; the baseline
// objects are linked first, so an inline function of a shared header (std::, c10::) that the
// linker keeps once is the copy compiled for the baseline ISA.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "csrc/cpu kernels are compiled per ISA (setup.py defines CPU_CAPABILITY); include cpu/kernels.h instead"
#endif
