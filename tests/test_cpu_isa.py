"""The CPU kernels are compiled once per instruction set and chosen at run time (csrc/cpu/isa.h):
each copy this machine can run gives right answers when forced (ATEN_CPU_CAPABILITY, in a fresh
process), and no code outside an ISA's namespace uses that ISA's registers, so the module loads
and runs on any x86-64 CPU whatever machine built it."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import flashattn_ext

ORDER = ["DEFAULT", "AVX2", "AVX512"]
BUILT = flashattn_ext.build_info()["cpu_isas_built"].split(",")
MACHINE = torch.backends.cpu.get_cpu_capability()
RUNNABLE = [i for i in BUILT if MACHINE in ORDER and ORDER.index(i) <= ORDER.index(MACHINE)]

CHECK = r"""
import sys, torch
sys.path.insert(0, {tests!r})
import flashattn_ext
from reference import reference_attention
from conftest import TOL, assert_close
assert flashattn_ext.build_info()["cpu_capability"] == {isa!r}, flashattn_ext.build_info()["cpu_capability"]
torch.manual_seed(0)
for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
    for (B, H, Hk, L, S, E, causal) in ((2, 4, 2, 67, 131, 40, True), (1, 2, 2, 200, 77, 64, False)):
        q = torch.randn(B, H, L, E).to(dtype).requires_grad_()
        k = torch.randn(B, Hk, S, E).to(dtype).requires_grad_()
        v = torch.randn(B, Hk, S, E).to(dtype).requires_grad_()
        out = flashattn_ext.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        go = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), go)
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref, _ = reference_attention(*leaves, causal=causal)
        ref_grads = torch.autograd.grad(ref, leaves, go.double())
        assert_close(out, ref, dtype, "out")
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert_close(g, r, dtype, name)
# The decode kernel's row tiles (bf16 with AVX512-BF16 in the AVX512 copy, widened elsewhere).
from reference import reference_kvcache
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for (Hq, Hk, D) in ((8, 2, 128), (6, 1, 72)):
        q = torch.randn(2, 1, Hq, D).to(dtype)
        k_cache, v_cache = torch.randn(2, 300, Hk, D).to(dtype), torch.randn(2, 300, Hk, D).to(dtype)
        lens = torch.tensor([300, 157], dtype=torch.int32)
        _, _, ref, _ = reference_kvcache(q, k_cache, v_cache, None, None, lens)
        out = flashattn_ext.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
        assert_close(out, ref, dtype, "kvcache out")
print("ok")
"""


@pytest.mark.parametrize("isa", RUNNABLE)
def test_each_isa_copy_is_correct(isa):
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa.lower())
    r = subprocess.run([sys.executable, "-c", CHECK.format(tests=tests, isa=isa)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]


def test_x86_build_contains_every_isa():
    if MACHINE not in ORDER:
        pytest.skip("not an x86-64 build")
    assert BUILT[0] == "DEFAULT"
    if not os.environ.get("FLASHATTN_CPU_ISAS"):
        assert BUILT == ORDER


def test_vector_registers_only_inside_their_isa():
    """objdump of _C: a function using zmm registers belongs to an AVX512 copy, one using ymm
    registers to an AVX2 or AVX512 copy (an -mavx512 flag leaking onto shared code would make
    the module die with SIGILL on an AVX2 CPU)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) not installed")
    so = flashattn_ext._C.__file__
    text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", so], capture_output=True, text=True,
                          check=True).stdout
    offenders, used = set(), {"zmm": 0, "ymm": 0}
    func = None
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            func = m.group(1)
            continue
        if func is None:
            continue
        if "%zmm" in line:
            used["zmm"] += 1
            if "AVX512" not in func:
                offenders.add(("zmm", func))
        elif "%ymm" in line:
            used["ymm"] += 1
            if "AVX2" not in func and "AVX512" not in func:
                offenders.add(("ymm", func))
    assert not offenders, sorted(offenders)[:20]
    if "AVX512" in BUILT:
        assert used["zmm"] > 0, "no AVX-512 code in an AVX512 build: the check would be vacuous"
    if "AVX2" in BUILT:
        assert used["ymm"] > 0
