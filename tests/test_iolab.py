"""Tests of the I/O complexity lab (flashattn_ext.iolab): NumPy only, no GPU."""

import json
import subprocess
import sys

import numpy as np
import pytest

from flashattn_ext.iolab import (
    BACKWARD,
    FORWARD,
    SCHEDULES,
    CacheTooSmall,
    CapacityError,
    Operand,
    ResidencyError,
    TwoLevelMemory,
    bounds,
    plan_for,
    predict,
    simulate,
)
from flashattn_ext.iolab import cli, measure
from flashattn_ext.iolab.plans import fit_flash1, search_tiles

ALL = list(SCHEDULES)
CAUSAL = [n for n, s in SCHEDULES.items() if s.causal]


def _pattern(rows, cols):
    """A user-specified block pattern (a callable of the block grid): the diagonal and every third block."""
    i, j = np.indices((rows, cols))
    return (i * cols // rows == j) | ((i + 2 * j) % 3 == 0)


def _sim(name, N, d, M, **kw):
    """Simulate, and check: the counts equal the closed form per array, the peak equals its closed
    form and is <= M, the output (or the gradients) match the float64 reference."""
    if name == "block-sparse" and "density" not in kw:
        kw["block_mask"] = _pattern
    res = simulate(name, N, d, M, **kw)
    plan = plan_for(name, N, d, M, causal=kw.get("causal", False), density=kw.get("density"),
                    block_mask=kw.get("block_mask"), seed=kw.get("seed", 0))
    cf = plan.closed_form().clean()
    assert res.reads_by_array == cf.reads
    assert res.writes_by_array == cf.writes
    assert res.io_words == res.closed_form_io_words == cf.io_words
    assert res.peak_words == res.closed_form_peak_words == cf.peak <= M
    assert res.max_abs_error < 1e-12
    return res


# ----------------------------------------------------------------------------- the memory model
def test_capacity_is_enforced():
    mem = TwoLevelMemory(100)
    mem.place("A", np.arange(200.0).reshape(20, 10))
    t = mem.load("A", slice(0, 6))  # 60 words
    with pytest.raises(CapacityError):
        mem.load("A", slice(6, 11))  # 50 more: 110 > 100
    with pytest.raises(CapacityError):
        mem.alloc((5, 9))
    assert mem.used_words == 60 and mem.reads == {"A": 60}  # a refused step changes nothing
    s = mem.alloc((4, 10))
    assert mem.used_words == mem.peak_words == 100
    mem.free(t, s)
    assert mem.used_words == 0 and mem.peak_words == 100


def test_computing_on_non_resident_data_is_refused():
    mem = TwoLevelMemory(1000)
    mem.place("A", np.ones((8, 8)))
    mem.create("B", (8, 8))
    t = mem.load("A", (slice(0, 4), slice(0, 8)))
    assert t.data.sum() == 32
    mem.free(t)
    with pytest.raises(ResidencyError):
        t.data
    with pytest.raises(ResidencyError):
        mem.store(t, "B", slice(0, 4))
    with pytest.raises(ResidencyError):
        mem.free(t)
    acc = mem.alloc((4, 4))
    mem.free(acc)
    with pytest.raises(ResidencyError):
        mem.stream_product(acc, Operand("A", slice(0, 4)), Operand("A", slice(0, 4), transposed=True), slice(0, 8), 2)
    # slow memory is reachable only through loads
    assert not hasattr(mem, "slow")
    with pytest.raises(IndexError):
        mem.load("A", slice(6, 10))


def test_stream_product_counts_and_computes():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((9, 7)), rng.standard_normal((5, 7))
    for word_level in (False, True):
        mem = TwoLevelMemory(40, word_level=word_level)
        mem.place("A", a)
        mem.place("B", b)
        acc = mem.alloc((4, 3))
        mem.stream_product(acc, Operand("A", slice(2, 6)), Operand("B", slice(1, 4), transposed=True), slice(1, 7), 3,
                           alpha=0.5)
        np.testing.assert_allclose(acc.data, 0.5 * a[2:6, 1:7] @ b[1:4, 1:7].T)
        assert mem.reads == {"A": 4 * 6, "B": 3 * 6}
        assert mem.peak_words == 12 + 3 * (4 + 3)
        with pytest.raises(CapacityError):
            mem.stream_product(acc, Operand("A", slice(2, 6)), Operand("B", slice(1, 4), transposed=True), slice(0, 7), 5)


def test_a_schedule_that_does_not_fit_is_refused():
    plan = plan_for("flash2", 32, 8, 4096)
    plan.cache_words = 200  # the tiles were chosen for 4096 words
    mem = TwoLevelMemory(200)
    from flashattn_ext.iolab.reference import make_problem
    with pytest.raises(CapacityError):
        SCHEDULES["flash2"].run(mem, make_problem(32, 8), plan)


def test_cache_too_small():
    with pytest.raises(CacheTooSmall):
        simulate("flash2", 64, 16, 40)
    with pytest.raises(CacheTooSmall):
        plan_for("flash1", 64, 16, 40)


# ----------------------------------------------------------------------------- every schedule
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("N,d,M", [(64, 8, 50), (37, 8, 90), (37, 8, 400), (64, 16, 300), (64, 16, 4000),
                                   (50, 16, 1 << 14)])
def test_output_and_counts_match(name, N, d, M):
    try:
        _sim(name, N, d, M)
    except CacheTooSmall:
        pytest.skip("cache below this schedule's minimum")


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("N,d,M", [(37, 8, 120), (64, 16, 700), (45, 8, 3000)])
def test_causal_variants(name, N, d, M):
    res = _sim(name, N, d, M, causal=True)
    dense = _sim(name, N, d, M)
    assert res.io_words <= dense.io_words
    if M < 1000:  # several tiles: the fully masked ones are skipped
        assert res.io_words < dense.io_words


@pytest.mark.parametrize("name", ALL)
def test_word_level_cross_check(name):
    """Word-by-word counting and residency, every iteration run on its own, agrees with the
    tile-level (lock-step) counts exactly."""
    for N, d, M in ((24, 4, 20), (13, 4, 60), (20, 4, 200)):
        try:
            tile = _sim(name, N, d, M, causal=SCHEDULES[name].causal)
        except CacheTooSmall:
            continue
        word = _sim(name, N, d, M, causal=SCHEDULES[name].causal, word_level=True)
        assert word.reads_by_array == tile.reads_by_array
        assert word.writes_by_array == tile.writes_by_array
        assert word.peak_words == tile.peak_words
        assert word.max_abs_error < 1e-12


@pytest.mark.parametrize("name", ["flash1", "flash2", "block-sparse", "flash-bwd"])
def test_lock_step_lanes_equal_sequential(name):
    a, out_a = simulate(name, 70, 8, 500, causal=True, density=0.5, return_outputs=True)
    b, out_b = simulate(name, 70, 8, 500, causal=True, density=0.5, max_lanes=1, return_outputs=True)
    assert (a.reads_by_array, a.writes_by_array, a.peak_words) == (b.reads_by_array, b.writes_by_array, b.peak_words)
    for k in out_a:
        np.testing.assert_allclose(out_a[k], out_b[k], atol=1e-13, rtol=0)


def test_block_sparse_density():
    N, d, M = 96, 8, 600
    dense = simulate("flash2", N, d, M)
    counts = []
    for s in (0.0, 0.25, 0.5, 1.0):
        res, out = simulate("block-sparse", N, d, M, density=s, seed=3, return_outputs=True)
        assert res.max_abs_error < 1e-12
        assert abs(res.density - s) < 0.05
        counts.append(res.io_words)
        if s == 0.0:
            assert not out["O"].any()  # nothing visible: O = 0 (and lse = -inf)
            assert np.isneginf(out["lse"]).all()
    assert counts == sorted(counts)
    assert counts[-1] == dense.io_words
    # the K/V part is proportional to the number of non-zero blocks
    kv = [c - counts[0] for c in counts]
    assert abs(kv[2] / kv[3] - 0.5) < 0.05


# ----------------------------------------------------------------------------- tile choices
def test_flash1_block_sizes_follow_the_paper_and_fit():
    for d in (8, 16, 64, 128):
        for M in sorted({8 * d, 16 * d, d * d // 2, d * d, 3 * d * d, 4 * d * d, 6 * d * d, 8 * d * d, 20 * d * d}):
            if M < bounds.flash1_peak(d, 1, 1):
                with pytest.raises(CacheTooSmall):
                    fit_flash1(4096, d, M)
                continue
            tiles, note = fit_flash1(4096, d, M)
            bc0, br0 = -(-M // (4 * d)), min(-(-M // (4 * d)), d)
            assert (tiles["paper_bc"], tiles["paper_br"]) == (bc0, br0)
            assert bounds.flash1_peak(d, tiles["br"], tiles["bc"]) <= M
            if bounds.flash1_peak(d, br0, bc0) <= M:
                assert (tiles["br"], tiles["bc"]) == (br0, bc0) and not note
            else:  # minimal shrink: one step larger would overflow
                bc = tiles["bc"] + 1
                assert bounds.flash1_peak(d, max(1, br0 * bc // bc0), bc) > M
    assert fit_flash1(4096, 128, 20 * 128 * 128)[0]["br"] == 128


def test_flash2_tiles_minimise_the_count():
    for N, d, M in ((40, 4, 90), (40, 4, 300), (33, 8, 500), (48, 8, 2000)):
        plan = plan_for("flash2", N, d, M)
        best = min(bounds.flash2_io(N, d, br, bc).io_words
                   for br in range(1, N + 1) for bc in range(1, N + 1)
                   if bounds.flash2_peak(d, br, bc) <= M)
        assert plan.closed_form().io_words == best


def test_square_tiling_and_backward_tiles_minimise_the_count():
    N, d, M = 24, 8, 120
    plan = plan_for("square-tiling", N, d, M)
    best = min(bounds.square_tiling_io(N, d, bm, bn, 1, cm, cd, 1).io_words
               for bm in range(1, N + 1) for bn in range(1, N + 1) for cm in range(1, N + 1) for cd in range(1, d + 1)
               if bm * bn + 4 * bm + bn <= M and cm * cd + 3 * cm + cd <= M)
    assert plan.closed_form().io_words == best
    plan = plan_for("flash-bwd", 40, 4, 300)
    best = min(bounds.flash_backward_io(40, 4, br, bc, 1).io_words
               for br in range(1, 41) for bc in range(1, 41) if bounds.flash_backward_peak(4, br, bc) <= 300)
    assert plan.closed_form().io_words == best


def test_search_tiles_is_exact_on_a_toy_cost():
    m, n, M = 30, 20, 70
    got = search_tiles(m, n, M, lambda a, b: a * b + a + b, lambda a, b: 3 * -(-m // a) + 5 * -(-n // b))
    best = min(3 * -(-m // a) + 5 * -(-n // b) for a in range(1, m + 1) for b in range(1, n + 1) if a * b + a + b <= M)
    assert 3 * -(-m // got[0]) + 5 * -(-n // got[1]) == best


# ----------------------------------------------------------------------------- scaling and regimes
def _slope(name, N, d, Ms):
    y = [predict(name, N, d, M).io_words for M in Ms]
    return np.polyfit(np.log(Ms), np.log(y), 1)[0]


def test_fitted_slopes():
    """FlashAttention's count falls as 1/M, square tiling's as 1/sqrt(M). Closed forms at a size
    too large to simulate quickly; the tests above prove them equal to the simulated counts."""
    N, d = 16384, 128
    for name in ("flash1", "flash2", "flash-bwd"):
        assert -1.1 < _slope(name, N, d, [d * d, 2 * d * d, 4 * d * d, 8 * d * d]) < -0.9, name
    for name in ("square-tiling", "tiled-bwd"):
        assert -0.6 < _slope(name, N, 256, [256, 1024, 4096]) < -0.45, name
    # and a simulated pair, small enough to run
    a = simulate("flash2", 256, 16, 256 * 4).io_words
    b = simulate("flash2", 256, 16, 256 * 16).io_words
    assert 2.5 < a / b < 5.5


@pytest.mark.parametrize("N", [256, 1024, 4096])
@pytest.mark.parametrize("d", [32, 64, 128])
def test_crossover_at_d_squared(N, d):
    sq = lambda M: predict("square-tiling", N, d, M).io_words  # noqa: E731
    for M in (d * d // 16, d * d // 4):
        for fa in ("flash1", "flash2"):
            try:
                assert sq(M) < predict(fa, N, d, M).io_words, (fa, M)
            except CacheTooSmall:
                pass
        try:
            assert predict("tiled-bwd", N, d, M).io_words < predict("flash-bwd", N, d, M).io_words
        except CacheTooSmall:
            pass
    for M in (4 * d * d, 16 * d * d, 64 * d * d):
        assert predict("flash2", N, d, M).io_words < sq(M)
        assert predict("flash-bwd", N, d, M).io_words < predict("tiled-bwd", N, d, M).io_words
        if M >= 8 * d * d and N >= 4 * d:  # FA1 re-reads and re-writes O, l, m per key block
            assert predict("flash1", N, d, M).io_words < sq(M)


def test_crossover_simulated():
    N, d = 128, 32
    assert simulate("square-tiling", N, d, d * d // 4).io_words < simulate("flash2", N, d, d * d // 4).io_words
    assert simulate("flash2", N, d, 4 * d * d).io_words < simulate("square-tiling", N, d, 4 * d * d).io_words


def test_bounds():
    N, d = 4096, 128
    assert bounds.lower_bound_standard_matmul(N, d, d * d) == pytest.approx(N * N * d / d)
    assert bounds.lower_bound_standard_matmul(N, d, d * d // 4) == pytest.approx(N * N * d / (d / 2))
    assert bounds.lower_bound_standard_matmul(N, d, 4 * d * d) == pytest.approx(N * N / 4)
    assert bounds.lower_bound_any_matmul(N, d, d * d // 4) == N * N
    assert bounds.lower_bound_block_sparse(N, d, 4 * d * d, 0.25) == pytest.approx(N * d + N * N / 16)
    assert bounds.lower_bound_backward(N, d, d * d) == pytest.approx(N * N + N * d)
    for name in FORWARD + BACKWARD:
        for M in (d * d // 4, d * d, 8 * d * d):
            r = predict(name, N, d, M, density=0.5)
            compulsory = (bounds.compulsory_backward if name in BACKWARD else bounds.compulsory_forward)(N, d)
            if name != "block-sparse":
                assert r.io_words >= compulsory
                assert r.io_words >= bounds.lower_bound_standard_matmul(N, d, M) / 4  # never far below


@pytest.mark.parametrize("name", ["flash1", "flash2", "square-tiling", "standard", "flash-bwd", "tiled-bwd"])
def test_leading_terms(name):
    N = 1 << 15
    for d in (64, 128):
        # FlashAttention's tiles are a handful of rows when M < d^2: integer effects dominate there
        small = () if name.startswith("flash") else (d * d // 4,)
        for M in small + (d * d, 4 * d * d, 16 * d * d):
            ratio = predict(name, N, d, M).io_words / bounds.leading_term(name, N, d, M)
            assert 0.9 < ratio < 1.2, (d, M, ratio)


# ----------------------------------------------------------------------------- command line
def test_parse_cache():
    assert cli.parse_cache("227KiB", 2) == 227 * 1024 // 2 == 116224
    assert cli.parse_cache("227KiB", 4) == 58112
    assert cli.parse_cache("16384") == 16384
    assert cli.parse_cache("96KB", 2) == 48000
    with pytest.raises(Exception):
        cli.parse_cache("lots")


def test_cli_simulate_json(capsys):
    assert cli.main(["simulate", "--algorithm", "square-tiling", "--seqlen", "64", "--headdim", "16",
                     "--cache", "128B", "--word-bytes", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("algorithm", "seqlen", "headdim", "cache_words", "reads_words", "writes_words", "io_words",
                "peak_words", "max_abs_error"):
        assert key in out
    assert out["cache_words"] == 128 and out["io_words"] == out["closed_form_io_words"]
    assert out["peak_words"] <= 128 and out["max_abs_error"] < 1e-12


def test_cli_simulate_variants(capsys):
    assert cli.main(["simulate", "-a", "flash2", "-N", "64", "-d", "16", "-M", "2000", "--causal", "--backward"]) == 0
    assert "flash-bwd (causal)" in capsys.readouterr().out
    assert cli.main(["simulate", "-a", "block-sparse", "-N", "64", "-d", "8", "-M", "600", "--density", "0.3"]) == 0
    assert "block density" in capsys.readouterr().out
    assert cli.main(["simulate", "-a", "square-tiling", "-N", "64", "-d", "16", "-M", "900", "--causal"]) == 2


def test_cli_compare_and_tune(capsys):
    assert cli.main(["compare", "-N", "128", "-d", "32", "-M", "256"]) == 0
    out = capsys.readouterr().out
    assert "square-tiling **best**" in out and "small cache" in out
    assert cli.main(["compare", "-N", "128", "-d", "16", "-M", "4096", "--backward", "--closed-form"]) == 0
    assert "flash-bwd **best**" in capsys.readouterr().out
    assert cli.main(["tune", "--cache", "227KiB", "--word-bytes", "2"]) == 0
    out = capsys.readouterr().out
    assert "116,224 words" in out and "best: flash2" in out and "128 x 128" in out


def test_cli_sweep_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "io_sweep.png"
    assert cli.main(["sweep", "-N", "512", "-d", "32", "--plot", str(png)]) == 0
    assert png.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert out.count("\n| ") >= 21  # d^2/16 .. 64 d^2, two points per octave
    assert cli.sweep_points(32)[0] == 64 and cli.sweep_points(32)[-1] == 64 * 1024


def test_help_lists_algorithms():
    text = cli.build_parser().format_help()
    for name in ALL:
        assert name in text


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-c", "import sys, runpy; sys.argv = ['x', 'simulate', '-a', 'flash1', "
                           "'-N', '32', '-d', '8', '-M', '400', '--json']; runpy.run_module('flashattn_ext.iolab', "
                           "run_name='__main__')"], capture_output=True, text=True, env=None)
    if proc.returncode != 0 and "flashattn_ext" in proc.stderr and "_C" in proc.stderr:
        pytest.skip("flashattn_ext itself does not import here (compiled module not built)")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["algorithm"] == "flash1"


BLOCK_TORCH = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name == "flashattn_ext._C":
            raise ImportError(f"{name} blocked by the test")
        return None
sys.meta_path.insert(0, Block())
import flashattn_ext.iolab.cli as cli
sys.argv = ["x", "simulate", "-a", "flash1", "-N", "32", "-d", "8", "-M", "400", "--json"]
cli.main()
assert "torch" not in sys.modules, "the I/O lab imported torch"
import flashattn_ext
try:
    flashattn_ext.scaled_dot_product_attention
except ImportError as e:
    assert "could not be loaded" in str(e), e
else:
    raise AssertionError("the attention API must raise ImportError without the extension")
"""


def test_iolab_runs_without_torch_or_the_extension():
    """The I/O lab needs only NumPy: with torch and the compiled module unimportable it still
    simulates, and the attention API says why it is unavailable."""
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["algorithm"] == "flash1"


# ----------------------------------------------------------------------------- measure
FAKE_NCU_CSV = '''==PROF== Connected to process 4242 (/usr/bin/python3.11)
==PROF== Profiling "fwd_kernel": 0%....50%....100% - 9 passes
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","dram__bytes_read.sum","dram__bytes_write.sum","l1tex__t_bytes_pipe_lsu_mem_global_op_ld.sum","launch__grid_size","launch__shared_mem_per_block_dynamic","launch__shared_mem_per_block_static","lts__t_sectors_op_read.sum","lts__t_sectors_op_write.sum"
"","","","","","","","","","","","byte","byte","byte","","byte","byte","sector","sector"
"0","4242","python3.11","127.0.0.1","void flashattn::cuda::fwd_kernel<flashattn::cuda::FwdTraits<__nv_bfloat16, 128, 128, 64, 4, false>>(flashattn::AttentionParams, bool)","1","7","(128, 1, 1)","(32, 16, 1)","0","9.0","38,012,928","16,908,288","0","512","65,536","0","34,603,008","528,384"
"1","4242","python3.11","127.0.0.1","void flashattn::cuda::bwd_kernel<flashattn::cuda::BwdTraits<__nv_bfloat16, 128, 64, 128, 8, 4, 8, false>>(flashattn::AttentionGradParams, bool)","1","7","(256, 1, 1)","(32, 16, 1)","0","9.0","60,000,000","50,000,000","0","512","164,864","0","70,000,000","3,000,000"
"2","4242","python3.11","127.0.0.1","void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>(Flash_fwd_params)","1","7","(128, 1, 1)","(32, 16, 1)","0","9.0","37,748,736","16,777,216","0","512","49,152","0","34,603,008","524,288"
"3","4242","python3.11","127.0.0.1","void pytorch_flash::flash_bwd_dot_do_o_kernel<true>(Flash_bwd_params)","1","7","(128, 1, 1)","(32, 16, 1)","0","9.0","33,554,432","262,144","0","512","0","0","1,048,576","8,192"
==PROF== Disconnected from process 4242
'''


def test_parse_ncu_csv():
    ks = measure.parse_ncu_csv(FAKE_NCU_CSV)
    assert [k.role for k in ks] == ["fwd", "bwd", "fwd", "bwd D = rowsum(dO*O)"]
    assert [k.origin for k in ks] == ["flashattn_ext", "flashattn_ext", "torch", "torch"]
    fwd = ks[0]
    assert fwd.smem_bytes == 65536 and fwd.grid == 512
    assert fwd.dram_read == 38_012_928 and fwd.l2_read == 34_603_008 * 32
    text = measure.report(ks, 4096, 128, 16)
    assert "| flashattn::cuda::fwd_kernel | fwd |" in text and "L2 / model" in text
    assert measure.short_name(ks[2].name) == "pytorch_flash::flash_fwd_kernel"
    # the model with the kernel's row block (4096 / 32 = 128 rows per CTA), in bytes, all heads
    assert measure.kernel_tile_bytes("fwd", 4096, 128, 512, 16) == 2 * 16 * bounds.flash2_io(4096, 128, 128, 1).io_words
    assert measure.model_bytes("fwd", 4096, 128, 65536, 16) == 2 * 16 * predict("flash2", 4096, 128, 32768).io_words
    assert measure.parse_ncu_csv("no csv here") == []


def test_parse_ncu_csv_scaled_units():
    text = FAKE_NCU_CSV.replace('"byte","byte","byte","","byte","byte","sector","sector"',
                                '"Mbyte","Kbyte","byte","","Kbyte","byte","sector","sector"')
    text = text.replace('"38,012,928","16,908,288"', '"38.012928","16908.288"').replace('"65,536","0"', '"65.536","0"')
    fwd = measure.parse_ncu_csv(text)[0]
    assert fwd.dram_read == pytest.approx(38_012_928) and fwd.dram_write == pytest.approx(16_908_288)
    assert fwd.smem_bytes == 65536


def test_measure_without_gpu_exits_cleanly(capsys):
    ok, reason, _ = measure.detect()
    if ok:
        pytest.skip("a GPU and ncu are present; measure would really run")
    args = cli.build_parser().parse_args(["measure"])
    assert measure.main(args) == 0
    assert "skipped" in capsys.readouterr().out


def test_single_threaded_blas_restores_the_thread_count():
    from flashattn_ext.iolab._blas import _openblas, single_threaded_blas

    before = [get() for get, _ in _openblas()]
    with single_threaded_blas():
        assert all(get() == 1 for get, _ in _openblas())
    assert [get() for get, _ in _openblas()] == before
