#!/usr/bin/env python3
"""Proof that the emulated suite catches bugs: plants known bugs one at a time in a copy of the
CUDA sources, builds the emulator library from each copy (a restricted set of head dims, so a
mutant builds in seconds), runs the emulated tests that exercise the mutated code under both CI
schedules, and records whether the mutant was caught and by which check.

    python csrc/cuda/emulator/mutate.py                 # all mutants -> mutation_results.md
    python csrc/cuda/emulator/mutate.py --only M03,M17   # a few

Needs the extension built (pip install --no-build-isolation -e .); the mutated library is
handed to the tests through FLASHATTN_EMULATOR_LIBRARY. The unmutated sources are built and run
first with the same selections: they must pass (a mutant that fails for another reason would
prove nothing).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)
import build  # noqa: E402

HEADDIMS = (64, 96, 128, 256)  # smaller head dims run in the next compiled bucket
SCHEDULES = "(emu-lockstep or emu-warp)"

# name, file (under csrc/), exact text, replacement, what it does, pytest -k selection
# (test_cuda.py unless the selection names a file after '::').
MUTANTS = [
    ("M01", "cuda/fwd_kernel.cuh", "      cp_async_wait<0>();\n      __syncthreads();  // K_j (and Q) landed",
     "      __syncthreads();  // K_j (and Q) landed", "forward interleave: the wait for K_j dropped",
     "test_buckets and 96"),
    ("M02", "cuda/fwd_kernel.cuh", "      cp_async_wait<0>();\n      __syncthreads();  // V_j landed; every warp is done with K_j",
     "      cp_async_wait<0>();", "forward interleave: the barrier before K_{j-1} overwrites K_j dropped",
     "test_buckets and 96"),
    ("M03", "cuda/fwd_kernel.cuh", "cp_async_wait<1>();  // this tile's group is done",
     "cp_async_wait<2>();  // this tile's group is done", "forward ring: wait<1> -> wait<2>", "test_buckets and 128"),
    ("M04", "cuda/fwd_kernel.cuh", "      __syncthreads();\n      if (n_block - 2 >= n_block_min) {",
     "      if (n_block - 2 >= n_block_min) {", "forward ring: the barrier before refilling a stage dropped",
     "test_buckets and 64"),
    ("M05", "cuda/fwd_kernel.cuh", "  store_acc_to_smem<TileQ>(sQ, acc_o, warp_row0, 0);\n  __syncthreads();\n",
     "  store_acc_to_smem<TileQ>(sQ, acc_o, warp_row0, 0);\n",
     "forward epilogue: O read back from shared memory before every warp staged its rows",
     "test_buckets and 64"),
    ("M06", "cuda/online_softmax.h", "        sum += __shfl_xor_sync(0xffffffffu, sum, 2);\n", "",
     "forward: one row-sum shuffle missing", "test_buckets and 64 and full"),
    ("M07", "cuda/online_softmax.h",
     "        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));\n", "",
     "forward: one row-max shuffle missing", "test_buckets and 64"),
    ("M08", "cuda/fwd_kernel.cuh", "if (col < keys.lo || col >= keys.hi) acc_s[mt][nt][e] = -INFINITY;",
     "if (col < keys.lo || col > keys.hi) acc_s[mt][nt][e] = -INFINITY;",
     "forward: band edge off by one", "test_buckets and causal and 64"),
    ("M09", "cuda/score_mod.h", "x -= static_cast<F>(alibi_slope)", "x += static_cast<F>(alibi_slope)",
     "ALiBi sign flipped", "test_alibi"),
    ("M10", "cuda/fwd_kernel.cuh", ">> (j & 3);", ">> ((j + 1) & 3);", "forward: dropout keep bits shifted by one key",
     "test_dropout_matches_keep_mask"),
    ("M11", "cuda/fwd_kernel.cuh", "const int64_t h_k = h / (p.num_heads / p.num_heads_k);",
     "const int64_t h_k = h % p.num_heads_k;", "forward: wrong GQA head map", "test_gqa and fp16"),
    ("M12", "cuda/kernel_traits.h", "kSmemBytes = TileQ::kBytes + kStages * (TileK::kBytes + TileV::kBytes);",
     "kSmemBytes = TileQ::kBytes + kStages * (TileK::kBytes + TileV::kBytes) - 1024;",
     "forward: shared memory 1 KB short", "test_buckets and 64"),
    ("M13", "cuda/bwd_kernel.cuh", "const int turn = static_cast<int>(n_block - band_key_begin(p, m0) / kBlockN);",
     "const int turn = static_cast<int>(n_block - band_key_begin(p, m0) / kBlockN + 1);",
     "backward deterministic: turn off by one", "test_deterministic_backward"),
    ("M14", "cuda/bwd_kernel.cuh", "const float lse = r < rows ? p.lse[row_base + r] : -INFINITY;",
     "const float lse = p.lse[row_base + r];", "backward: lse read past the last row",
     "test_lengths and full and 17-63"),
    ("M15", "cuda/smem_layout.h", "const int swizzle = (kPanelChunks == 8) ? (row & 7) : ((row >> 1) & 3);",
     "const int swizzle = (kPanelChunks == 8) ? ((row + 1) & 7) : ((row >> 1) & 3);",
     "swizzle changed on the store side only (not in FragAddr)", "test_buckets and 64 and full"),
    ("M16", "cuda/warp_gemm.h", "      a[mt][ks][1] = pack2<Element>(acc[mt][2 * ks][2], acc[mt][2 * ks][3]);\n"
     "      a[mt][ks][2] = pack2<Element>(acc[mt][2 * ks + 1][0], acc[mt][2 * ks + 1][1]);",
     "      a[mt][ks][2] = pack2<Element>(acc[mt][2 * ks][2], acc[mt][2 * ks][3]);\n"
     "      a[mt][ks][1] = pack2<Element>(acc[mt][2 * ks + 1][0], acc[mt][2 * ks + 1][1]);",
     "P fragments: registers 1 and 2 swapped", "test_buckets and 64 and full"),
    ("M17", "cuda/warp_gemm.h", "mma_m16n8k16<Element>(acc[mt][2 * np], a[mt], b[0], b[1]);",
     "mma_m16n8k16<Element>(acc[mt][2 * np], a[mt], b[1], b[0]);", "B fragment registers swapped",
     "test_buckets and 64 and full"),
    ("M18", "cuda/bwd_kernel.cuh", "    __syncthreads();  // P^T and dS^T complete\n", "",
     "backward: no barrier between writing P^T/dS^T and reading them", "test_buckets and 64 and full"),
    ("M19", "cuda/bwd_kernel.cuh", "    __syncthreads();  // every warp is done with this stage, P^T and dS^T\n", "",
     "backward: stage reused without a barrier", "test_buckets and 64 and full"),
    ("M20", "cuda/bwd_kernel.cuh", "      cp_async_wait<1>();", "      cp_async_wait<2>();",
     "backward double buffer: wait<1> -> wait<2>", "test_buckets and 64 and full"),
    ("M21", "cuda/bwd_kernel.cuh", "            if (m0 + row < p.seqlen_q)\n", "",
     "backward: dQ rows past the sequence end accumulated", "test_lengths and full and 17-63"),
    ("M22", "cuda/bwd_kernel.cuh", "              ds *= softcap_grad;\n", "", "backward: softcap derivative dropped",
     "test_softcap and 64"),
    ("M23", "cuda/bwd_kernel.cuh", "dprob = kept ? dprob * keep_scale : 0.f;", "dprob = kept ? dprob : 0.f;",
     "backward: dropout keep scale dropped", "test_dropout_gradients_against_reference"),
    ("M24", "cuda/smem_layout.h", "    if (row >= num_rows || valid <= 0) continue;", "    if (valid <= 0) continue;",
     "tile store writes rows past the sequence end", "test_lengths and 17-63"),
    ("M25", "cuda/smem_layout.h", "const int bytes = row < num_rows ? 2 * col_valid : 0;",
     "const int bytes = 2 * col_valid;", "tile load reads rows past the sequence end (no zero-fill)",
     "test_lengths and 17-63"),
    ("M26", "cuda/simt_kernel.cuh", "for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync",
     "for (int offset = 16; offset > 1; offset /= 2) x += __shfl_xor_sync", "SIMT: warp sum misses one step",
     "test_simt_float and fp32 and 64"),
    ("M27", "cuda/score_mod.h", "    if (m_last >= p.seqlen_q) m_last = p.seqlen_q - 1;\n"
     "    if (n_last >= p.seqlen_k) n_last = p.seqlen_k - 1;\n", "",
     "block-sparse tile scan not clamped to the sequence (block-mask read past its end)",
     "test_block_sparse_small_and_uneven_blocks"),
    ("M28", "cuda/bwd_preprocess.cuh", "d < p.headdim_v; d += 32) sum +=", "d < p.headdim; d += 32) sum +=",
     "backward preprocess: D over the wrong head dim", "test_value_head_dim_differs"),
    ("M29", "cuda/dq_convert.cuh", "dst[d] = static_cast<Element>(src[d] * scale);", "dst[d] = static_cast<Element>(src[d]);",
     "dQ conversion: softmax scale dropped", "test_buckets and 64 and full"),
    ("M30", "cuda/tile_masks.h", "  return !__syncthreads_or(any);", "  return !any;",
     "extras kernels: per-thread (divergent) skip decision instead of the block vote",
     "test_attn_mask_with_empty_tiles"),
    ("M31", "cuda/tile_masks.h",
     "    if (i < p.seqlen_q && j < p.seqlen_k) any = any || mods.mask_allows(p, i, j);",
     "    any = any || mods.mask_allows(p, i, j);",
     "extras kernels: the mask pre-pass reads mask elements past the sequence ends",
     "test_attn_mask and bool and shape0 and 64"),
    # The Hopper forward (fwd_sm90.cuh: TMA + mbarrier + wgmma), tests/test_cuda_sm90.py.
    ("M32", "cuda/fwd_sm90.cuh", "        mbar_wait(&full_v[prev], phase_of(j - 1));\n", "",
     "Hopper forward: P V without waiting for V's TMA load", "tests/test_cuda_sm90.py::test_buckets and 128 and full"),
    ("M33", "cuda/fwd_sm90.cuh", "ks * 16 * 128, Traits::kPanelKV, 1024);", "ks * 16 * 128, 1024, Traits::kPanelKV);",
     "Hopper forward: V descriptor with LBO and SBO swapped", "tests/test_cuda_sm90.py::test_buckets and 128 and full"),
    ("M34", "cuda/fwd_sm90.cuh", "mbar_init(&empty[s], 4 * Traits::kConsumers);", "mbar_init(&empty[s], 4);",
     "Hopper forward: a stage is free after one consumer warpgroup's release", "tests/test_cuda_sm90.py::test_lengths"),
    ("M35", "cuda/fwd_sm90.cuh", "mbar_wait(&empty[s], phase ^ 1);", "mbar_wait(&empty[s], phase);",
     "Hopper forward: producer waits for the wrong phase of the empty barrier", "tests/test_cuda_sm90.py::test_lengths"),
    ("M36", "cuda/fwd_sm90.cuh", "mbar_wait(&full_k[s], phase_of(j));", "mbar_wait(&full_k[s], phase_of(j) ^ 1);",
     "Hopper forward: consumers wait for the wrong phase of K's barrier",
     "tests/test_cuda_sm90.py::test_buckets and 64 and full"),
    ("M37", "cuda/fwd_sm90.cuh", "step = 32 * (kk % 4);", "step = 16 * (kk % 4);",
     "Hopper forward: Q K^T k-step of 8 columns instead of 16", "tests/test_cuda_sm90.py::test_buckets and 128 and full"),
    ("M38", "cuda/fwd_sm90.cuh", "if (col < keys.lo || col >= keys.hi) acc_s[0][nt][e] = -INFINITY;",
     "if (col < keys.lo || col > keys.hi) acc_s[0][nt][e] = -INFINITY;", "Hopper forward: band edge off by one",
     "tests/test_cuda_sm90.py::test_buckets and causal and 64"),
    ("M39", "cuda/ptx_sm90.h", "static_cast<uint64_t>(1) << 62;", "static_cast<uint64_t>(2) << 62;",
     "Hopper: descriptors say 64-byte swizzle, TMA writes 128-byte", "tests/test_cuda_sm90.py::test_buckets and 64 and full"),
    ("M40", "cuda/fwd_sm90.cuh", "        wgmma_wait<0>();\n        fence_o();\n        softmax.rescale(acc_o, correction);",
     "        fence_o();\n        softmax.rescale(acc_o, correction);",
     "Hopper forward: O rescaled without waiting for P V (accumulators read in flight)",
     "tests/test_cuda_sm90.py::test_buckets and 64 and full"),
    ("M41", "cuda/fwd_sm90.cuh", "smem_u32(sQ) + consumer * 64 * 128;", "smem_u32(sQ);",
     "Hopper forward: both consumers read the first 64 query rows", "tests/test_cuda_sm90.py::test_buckets and 64 and full"),
    ("M42", "cuda/fwd_sm90.cuh", "    setmaxnreg_dec<Traits::kProducerRegs>();\n", "",
     "Hopper forward: the producer keeps its registers", "tests/test_cuda_sm90.py::test_buckets and 64 and full"),
    ("M43", "cuda/fwd_sm90.cuh", "        your_turn();\n        wgmma_wait<1>();", "        wgmma_wait<1>();",
     "Hopper forward ping-pong: a consumer never hands the turn back", "tests/test_cuda_sm90.py::test_buckets and 64 and full"),
    ("M44", "cuda/fwd_sm90.cuh", "wgmma_wait<1>();  // S_j landed", "wgmma_wait<2>();  // S_j landed",
     "Hopper forward overlap: softmax of S_j before its Q K^T completed", "tests/test_cuda_sm90.py::test_buckets and 64 and full"),
    ("M45", "cuda/fwd_kernel.cuh", "n_block_max = lo + per < n_block_max ? lo + per : n_block_max;",
     "n_block_max = lo + per + 1 < n_block_max ? lo + per + 1 : n_block_max;",
     "split-KV: neighbouring splits share a key block (counted twice)", "tests/test_cuda_kvcache.py::test_splits_agree"),
    ("M46", "cuda/split_combine.cuh", "      for (int s = 0; s < splits; ++s) {", "      for (int s = 1; s < splits; ++s) {",
     "split-KV combine: the first split's O left out", "tests/test_cuda_kvcache.py::test_splits_agree"),
    ("M47", "cuda/fwd_kernel.cuh", "params.block_table + seq * params.block_table_batch_stride;",
     "params.block_table;", "paged KV: every sequence reads the first sequence's pages",
     "tests/test_cuda_kvcache.py::test_paged_equals_contiguous"),
    ("M48", "cuda/fwd_kernel.cuh", "const int64_t row0 = to_partial ? split_row(p, split_index(),",
     "const int64_t row0 = to_partial ? split_row(p, 0,", "split-KV: every split writes split 0's partial rows",
     "tests/test_cuda_kvcache.py::test_splits_agree"),
    ("M49", "cuda/fwd_sm90.cuh", "const int n0 = static_cast<int>(w.k_row0 + n_block * kBlockN);",
     "const int n0 = static_cast<int>(n_block * kBlockN);",
     "Hopper varlen: every sequence's keys loaded from the first sequence's rows",
     "tests/test_cuda_sm90.py::test_varlen and causal"),
    ("M50", "cuda/fwd_sm90.cuh", "if (acc.t == 0 && row < w.band.seqlen_q) lse[row] = row_lse();",
     "if (acc.t == 0 && row < p.seqlen_q) lse[row] = row_lse();",
     "Hopper varlen: lse stored for rows past the sequence's end (the next sequence's)",
     "tests/test_cuda_sm90.py::test_varlen and full"),
    # The Hopper backward (bwd_sm90.cuh), tests/test_cuda_sm90_bwd.py.
    ("M51", "cuda/bwd_sm90.cuh", "my_ds + q8 * 128 + ((key * 2) ^ (q8 << 4));", "my_ds + q8 * 128 + key * 2;",
     "Hopper backward: dS stored without the 128-byte swizzle its descriptor reads",
     "tests/test_cuda_sm90_bwd.py::test_buckets and 64 and full"),
    ("M52", "cuda/bwd_sm90.cuh", "    fence_proxy_async();  // the generic-proxy stores", "    // fence_proxy_async();  // the generic-proxy stores",
     "Hopper backward: dS stores not fenced before the async proxy (wgmma) reads them",
     "tests/test_cuda_sm90_bwd.py::test_buckets and 64 and full"),
    ("M53", "cuda/bwd_sm90.cuh", "    // d = 128 within 240 registers (waiting after dQ's first panel spilled 12 bytes).\n    wgmma_wait<0>();\n",
     "    // d = 128 within 240 registers (waiting after dQ's first panel spilled 12 bytes).\n",
     "Hopper backward: the Q / dO stage released while dK, dV's wgmma still read it",
     "tests/test_cuda_sm90_bwd.py::test_buckets and 128 and causal"),
    ("M54", "cuda/bwd_sm90.cuh", "lse2 = lse == -INFINITY ? INFINITY : lse * kLog2e;", "lse2 = lse * kLog2e;",
     "Hopper backward: a row without keys (lse = -inf) gives P = exp2(-inf + inf)",
     "tests/test_cuda_sm90_bwd.py::test_lengths"),
    ("M55", "cuda/bwd_sm90.cuh", "k_addr = smem_u32(sK) + key0 * 128,", "k_addr = smem_u32(sK),",
     "Hopper backward: both consumers read the first 64 keys of K",
     "tests/test_cuda_sm90_bwd.py::test_buckets and 64 and full"),
    ("M56", "cuda/bwd_sm90.cuh", "            if (key < keys.lo || key >= keys.hi) acc_s[0][nt][2 * half + e] = -INFINITY;",
     "            if (key >= keys.hi) acc_s[0][nt][2 * half + e] = -INFINITY;",
     "Hopper backward: the band's left edge (window) not masked",
     "tests/test_cuda_sm90_bwd.py::test_sliding_window"),
    ("M57", "cuda/bwd_sm90.cuh", "&tm_k, bar_kv, 64 * pn, k_row0 + n0, h_k, batch);", "&tm_k, bar_kv, 64 * pn, n0, h_k, batch);",
     "Hopper backward varlen: every sequence's K rows from the first sequence's",
     "tests/test_cuda_sm90_bwd.py::test_varlen and causal"),
    ("M58", "cuda/bwd_sm90.cuh", "          if (m0 + row < band.seqlen_q)", "          if (m0 + row < p.seqlen_q)",
     "Hopper backward varlen: dQ added into the rows past the sequence's end (the next sequence's)",
     "tests/test_cuda_sm90_bwd.py::test_varlen and full"),
    ("M59", "cuda/bwd_sm90.cuh", "static_cast<int>(band_key_begin(band, m0) / kBlockN);",
     "static_cast<int>(band_key_begin(band, m0) / kBlockN) + 1;",
     "Hopper backward deterministic: each key block waits for the turn after its own",
     "tests/test_cuda_sm90_bwd.py::test_deterministic"),
    ("M60", "cuda/bwd_sm90.cuh", "        if (threadIdx.x % 128 == 0) atomicAdd(semaphore, 1);\n", "",
     "Hopper backward deterministic: the turn counter never advances",
     "tests/test_cuda_sm90_bwd.py::test_deterministic"),
]

# Report text -> the check that fired.
CHECKS = [
    ("no fence.proxy.async", "generic stores read by the async proxy without fence.proxy.async (shadow)"),
    ("in-flight wgmma is still reading", "a write into shared memory an in-flight wgmma reads (shadow)"),
    ("still in flight", "cp.async / TMA in flight (shadow)"),
    ("written by a TMA load", "TMA data read before its mbarrier wait (shadow)"),
    ("swizzle mismatch", "TMA / wgmma swizzle mismatch (shadow)"),
    ("wgmma accumulator register", "wgmma accumulators read before wait_group"),
    ("that warp", "write-after-read through mbarriers (shadow)"),
    ("setmaxnreg", "register budget (setmaxnreg)"),
    ("shared-memory race", "shared-memory race (shadow)"),
    ("deadlock", "deadlock detection"),
    ("different barriers", "barrier divergence"),
    ("different collectives", "collective divergence"),
    ("exited", "collective after exit"),
    ("out-of-bounds global", "guard page"),
    ("past the end of the launch", "shared-memory bounds"),
    ("canary", "shared-memory canary"),
    ("not 16-byte aligned", "alignment"),
    ("refused", "launch configuration"),
    ("NaN in", "NaN in the result (poisoned shared memory or output read or left unwritten)"),
    ("err ", "numerical check vs float64 reference"),
    ("TIMEOUT", "timeout (a hang)"),
    ("differs between runs", "determinism check"),
    ("assert", "test assertion"),
]


def classify(output):
    """The check that fired, from pytest's error lines ("E ...": the exception and the emulator's
    report; the rest of the output quotes source lines that would mislead a text search)."""
    errors = "\n".join(line for line in output.splitlines() if line.startswith("E ") or "TIMEOUT" in line)
    for needle, check in CHECKS:
        if needle in errors:
            return check
    return "failed (unclassified)"


def failing_test(output):
    m = re.search(r"^FAILED (\S+)", output, re.M)
    return m.group(1).split("::")[-1] if m else ""


def run_tests(lib, selection, timeout):
    env = dict(os.environ, FLASHATTN_EMULATOR_LIBRARY=lib)
    test_file = "tests/test_cuda.py"
    if "::" in selection:
        test_file, selection = selection.split("::", 1)
    cmd = [sys.executable, "-m", "pytest", test_file, "-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
           "-k", f"{SCHEDULES} and ({selection})"]
    start = time.time()
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out = res.stdout + res.stderr
        return res.returncode, out, time.time() - start
    except subprocess.TimeoutExpired as e:
        return 124, (e.stdout or "") + "\nTIMEOUT (a hang the emulator did not turn into a report)", time.time() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated mutant names")
    ap.add_argument("--out", default=os.path.join(HERE, "mutation_results.md"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=600)
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m[0] in args.only.split(",")]
    work = tempfile.mkdtemp(prefix="flashattn_mutate.")
    csrc = os.path.join(work, "csrc")
    shutil.copytree(os.path.join(ROOT, "csrc"), csrc)
    # The restricted table, as setup.py writes it (csrc/cuda/buckets.h reads this header).
    restriction = os.path.join(work, "restriction")
    os.makedirs(restriction)
    with open(os.path.join(restriction, "flashattn_cuda_restriction.h"), "w") as f:
        f.write(f"#define FLASHATTN_CUDA_BUILT_HEADDIMS {', '.join(map(str, HEADDIMS))}\n")
    defines = [f"-I{restriction}"]
    kernels = [f for f in build.kernel_sources(csrc)
               if not (m := re.search(r"hdim(\d+)_", f)) or int(m.group(1)) in HEADDIMS]
    build_dir = os.path.join(work, "build")

    def build_lib():
        return build.build(build_dir, kernels, defines, jobs=args.jobs, csrc=csrc)

    lib = build_lib()
    print("baseline: unmutated sources, every selection")
    for name, _, _, _, what, sel in chosen:
        rc, out, secs = run_tests(lib, sel, args.timeout)
        if rc != 0:
            print(out[-3000:])
            sys.exit(f"baseline fails for {name}'s selection {sel!r}: fix that first")
    rows = []
    for name, rel, old, new, what, sel in chosen:
        path = os.path.join(csrc, rel)
        text = open(path).read()
        if text.count(old) != 1:
            sys.exit(f"{name}: the text to mutate occurs {text.count(old)} times in {rel}")
        with open(path, "w") as f:
            f.write(text.replace(old, new))
        t0 = time.time()
        try:
            lib = build_lib()
            build_secs = time.time() - t0
            rc, out, secs = run_tests(lib, sel, args.timeout)
        except subprocess.CalledProcessError:
            rc, out, secs, build_secs = 1, "does not compile", 0.0, time.time() - t0
        finally:
            with open(path, "w") as f:
                f.write(text)
        caught = rc != 0
        check = ("compile error" if out == "does not compile" else classify(out)) if caught else "-"
        rows.append((name, rel, what, "yes" if caught else "**NO**", check, failing_test(out), f"{build_secs + secs:.0f}"))
        print(f"{name} {'caught' if caught else 'NOT CAUGHT'}: {what} -> {check} ({failing_test(out)})", flush=True)
    if args.only and os.path.exists(args.out):  # keep the other mutants' rows of the last full run
        redone = {r[0] for r in rows}
        old_rows = [tuple(c.strip() for c in line.strip().strip("|").split("|"))
                    for line in open(args.out) if re.match(r"\| M\d+ ", line)]
        rows = sorted([r for r in old_rows if r[0] not in redone] + rows, key=lambda r: int(r[0][1:]))
    caught = sum(r[3] == "yes" for r in rows)
    with open(args.out, "w") as f:
        f.write("# Planted bugs and the emulated suite\n\n")
        f.write(f"`python csrc/cuda/emulator/mutate.py` ({time.strftime('%Y-%m-%d')}): each bug planted alone in a copy "
                f"of csrc/, the emulator library rebuilt (head dims {', '.join(map(str, HEADDIMS))}), the listed "
                f"selection of tests/test_cuda.py (or the file named) run under the lockstep and warp schedules, first failure reported. "
                f"The unmutated sources pass every selection. **{caught} of {len(rows)} caught.**\n\n")
        f.write("| mutant | file | planted bug | caught | by | first failing test | s |\n|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write("| " + " | ".join(r) + " |\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"{caught}/{len(rows)} caught; table in {args.out}")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
