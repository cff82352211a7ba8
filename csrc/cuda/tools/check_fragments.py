#!/usr/bin/env python3
"""A NumPy model of the fragment addressing in smem_layout.h / warp_gemm.h, run on the CPU.

It stores random tiles with SmemTile's swizzle, replays FragAddr's per-lane base addresses,
ldmatrix (.x4, plain and .trans) and mma.sync m16n8k16 exactly as the PTX ISA defines their
fragments, and checks every warp product the kernels issue (forward S = Q K^T and O = P V with P
from registers; backward S^T, dV/dK with interleaved warp column groups, dQ with a per-warp
chunk XOR) against a plain matrix product, for every tile configuration in kernel_configs.h.
Also checks that no two chunks of a tile overlap and that ldmatrix addresses are 16-byte aligned.
A mirror of the C++ index math written by hand (change both together); the tile configurations
come from kernel_configs.h itself (tools/table.py). Run by .ci/compile_cuda.sh and tests/test_cuda_tools.py.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import table  # noqa: E402

rng = np.random.default_rng(0)

class Tile:
    def __init__(s, rows, cols):
        s.rows, s.cols = rows, cols
        s.pc = 64 if cols % 64 == 0 else 32
        s.pch = s.pc // 8
    def offset(s, row, chunk):
        panel, c = chunk // s.pch, chunk % s.pch
        sw = (row & 7) if s.pch == 8 else ((row >> 1) & 3)
        return panel * (s.rows * s.pc) + row * s.pc + ((c ^ sw) << 3)
    def store(s, M):  # logical matrix -> smem array (elements)
        mem = np.full(s.rows * s.cols, np.nan)
        for r in range(s.rows):
            for ch in range(s.cols // 8):
                o = s.offset(r, ch)
                assert np.all(np.isnan(mem[o:o+8])), "overlap"
                mem[o:o+8] = M[r, ch*8:ch*8+8]
        assert not np.isnan(mem).any()
        return mem

class Frag:
    def __init__(s, tile, rows_from_q0, smem_base, row0, chunk_xor=0):
        s.t = tile; s.base = {}
        for lane in range(32):
            r, q = lane % 8, lane // 8
            lr = r + 8 * (q % 2) if rows_from_q0 else r + 8 * (q // 2)
            lc = q // 2 if rows_from_q0 else q % 2
            sw = (lr & 7) if tile.pch == 8 else ((lr >> 1) & 3)
            x = lc ^ sw ^ chunk_xor
            start = smem_base + (row0 + lr) * tile.pc * 2
            s.base[lane] = [start + (((2 * i) ^ x) << 4) for i in range(tile.pch // 2)]
    def at(s, lane, row, chunk):
        panel, c = chunk // s.t.pch, chunk % s.t.pch
        return s.base[lane][c // 2] + (panel * s.t.rows * s.t.pc + row * s.t.pc) * 2

def ldsm(mem_bytes_fn, addrs, trans):
    # addrs[lane] = byte address of row (lane%8) of matrix lane//8. returns regs[lane][j] = (lo, hi)
    mats = []
    for m in range(4):
        groups = {(addrs[8*m + r] // 16) % 8 for r in range(8)}
        assert len(groups) == 8, "ldmatrix phase with shared-memory bank conflicts"
        rows = [mem_bytes_fn(addrs[8*m + r]) for r in range(8)]  # each row: 8 elements
        mats.append(np.array(rows))
    out = [[None]*4 for _ in range(32)]
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for j in range(4):
            M = mats[j]
            if not trans: out[lane][j] = (M[g, 2*t], M[g, 2*t+1])
            else: out[lane][j] = (M[2*t, g], M[2*t+1, g])
    return out

def mma(acc, a, b0, b1):
    # acc[lane][4], a[lane][4] pairs, b0/b1[lane] pairs
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        A[g, 2*t:2*t+2] = a[lane][0]; A[g+8, 2*t:2*t+2] = a[lane][1]
        A[g, 2*t+8:2*t+10] = a[lane][2]; A[g+8, 2*t+8:2*t+10] = a[lane][3]
        B[2*t:2*t+2, g] = b0[lane]; B[2*t+8:2*t+10, g] = b1[lane]
    C = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        acc[lane][0] += C[g, 2*t]; acc[lane][1] += C[g, 2*t+1]; acc[lane][2] += C[g+8, 2*t]; acc[lane][3] += C[g+8, 2*t+1]

class Smem:
    def __init__(s): s.mem = {}
    def put(s, base_bytes, arr):
        for i, v in enumerate(arr): s.mem[base_bytes + 2*i] = v
    def row(s, addr):
        assert addr % 16 == 0, "ldmatrix address not 16-byte aligned"
        return [s.mem[addr + 2*e] for e in range(8)]

def warp_gemm(MT, NT, KS, atrans, btrans, fa, fb, sm, pair_stride=1, pair_begin=0):
    acc = [[[0.0]*4 for _ in range(32)] for _ in range(MT*NT)]
    for ks in range(KS):
        a = []
        for mt in range(MT):
            addrs = [(fa.at(l, 16*ks, (16*mt)//8) if atrans else fa.at(l, 16*mt, 2*ks)) for l in range(32)]
            a.append(ldsm(sm.row, addrs, atrans))
        for np_ in range(NT // 2):
            pair = pair_begin + pair_stride * np_
            addrs = [(fb.at(l, 16*ks, 2*pair) if btrans else fb.at(l, 16*pair, 2*ks)) for l in range(32)]
            b = ldsm(sm.row, addrs, btrans)
            for mt in range(MT):
                mma(acc[mt*NT + 2*np_], a[mt], [b[l][0] for l in range(32)], [b[l][1] for l in range(32)])
                mma(acc[mt*NT + 2*np_+1], a[mt], [b[l][2] for l in range(32)], [b[l][3] for l in range(32)])
    return acc

def check_store_banks(tile, row0, col0):
    """store_acc_to_smem: each (mt, nt, half) is one 4-byte store per lane; 32 distinct banks."""
    for half in range(2):
        banks = set()
        for lane in range(32):
            g, t = lane // 4, lane % 4
            row, col = row0 + g + 8 * half, col0 + 2 * t
            off = tile.offset(row, col >> 3) + (col & 7)
            banks.add((off * 2 // 4) % 32)
        assert len(banks) == 32, "store_acc_to_smem bank conflict"


def acc_to_matrix(acc, MT, NT, row_of, col_of):
    out = {}
    for mt in range(MT):
        for nt in range(NT):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for e in range(4):
                    out[(row_of(mt, g, e), col_of(nt, t, e))] = acc[mt*NT+nt][lane][e]
    return out

def check(out, Ref):
    for (r, c), v in out.items():
        assert abs(v - Ref[r, c]) < 1e-9, (r, c, v, Ref[r, c])
    return len(out)

# ---- forward: S = Q K^T (warp rows warp_row0), O = P V with P from registers
# Every tile configuration of kernel_configs.h (tools/table.py compiles tools/tile_configs.cpp).
CONFIGS = table.tile_configs()
FWD = sorted({(c["headdim"], c["block_m"], c["block_n"], c["warps"]) for c in CONFIGS if c["dir"] == "fwd"})
BWD = sorted({(c["headdim"], c["block_m"], c["block_n"], c["warps"], c["warps_keys_s"], c["warps_keys_kv"])
              for c in CONFIGS if c["dir"] == "bwd"})
for D, BM, BN, NW in FWD:
    TQ, TK = Tile(BM, D), Tile(BN, D)
    Q, K, V = rng.standard_normal((BM, D)), rng.standard_normal((BN, D)), rng.standard_normal((BN, D))
    sm = Smem(); qb, kb = 0, BM*D*2; vb = kb + BN*D*2
    sm.put(qb, TQ.store(Q)); sm.put(kb, TK.store(K)); sm.put(vb, TK.store(V))
    rows = BM // NW; MT = rows // 16
    for warp in [0, NW-1]:
        wr0 = warp * rows
        fq, fk, fv = Frag(TQ, True, qb, wr0), Frag(TK, False, kb, 0), Frag(TK, True, vb, 0)
        acc = warp_gemm(MT, BN//8, D//16, False, False, fq, fk, sm)
        S = Q @ K.T
        out = acc_to_matrix(acc, MT, BN//8, lambda mt,g,e: wr0+16*mt+g+8*(e//2), lambda nt,t,e: 8*nt+2*t+(e%2))
        check(out, S)
        # Ring kernel: the stage-1 tiles sit TileK bytes further (FragAddr::advance), and a tile
        # may be scored in two sub-tiles (S: pair_begin; P V: k_begin).
        sm.put(vb + BN*D*2, TK.store(K)); sm.put(vb + 2*BN*D*2, TK.store(V))  # stage 1 K, V
        fk1, fv1 = Frag(TK, False, vb + BN*D*2, 0), Frag(TK, True, vb + 2*BN*D*2, 0)
        sub_n = BN // 2 if BN >= 32 else BN
        for sub in range(BN // sub_n):
            acc = warp_gemm(MT, sub_n//8, D//16, False, False, fq, fk1, sm, pair_begin=sub*sub_n//16)
            out = acc_to_matrix(acc, MT, sub_n//8, lambda mt,g,e: wr0+16*mt+g+8*(e//2), lambda nt,t,e: sub*sub_n+8*nt+2*t+(e%2))
            check(out, S)
        # P from the S accumulators (as acc_to_a_fragments), O = P V
        P = rng.standard_normal((BM, BN))
        KS = BN // 16; NT = D // 8
        acc_o = [[[0.0]*4 for _ in range(32)] for _ in range(MT*NT)]
        for ks in range(KS):
            for np_ in range(NT//2):
                # second half of the keys through the stage-1 V with k_begin (sub-tile 1)
                half = ks >= KS // 2
                addrs = [(fv1.at(l, 16*ks, 2*np_) if half else fv.at(l, 16*ks, 2*np_)) for l in range(32)]
                b = ldsm(sm.row, addrs, True)
                for mt in range(MT):
                    a = []
                    for lane in range(32):
                        g, t = lane//4, lane%4
                        r0 = wr0 + 16*mt + g; c0 = 16*ks + 2*t
                        a.append(((P[r0,c0],P[r0,c0+1]), (P[r0+8,c0],P[r0+8,c0+1]), (P[r0,c0+8],P[r0,c0+9]), (P[r0+8,c0+8],P[r0+8,c0+9])))
                    mma(acc_o[mt*NT+2*np_], a, [b[l][0] for l in range(32)], [b[l][1] for l in range(32)])
                    mma(acc_o[mt*NT+2*np_+1], a, [b[l][2] for l in range(32)], [b[l][3] for l in range(32)])
        out = acc_to_matrix(acc_o, MT, NT, lambda mt,g,e: wr0+16*mt+g+8*(e//2), lambda nt,t,e: 8*nt+2*t+(e%2))
        check(out, P @ V)
    print("fwd ok", D, BM, BN, NW)

# ---- backward
def bwd(D, BM, BN, NW, WKS, WKKV):
    TK, TQ, TP = Tile(BN, D), Tile(BM, D), Tile(BN, BM)
    K, V, Q, dO = (rng.standard_normal(s) for s in [(BN, D), (BN, D), (BM, D), (BM, D)])
    PT, dST = rng.standard_normal((BN, BM)), rng.standard_normal((BN, BM))
    sm = Smem(); kb = 0; vb = BN*D*2; pb = 2*BN*D*2; db = pb + BN*BM*2; qb = db + BN*BM*2; ob = qb + BM*D*2
    for base, t, M in [(kb, TK, K), (vb, TK, V), (pb, TP, PT), (db, TP, dST), (qb, TQ, Q), (ob, TQ, dO)]:
        sm.put(base, t.store(M))
    WQS = NW // WKS; SMT = BN // WKS // 16; SNT = BM // WQS // 8
    WCKV = NW // WKKV; KVMT = BN // WKKV // 16; KVCols = D // WCKV; KVNT = KVCols // 8
    WRDQ = BM // 16; WCDQ = NW // WRDQ; DqCols = D // WCDQ; DqChunk = 32 if DqCols % 32 == 0 else 16
    for warp in range(NW):
        sk0 = (warp % WKS) * (BN // WKS); sq0 = (warp // WKS) * (BM // WQS)
        acc = warp_gemm(SMT, SNT, D//16, False, False, Frag(TK, True, kb, sk0), Frag(TQ, False, qb, sq0), sm)
        check(acc_to_matrix(acc, SMT, SNT, lambda mt,g,e: sk0+16*mt+g+8*(e//2), lambda nt,t,e: sq0+8*nt+2*t+(e%2)), K @ Q.T)
        kvk0 = (warp % WKKV) * (BN // WKKV); kvg = warp // WKKV
        acc = warp_gemm(KVMT, KVNT, BM//16, False, True, Frag(TP, True, pb, kvk0), Frag(TQ, True, ob, 0, 2*kvg), sm, pair_stride=WCKV)
        col = lambda nt,t,e: 16*(kvg + WCKV*(nt//2)) + 8*(nt%2) + 2*t + (e%2)
        check(acc_to_matrix(acc, KVMT, KVNT, lambda mt,g,e: kvk0+16*mt+g+8*(e//2), col), PT @ dO)
        dqr0 = (warp % WRDQ) * 16; dqg = warp // WRDQ
        cp = DqChunk // 16
        for chunk in range(DqCols // DqChunk):
            pbeg = WCDQ * cp * chunk
            acc = warp_gemm(1, DqChunk//8, BN//16, True, True, Frag(TP, False, db, 0, dqr0//8), Frag(TK, True, kb, 0, 2*dqg), sm, pair_stride=WCDQ, pair_begin=pbeg)
            col = lambda nt,t,e: 16*(pbeg + WCDQ*(nt//2) + dqg) + 8*(nt%2) + 2*t + (e%2)
            check(acc_to_matrix(acc, 1, DqChunk//8, lambda mt,g,e: dqr0+g+8*(e//2), col), dST.T @ K)
        check_store_banks(TP, sk0, sq0)
        check_store_banks(TK, kvk0, 16 * kvg)
    print("bwd ok", D, BM, BN, NW, WKS, WKKV)

for config in BWD:
    bwd(*config)
