"""The CPU models of the CUDA kernels' index math (csrc/cuda/tools), run as tests so they run
everywhere, with or without nvcc: the fragment / swizzle / ldmatrix / mma addressing of every
tile configuration of kernel_configs.h against a plain matrix product, the band tile ranges,
deterministic turns, block-sparse mapping and pipeline schedules, and the generated
instantiation files against the table in buckets.h."""

import os
import subprocess
import sys

import pytest

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "cuda", "tools")
sys.path.insert(0, TOOLS)
import table  # noqa: E402

sys.path.pop(0)


def run(script, *args):
    res = subprocess.run([sys.executable, os.path.join(TOOLS, script), *args], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_fragment_model():
    pytest.importorskip("numpy")
    try:
        configs = table.tile_configs()
    except RuntimeError as e:
        pytest.skip(str(e))
    out = run("check_fragments.py")
    assert out.count("ok") >= len({(c["dir"], c["headdim"], c["block_m"], c["block_n"]) for c in configs})


def test_schedule_model():
    run("check_schedules.py")


def test_instantiation_files_match_the_table():
    run("generate_instantiations.py", "--check")
    assert len(table.entries()) == (2 * len(table.headdims()) + len(table.sm90_headdims()) +
                                    len(table.sm90_bwd_headdims())) * len(table.dtypes())
    assert set(table.sm90_headdims()) <= set(table.headdims())
