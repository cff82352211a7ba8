"""One rank of a distributed test (run by tests/test_distributed.py as a subprocess):

    python tests/distributed_worker.py RANK WORLD STORE_DIR SUITE OUT_DIR PG_TIMEOUT_S

gloo over loopback, a FileStore in STORE_DIR, torch.set_num_threads(1). Suite "cases" runs every
case of CASES and writes OUT_DIR/rank<R>.json with the errors against single-process
flashattn_ext on the gathered sequence; "errors" records the exceptions of bad calls; "fail"
makes rank 1 raise between forward and backward (the others must error, not hang); "stall" keeps
rank 1 alive but away from the backward ring (the others must raise at the process group's timeout).
"""

import datetime
import json
import os
import sys
import time
import zlib

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flashattn_ext  # noqa: E402
from flashattn_ext import distributed as cp  # noqa: E402

# name: fn, dtype, (B, chunk, Hq, Hk, D), causal, window, sharding, layout, group, extra
# The local length is 2 * chunk (zigzag: two chunks); chunks of 37 and 19 are not a tile multiple.
CASES = {
    "ring_fp32_full_contiguous": dict(fn="ring", dtype="float32", shape=(2, 37, 4, 4, 32), sharding="contiguous"),
    "ring_fp32_causal_zigzag_gqa": dict(fn="ring", dtype="float32", shape=(1, 37, 4, 2, 32), causal=True),
    "ring_fp32_causal_contiguous_bhsd": dict(fn="ring", dtype="float32", shape=(1, 37, 4, 4, 16), causal=True,
                                             sharding="contiguous", layout="bhsd"),
    "ring_fp32_window_zigzag": dict(fn="ring", dtype="float32", shape=(1, 37, 4, 2, 16), window=(16, 8)),
    "ring_fp32_causal_window_mqa": dict(fn="ring", dtype="float32", shape=(1, 37, 4, 1, 16), causal=True,
                                        window=(50, 0), lse=True),
    "ring_fp32_window_right_contiguous": dict(fn="ring", dtype="float32", shape=(1, 19, 2, 2, 16), window=(3, 45),
                                              sharding="contiguous", scale=0.3),
    "ring_fp64_causal_window_zigzag": dict(fn="ring", dtype="float64", shape=(1, 19, 2, 1, 8), causal=True,
                                           window=(23, 0), lse=True),
    "ring_bf16_causal_zigzag_gqa": dict(fn="ring", dtype="bfloat16", shape=(1, 64, 4, 2, 64), causal=True),
    "ring_bf16_full": dict(fn="ring", dtype="bfloat16", shape=(1, 37, 4, 4, 32), deterministic=True),
    "ring_fp32_causal_mesh": dict(fn="ring", dtype="float32", shape=(1, 19, 2, 2, 16), causal=True, group="mesh"),
    "ring_fp32_causal_mesh_dim": dict(fn="ring", dtype="float32", shape=(1, 19, 2, 2, 16), causal=True,
                                      group="mesh_dim"),
    "ring_fp32_causal_world1": dict(fn="ring", dtype="float32", shape=(1, 19, 2, 2, 16), causal=True, group="self"),
    "ulysses_fp32_causal_zigzag_gqa": dict(fn="ulysses", dtype="float32", shape=(1, 19, 4, 2, 16), causal=True,
                                           lse=True),
    "ulysses_bf16_full_bhsd_mqa": dict(fn="ulysses", dtype="bfloat16", shape=(1, 37, 4, 1, 32), layout="bhsd"),
    "ulysses_fp32_window_contiguous": dict(fn="ulysses", dtype="float32", shape=(1, 19, 4, 4, 16), window=(9, 5),
                                           sharding="contiguous"),
}

# Relative tolerances (max |ours - ref| / max |ref|) against single-process flashattn_ext.
TOL = {"float32": 1e-5, "float64": 1e-10, "bfloat16": 1.5e-2}


