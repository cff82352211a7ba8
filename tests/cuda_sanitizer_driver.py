#!/usr/bin/env python3
"""Runs every CUDA kernel of flashattn_ext once on a small configuration, for compute-sanitizer:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 python tests/cuda_sanitizer_driver.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tests/cuda_sanitizer_driver.py --subset race
    compute-sanitizer --tool synccheck --error-exitcode 1 python tests/cuda_sanitizer_driver.py --subset race

Covered: the tensor-core forward (plain and extras kernels) and backward (plain, extras,
deterministic) for every compiled head-dim bucket and dtype, the backward preprocessing and dQ
conversion, the unaligned (element-wise load) path, the SIMT forward/backward for fp32, fp64 and
head dims > 256, the dmask zeroing and the dropout-mask kernel. Lengths are odd on purpose (tile
edges). Prints one line per case and exits non-zero if a result is not finite.

memcheck without torch's caching allocator (PYTORCH_NO_CUDA_MEMORY_CACHING=1): each tensor is its
own allocation, so a read a few bytes past a small tensor (a block mask, a mask row) is reported
instead of landing in the cached block's slack.
"""

import argparse
import sys

import torch


def rand(*shape, dtype):
    return torch.randn(*shape, device="cuda", dtype=torch.float32).to(dtype)


def run_case(name, fn):
    torch.cuda.synchronize()
    outs = fn()
    torch.cuda.synchronize()
    bad = [i for i, t in enumerate(outs) if t is not None and t.is_floating_point() and not torch.isfinite(
        t.float().masked_fill(torch.isneginf(t.float()), 0)).all()]
    print(f"{'ok  ' if not bad else 'BAD '} {name}", flush=True)
    return not bad


def fwd_bwd(q, k, v, **kw):
    import flashattn_ext

    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = flashattn_ext.scaled_dot_product_attention(q, k, v, **kw)
    out.backward(torch.randn_like(out))
    return [out, q.grad, k.grad, v.grad]


