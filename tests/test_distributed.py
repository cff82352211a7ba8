"""Context parallelism (flashattn_ext.distributed): ring and Ulysses attention across 2 and 4 gloo
ranks on this machine (loopback, FileStore), forward and q/k/v gradients against single-process
flashattn_ext on the gathered sequence; the block-pair planner against a brute-force mask; the
exact lse merge; world size 1; error messages; a failing rank surfacing as an error, not a hang.

Ranks are subprocesses (tests/distributed_worker.py); each group of ranks runs many cases in one
launch (start-up dominates), under a deadline after which every rank is killed and the test fails.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import flashattn_ext
from flashattn_ext.distributed import _plan, merge_partial, ring_attention, ulysses_attention, zigzag_shard
from distributed_worker import CASES, ERROR_CASES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "distributed_worker.py")


def run_ranks(tmp_path, world, suite, *, deadline_s=90.0, pg_timeout_s=60.0, kill_on_failure=True):
    """Launches `world` ranks; returns (results per rank, [(returncode, stderr)] per rank).
    A rank that fails kills the others at once (unless kill_on_failure=False: then they must end
    by themselves); past the deadline every rank is killed and the test fails."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo")
    procs, logs = [], []
    for r in range(world):
        log = open(tmp_path / f"stderr{r}.txt", "w+")
        procs.append(subprocess.Popen(
            [sys.executable, WORKER, str(r), str(world), str(tmp_path / "store"), suite, str(tmp_path),
             str(pg_timeout_s)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO))
        logs.append(log)
    end = time.monotonic() + deadline_s
    try:
        while any(p.poll() is None for p in procs):
            if kill_on_failure and any(p.returncode not in (None, 0) for p in procs):
                break
            if time.monotonic() > end:
                tails = [_tail(log) for log in logs]
                pytest.fail(f"{suite} on {world} ranks did not finish within {deadline_s:.0f} s (hang?); "
                            f"output tails: {tails}")
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    status = [(p.returncode, _tail(log)) for p, log in zip(procs, logs)]
    for log in logs:
        log.close()
    results = []
    for r in range(world):
        path = tmp_path / f"rank{r}.json"
        results.append(json.loads(path.read_text()) if path.exists() else None)
    return results, status


def _tail(log, n=3000):
    log.flush()
    log.seek(0)
    return log.read()[-n:]


def _checked(results, status, what):
    for r, (rc, text) in enumerate(status):
        if rc != 0:
            pytest.fail(f"{what}: rank {r} exited with {rc}:\n{text}")
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def case_results(request, tmp_path_factory):
    world = request.param
    start = time.monotonic()
    results, status = run_ranks(tmp_path_factory.mktemp(f"cp_cases_w{world}"), world, "cases")
    return world, _checked(results, status, f"cases on {world} ranks"), time.monotonic() - start


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_process(case_results, name):
    """Forward and dq/dk/dv on every rank equal single-process flashattn_ext on the gathered
    sequence (fp32 within 1e-5 relative, fp64 1e-10, bf16 against the fp64 result within 1.5e-2),
    no NaN; the lse too (and its -inf pattern) where the case returns it."""
    world, results, _ = case_results
    for rank, res in enumerate(results):
        c = res[name]
        assert not c["nan"], f"rank {rank}: NaN in the result"
        expected_world = 1 if CASES[name].get("group") == "self" else \
            (world // 2 if CASES[name].get("group") == "mesh_dim" and world > 2 else world)
        assert c["world"] == expected_world
        for what, err in c["errs"].items():
            if what == "lse":
                assert err < 50 * c["tol"], f"rank {rank}: lse error {err:.3e}"
            elif what == "lse_inf_pattern":
                assert err == 0.0, f"rank {rank}: lse is -inf on other rows than the reference's"
            else:
                assert err <= c["tol"], f"rank {rank}: {what} relative error {err:.3e} > {c['tol']:.0e}"
        if CASES[name]["fn"] == "ring":  # forward: W-1 K/V shards; backward: W-2 K/V and W-1 fp32 dK/dV
            w = c["world"]
            assert c["fwd_bytes"] == (w - 1) * c["kv_bytes"], c
            assert c["bwd_bytes"] == max(w - 2, 0) * c["kv_bytes"] + (w - 1) * c["kv_fp32_bytes"], c


def test_zigzag_unshard_inverts_shard(case_results):
    """zigzag_unshard(zigzag_shard(x)) == x on every rank; the gradient is summed over ranks."""
    for res in case_results[1]:
        assert res["zigzag_roundtrip"] == {"exact": True, "grad_ok": True}


def test_errors_name_the_argument(tmp_path):
    """Bad calls raise ValueError (TypeError for the group) naming the problem, on every rank
    alike, without a hang: mismatched shard lengths are caught by one all-gather of the shapes."""
    results, status = run_ranks(tmp_path, 2, "errors", deadline_s=60)
    results = _checked(results, status, "errors")
    expect = {
        "ulysses_heads_not_divisible": ("ValueError", "query heads (3) must be divisible by the world size (2)"),
        "ulysses_kv_heads_not_divisible": ("ValueError", "key/value heads (3) must be divisible"),
        "layout_unknown": ("ValueError", "layout must be"),
        "sharding_unknown": ("ValueError", "sharding must be"),
        "dropout": ("ValueError", "dropout_p must be 0"),
        "zigzag_odd_length": ("ValueError", "must be even, got 7"),
        "shard_lengths_differ": ("ValueError", "shards of the same shape"),
        "ulysses_shard_lengths_differ": ("ValueError", "shards of the same shape"),
        "zigzag_shard_length": ("ValueError", "multiple of 2 * world size"),
        "group_type": ("TypeError", "group must be"),
    }
    assert set(expect) == set(ERROR_CASES)
    for rank, res in enumerate(results):
        for name, (kind, text) in expect.items():
            assert res[name]["raised"] == kind, f"rank {rank} {name}: {res[name]}"
            assert text in res[name]["message"], f"rank {rank} {name}: {res[name]['message']}"
    assert "rank 1: q (1, 6, 2, 4)" in results[0]["shard_lengths_differ"]["message"]


def test_failing_rank_is_an_error_not_a_hang(tmp_path):
    """Rank 1 raises between forward and backward; rank 0's backward ring must then raise by
    itself (peer gone / process-group timeout of 5 s), well before the 60 s deadline."""
    start = time.monotonic()
    results, status = run_ranks(tmp_path, 2, "fail", deadline_s=60, pg_timeout_s=5, kill_on_failure=False)
    elapsed = time.monotonic() - start
    (rc0, text0), (rc1, text1) = status
    assert rc1 != 0 and "injected failure on rank 1" in text1
    assert rc0 not in (0, None) and rc0 > 0, f"rank 0 should raise, got returncode {rc0}:\n{text0}"
    assert "RuntimeError" in text0 or "DistBackendError" in text0, text0
    assert results[0] is None and elapsed < 40


# ---- in-process: no torch.distributed ---------------------------------------------------------

def _brute_force_plan_check(world, seqlen_local, sharding, band):
    def visible(i, j, left, right):
        return (left < 0 or j >= i - left) and (right < 0 or j <= i + right)

    def positions(rank):
        return {s.local_start + t: s.global_start + t
                for s in _plan.segments(rank, world, seqlen_local, sharding) for t in range(s.length)}

    works = []
    for r in range(world):
        gq = positions(r)
        for src in range(world):
            gk = positions(src)
            calls = _plan.plan_step(_plan.segments(r, world, seqlen_local, sharding),
                                    _plan.segments(src, world, seqlen_local, sharding), band)
            got = [(c.q_lo + i, c.k_lo + j) for c in calls for i in range(c.q_hi - c.q_lo)
                   for j in range(c.k_hi - c.k_lo) if visible(i, j, c.left, c.right)]
            want = {(i, j) for i in gq for j in gk if visible(gq[i], gk[j], *band)}
            assert len(got) == len(set(got)), f"pair computed twice: rank {r}, keys of {src}, {calls}"
            assert set(got) == want, f"rank {r}, keys of rank {src}, band {band}: {calls}"
            assert all(c.q_lo < c.q_hi and c.k_lo < c.k_hi for c in calls)
            assert _plan.step_work(calls) == len(want)
            works.append((r, src, len(want), len(calls)))
    return works


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("sharding", ["zigzag", "contiguous"])
def test_plan_computes_exactly_the_band(world, sharding):
    """Every visible (query, key) pair of the global band is computed exactly once, through the
    op's top-left band in local coordinates (leading keys/rows trimmed so that window sizes stay
    >= 0), for windows that start, end and cross segment boundaries."""
    for seqlen_local in (2, 6, 10):
        for band in [(-1, -1), (-1, 0), (0, 0), (3, 0), (7, 0), (12, 0), (40, 0), (2, 5), (5, 2), (-1, 4), (4, -1),
                     (0, 9), (9, -1), (1, 1), (13, 13)]:
            _brute_force_plan_check(world, seqlen_local, sharding, band)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_zigzag_causal_is_balanced(world):
    """Zigzag + causal: every rank does the same work at every step, in one op call per step, and
    the ring skips the fully masked block pairs (total = the causal triangle, not the square)."""
    chunk = 5
    works = _brute_force_plan_check(world, 2 * chunk, "zigzag", (-1, 0)) if world <= 4 else None
    per = {}
    for r in range(world):
        mine = _plan.segments(r, world, 2 * chunk, "zigzag")
        for s in range(world):
            calls = _plan.plan_step(mine, _plan.segments((r - s) % world, world, 2 * chunk, "zigzag"), (-1, 0))
            assert len(calls) == 1
            per.setdefault(s, set()).add(_plan.step_work(calls))
    n = 2 * world * chunk
    assert all(len(v) == 1 for v in per.values()), per  # the same work on every rank at each step
    assert sum(next(iter(v)) for v in per.values()) * world == n * (n + 1) // 2
    assert works is None or all(w[3] == 1 for w in works)


def test_merge_partial_exact_and_no_nan():
    """Merging two halves of the keys through their lse gives attention over all keys; rows with
    no visible key in one part (lse = -inf) or in both stay exact / zero, never NaN."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    mask = torch.ones(6, 10, dtype=torch.bool)
    mask[0] = False  # row 0 sees nothing at all
    mask[1, :5] = False  # row 1 sees only the second half
    full, full_lse, _ = torch.ops.flashattn_ext.fwd(q, k, v, mask)
    acc = torch.zeros(1, 2, 6, 8)
    lse = torch.full((1, 2, 6), float("-inf"))
    for part in (slice(0, 5), slice(5, 10)):
        o, l, _ = torch.ops.flashattn_ext.fwd(q, k[:, :, part], v[:, :, part], mask[:, part])
        merge_partial(acc, lse, o, l)
    assert not torch.isnan(acc).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(acc, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, full_lse, rtol=1e-5, atol=1e-6)
    assert torch.isneginf(lse[..., 0]).all() and (acc[..., 0, :] == 0).all()


@pytest.mark.parametrize("fn", [ring_attention, ulysses_attention])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_world_size_one_is_plain_attention(fn, layout):
    """Without torch.distributed initialised (world size 1) both are flash_attn_func, gradients too."""
    q, k, v = (torch.randn(2, 24, h, 16, requires_grad=True) for h in (4, 2, 2))
    ref, ref_lse = flashattn_ext.flash_attn_func(q, k, v, causal=True, window_size=(7, 0), return_lse=True)
    t = (lambda x: x.transpose(1, 2)) if layout == "bhsd" else (lambda x: x)
    out, lse = fn(t(q), t(k), t(v), causal=True, window_size=(7, 0), layout=layout, return_lse=True)
    assert torch.equal(t(out), ref) and torch.equal(lse, ref_lse)
    g = torch.randn_like(ref)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(t(out), (q, k, v), g),
                                                 torch.autograd.grad(ref, (q, k, v), g)))
    assert torch.equal(zigzag_shard(q, 1), q)


def test_import_initialises_nothing():
    """`import flashattn_ext` does not import flashattn_ext.distributed; importing it initialises
    no process group; the attribute loads it on first use."""
    code = ("import sys, flashattn_ext; assert 'flashattn_ext.distributed' not in sys.modules; "
            "import torch.distributed as dist; d = flashattn_ext.distributed; "
            "assert 'flashattn_ext.distributed' in sys.modules and not dist.is_initialized(); print('ok')")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_stalled_rank_times_out_not_hangs(tmp_path):
    """Rank 1 stays alive but never joins the backward ring: rank 0's pending send/recv must raise
    at the process group's timeout (4 s here), not wait forever."""
    start = time.monotonic()
    results, status = run_ranks(tmp_path, 2, "stall", deadline_s=60, pg_timeout_s=4, kill_on_failure=True)
    elapsed = time.monotonic() - start
    rc0, text0 = status[0]
    assert rc0 not in (0, None) and rc0 > 0 and "Timed out" in text0, f"rank 0 returncode {rc0}:\n{text0}"
    assert elapsed < 40