def make_groups(world: int):
    """Every group any case uses, created in the same order on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    selves = [dist.new_group([g]) for g in range(world)]
    mesh1 = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    dp = 2 if world % 2 == 0 and world > 2 else 1
    mesh2 = init_device_mesh("cpu", (dp, world // dp), mesh_dim_names=("dp", "cp"))
    return {"default": None, "self": selves[dist.get_rank()], "mesh": mesh1["cp"], "mesh_dim": (mesh2, "cp")}


def rel_err(x, ref) -> float:
    ref = ref.double()
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def run_case(name: str, case: dict, groups) -> dict:
    dtype = getattr(torch, case["dtype"])
    b, chunk, hq, hk, d = case["shape"]
    layout, sharding = case.get("layout", "bshd"), case.get("sharding", "zigzag")
    group = groups[case.get("group", "default")]
    from flashattn_ext.distributed._comm import resolve_group
    ring = resolve_group(group)
    s_local = 2 * chunk
    seqlen = ring.world * s_local
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # the same global problem on every rank
    q, k, v, dout = (torch.randn(b, seqlen, h, d, generator=gen).to(dtype) for h in (hq, hk, hk, hq))
    opts = dict(causal=case.get("causal", False), window_size=case.get("window", (-1, -1)),
                softmax_scale=case.get("scale"))

    # single-process flashattn_ext on the gathered sequence (float64 for bf16 inputs: the reference
    # is then the exact answer to the rounded inputs, and bf16 is held to its usual tolerance)
    ref_dtype = torch.float64 if dtype == torch.bfloat16 else dtype
    full = [x.to(ref_dtype).requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = flashattn_ext.flash_attn_func(*full, return_lse=True, **opts)
    ref_grads = torch.autograd.grad(ref_out, full, dout.to(ref_dtype))

    def shard(x, dim=1):
        if sharding == "zigzag":
            return cp.zigzag_shard(x, dim, group)
        return x.narrow(dim, ring.rank * s_local, s_local)

    local = [shard(x).contiguous() for x in (q, k, v)]
    if layout == "bhsd":
        local = [x.transpose(1, 2).contiguous() for x in local]
    local = [x.requires_grad_() for x in local]
    fn = cp.ring_attention if case["fn"] == "ring" else cp.ulysses_attention
    with cp.count_bytes() as fwd_bytes:
        res = fn(*local, group, layout=layout, sharding=sharding, deterministic=case.get("deterministic", False),
                 return_lse=case.get("lse", False), **opts)
    out, lse = res if case.get("lse", False) else (res, None)
    g_out = shard(dout)
    if layout == "bhsd":
        g_out = g_out.transpose(1, 2)
    with cp.count_bytes() as bwd_bytes:
        grads = torch.autograd.grad(out, local, g_out)
    if layout == "bhsd":
        out, grads = out.transpose(1, 2), [g.transpose(1, 2) for g in grads]
    errs = {"out": rel_err(out, shard(ref_out))}
    errs.update({n: rel_err(g, shard(r)) for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    if lse is not None:
        ref_l = shard(ref_lse.float() if dtype != torch.float64 else ref_lse, dim=2)
        finite = torch.isfinite(ref_l)
        errs["lse"] = (lse[finite].double() - ref_l[finite].double()).abs().max().item()
        errs["lse_inf_pattern"] = 0.0 if torch.equal(finite, torch.isfinite(lse)) else 1.0
    nan = any(torch.isnan(t).any().item() for t in (out, *grads))
    return {"errs": errs, "tol": TOL[case["dtype"]], "nan": nan, "dtype": str(out.dtype),
            "shape": list(out.shape), "world": ring.world, "fwd_bytes": fwd_bytes.sent_bytes,
            "bwd_bytes": bwd_bytes.sent_bytes,
            "kv_bytes": (local[1].numel() + local[2].numel()) * local[1].element_size(),
            "kv_fp32_bytes": (local[1].numel() + local[2].numel()) * (8 if dtype == torch.float64 else 4)}


def zigzag_roundtrip(world: int) -> dict:
    """zigzag_unshard(zigzag_shard(x)) == x (dims 1 and 2), and its gradient is summed over ranks."""
    x = torch.randn(2, 4 * world, 2 * world, 5, generator=torch.Generator().manual_seed(7))
    exact = all(torch.equal(cp.zigzag_unshard(cp.zigzag_shard(x, d), d), x) for d in (1, 2))
    leaf = cp.zigzag_shard(x, 1).requires_grad_()
    (cp.zigzag_unshard(leaf, 1) * 2).sum().backward()
    return {"exact": exact, "grad_ok": torch.equal(leaf.grad, torch.full_like(leaf, 2.0 * world))}


ERROR_CASES = {
    "ulysses_heads_not_divisible": lambda r, w: cp.ulysses_attention(*qkv(3, 3), causal=True),
    "ulysses_kv_heads_not_divisible": lambda r, w: cp.ulysses_attention(*qkv(6, 3)),
    "layout_unknown": lambda r, w: cp.ring_attention(*qkv(2, 2), layout="sbhd"),
    "sharding_unknown": lambda r, w: cp.ring_attention(*qkv(2, 2), sharding="striped"),
    "dropout": lambda r, w: cp.ring_attention(*qkv(2, 2), dropout_p=0.1),
    "zigzag_odd_length": lambda r, w: cp.ring_attention(*qkv(2, 2, s=7), causal=True),
    "shard_lengths_differ": lambda r, w: cp.ring_attention(*qkv(2, 2, s=8 if r == 0 else 6), causal=True),
    "ulysses_shard_lengths_differ": lambda r, w: cp.ulysses_attention(*qkv(2, 2, s=8 if r == 0 else 6)),
    "zigzag_shard_length": lambda r, w: cp.zigzag_shard(torch.zeros(1, 2 * w + 1, 2, 4), 1),
    "group_type": lambda r, w: cp.ring_attention(*qkv(2, 2), group="world"),
}


def qkv(hq, hk, s=8, d=4):
    return torch.randn(1, s, hq, d), torch.randn(1, s, hk, d), torch.randn(1, s, hk, d)


def main():
    rank, world, store, suite, out_dir, timeout_s = sys.argv[1:7]
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=float(timeout_s)))
    results = {}
    if suite == "cases":
        groups = make_groups(world)
        for name in os.environ.get("CP_CASES", ",".join(CASES)).split(","):
            results[name] = run_case(name, CASES[name], groups)
        results["zigzag_roundtrip"] = zigzag_roundtrip(world)
    elif suite == "errors":
        for name, call in ERROR_CASES.items():
            try:
                call(rank, world)
                results[name] = {"raised": None}
            except Exception as e:  # noqa: BLE001 -- recorded for the test to judge
                results[name] = {"raised": type(e).__name__, "message": str(e)}
    elif suite == "fail":
        q, k, v = (x.requires_grad_() for x in qkv(2, 2, s=16))
        out = cp.ring_attention(q, k, v, causal=True)
        if rank == 1:
            raise RuntimeError("injected failure on rank 1")
        out.sum().backward()  # the ring needs rank 1: this must raise, not hang
        results["survived"] = True
    elif suite == "stall":
        q, k, v = (x.requires_grad_() for x in qkv(2, 2, s=16))
        out = cp.ring_attention(q, k, v, causal=True)
        if rank == 1:
            time.sleep(60)  # alive but never joins the backward ring: rank 0 must time out, not hang
        out.sum().backward()
        results["survived"] = True
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