def fwd_bwd_sparse(q, k, v, blocks, block_size):
    import flashattn_ext

    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = flashattn_ext.block_sparse_attention(q, k, v, blocks, block_size=block_size)
    out.backward(torch.randn_like(out))
    return [out, q.grad, k.grad, v.grad]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--subset", default="all", choices=["all", "race", "small"],
                    help="race: one head dim per kernel family (racecheck is slow); small: three "
                         "configurations (plain fwd+bwd, extras, deterministic) for a first, short GPU run")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("cuda_sanitizer_driver.py: no CUDA device")
        return 0
    import flashattn_ext
    import flashattn_ext.testing

    info = flashattn_ext.build_info()
    buckets = [int(x) for x in str(info.get("cuda_headdims", "64")).replace("[", "").replace("]", "").split(",") if x]
    dtypes = [t for t in (torch.float16, torch.bfloat16)
              if ("fp16" if t == torch.float16 else "bf16") in str(info.get("cuda_dtypes", "fp16,bf16"))]
    if args.subset == "race":
        buckets = [b for b in buckets if b in (64, 256)] or buckets[:1]
        dtypes = dtypes[:1]
    ok = True
    L, S = 77, 91
    if args.subset == "small":
        d = 128 if 128 in buckets else buckets[-1]
        dtype = dtypes[0] if dtypes else torch.bfloat16
        q, k, v = rand(1, 2, L, d, dtype=dtype), rand(1, 2, S, d, dtype=dtype), rand(1, 2, S, d, dtype=dtype)
        ok &= run_case(f"plain fwd+bwd causal d={d}", lambda: fwd_bwd(q, k, v, is_causal=True))
        mask = torch.randn(1, 1, L, S, device="cuda", dtype=torch.float32)
        ok &= run_case(f"extras (float mask) d={d}", lambda: fwd_bwd(q, k, v, attn_mask=mask))
        ok &= run_case(f"deterministic bwd d={d}", lambda: fwd_bwd(q, k, v, deterministic=True))
        print("sanitizer driver:", "all cases finite" if ok else "NON-FINITE RESULTS")
        return 0 if ok else 1
    for dtype in dtypes:
        for d in buckets:
            q, k, v = rand(1, 2, L, d, dtype=dtype), rand(1, 2, S, d, dtype=dtype), rand(1, 2, S, d, dtype=dtype)
            tag = f"{str(dtype).split('.')[-1]} d={d}"
            ok &= run_case(f"plain fwd+bwd {tag}", lambda: fwd_bwd(q, k, v, is_causal=True))
            ok &= run_case(f"deterministic bwd {tag}", lambda: fwd_bwd(q, k, v, deterministic=True))
            mask = torch.randn(1, 1, L, S, device="cuda", dtype=torch.float32)
            ok &= run_case(f"extras (float mask) {tag}", lambda: fwd_bwd(q, k, v, attn_mask=mask))
    dtype = dtypes[0] if dtypes else torch.bfloat16
    d = 64 if 64 in buckets else (buckets[0] if buckets else 64)
    q, k, v = rand(2, 4, L, d, dtype=dtype), rand(2, 2, S, d, dtype=dtype), rand(2, 2, S, d, dtype=dtype)
    ok &= run_case("gqa bottom-right window", lambda: [flashattn_ext.flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, window_size=(20, 0))])
    ok &= run_case("gqa bwd", lambda: fwd_bwd(q, k, v, enable_gqa=True, is_causal=True))
    bool_mask = torch.rand(2, 4, L, S, device="cuda") > 0.5
    ok &= run_case("bool mask", lambda: fwd_bwd(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), attn_mask=bool_mask))
    ok &= run_case("dropout", lambda: fwd_bwd(q, k, v, enable_gqa=True, dropout_p=0.3))
    ok &= run_case("alibi + softcap", lambda: fwd_bwd(q, k, v, enable_gqa=True, softcap=10.0,
                                                    alibi_slopes=torch.rand(4, device="cuda")))
    mask_g = torch.randn(L, S, device="cuda", requires_grad=True)

    def with_mask_grad():
        res = fwd_bwd(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), attn_mask=mask_g)
        return res + [mask_g.grad]

    ok &= run_case("mask grad", with_mask_grad)
    blocks = torch.rand(2, 4, (L + 63) // 64, (S + 63) // 64, device="cuda") > 0.3
    ok &= run_case("block sparse", lambda: list(torch.ops.flashattn_ext.fwd(
        q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), block_mask=blocks, sparse_block_m=64, sparse_block_n=64)[:2]))
    # Sparse blocks smaller than the kernel tiles, not dividing S: the last key tile reaches past
    # the last block column (tile_skipped clamps); the last block row is empty under that tile.
    small = torch.rand(2, 4, (L + 31) // 32, (S + 15) // 16, device="cuda") > 0.4
    small[:, :, -1, 64 // 16:] = False
    ok &= run_case("block sparse 32x16 fwd+bwd", lambda: fwd_bwd_sparse(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1),
                                                                        small, (32, 16)))
    ok &= run_case("dropout_p=1 (all dropped)", lambda: fwd_bwd(q, k, v, enable_gqa=True, dropout_p=1.0))
    big = rand(1, 2, L, d + 8, dtype=dtype)
    ok &= run_case("unaligned rows", lambda: fwd_bwd(big[..., 3:3 + d], k[:1], v[:1]))
    for fdt in (torch.float32, torch.float64):
        qf, kf, vf = rand(1, 2, 33, 72, dtype=fdt), rand(1, 2, 45, 72, dtype=fdt), rand(1, 2, 45, 72, dtype=fdt)
        ok &= run_case(f"simt {fdt}", lambda: fwd_bwd(qf, kf, vf, is_causal=True))
    qh, kh, vh = rand(1, 2, 20, 320, dtype=dtype), rand(1, 2, 25, 320, dtype=dtype), rand(1, 2, 25, 320, dtype=dtype)
    ok &= run_case("simt d=320", lambda: fwd_bwd(qh, kh, vh))
    _, _, rng = torch.ops.flashattn_ext.fwd(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), dropout_p=0.2)
    ok &= run_case("dropout mask kernel", lambda: [flashattn_ext.testing.dropout_mask(q, k.repeat(1, 2, 1, 1), rng,
                                                                                      0.2).float()])
    print("sanitizer driver:", "all cases finite" if ok else "NON-FINITE RESULTS")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
