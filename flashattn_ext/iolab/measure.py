"""``measure``: what our CUDA kernels and torch's flash kernels really move, against the model.

Runs Nsight Compute on a small driver that calls ``flashattn_ext.scaled_dot_product_attention``
(forward and backward) and torch's SDPA with the FLASH backend on bf16 CUDA tensors, reads
DRAM bytes, L2 sectors and shared memory per CTA from ncu's raw CSV page, and prints them next
to the two-level model's prediction with M = the kernel's shared memory per CTA.

The model's "slow memory" is everything outside the SM's shared memory, so its closest GPU
counterpart is the L2 -> SM traffic (``lts__t_sectors_op_read`` x 32 bytes); DRAM bytes are lower
because the 50 MB L2 of an H100 absorbs most re-reads of K and V.

Without a CUDA device visible to torch, or without ``ncu``, it says so and exits with status 0.
This is the only module of flashattn_ext.iolab that imports torch, and only when it runs.
"""

from __future__ import annotations

import csv
import io as _io
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from . import bounds
from .plans import CacheTooSmall, plan_for

METRICS = (
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "lts__t_sectors_op_read.sum",
    "lts__t_sectors_op_write.sum",
    "l1tex__t_bytes_pipe_lsu_mem_global_op_ld.sum",
    "launch__shared_mem_per_block_dynamic",
    "launch__shared_mem_per_block_static",
    "launch__grid_size",
)
# Matched against demangled names: ours live in namespace flashattn:: (fwd_kernel, bwd_kernel,
# bwd_preprocess_kernel, dq_convert_kernel); torch's are pytorch_flash::flash_fwd_kernel/flash_bwd_*.
KERNEL_FILTER = "regex:flashattn::|flash_fwd|flash_bwd"
SECTOR_BYTES = 32
ELEMENT_BYTES = 2  # bf16 tensors; the model counts words of this size

_UNIT_SCALE = {"": 1.0, "byte": 1.0, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12,
               "sector": 1.0, "block": 1.0, "thread": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9}

DRIVER = r'''
import argparse, torch, torch.nn.functional as F
import flashattn_ext
p = argparse.ArgumentParser()
p.add_argument("--seqlen", type=int); p.add_argument("--headdim", type=int)
p.add_argument("--heads", type=int); p.add_argument("--batch", type=int)
a = p.parse_args()
torch.manual_seed(0)
shape = (a.batch, a.heads, a.seqlen, a.headdim)
q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
do = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
out = flashattn_ext.scaled_dot_product_attention(q, k, v)
out.backward(do)
torch.cuda.synchronize()
try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = F.scaled_dot_product_attention(q, k, v)
        out.backward(do)
    torch.cuda.synchronize()
except Exception as e:  # the FLASH backend may be unavailable for this build or shape
    print("torch SDPA FLASH backend skipped:", e)
'''


@dataclass
class KernelMeasurement:
    name: str
    values: dict = field(default_factory=dict)  # metric -> value in base units

    def get(self, metric: str) -> float:
        return float(self.values.get(metric, 0.0) or 0.0)

    @property
    def smem_bytes(self) -> int:
        return int(self.get("launch__shared_mem_per_block_dynamic") + self.get("launch__shared_mem_per_block_static"))

    @property
    def dram_read(self) -> float:
        return self.get("dram__bytes_read.sum")

    @property
    def dram_write(self) -> float:
        return self.get("dram__bytes_write.sum")

    @property
    def l2_read(self) -> float:
        return self.get("lts__t_sectors_op_read.sum") * SECTOR_BYTES

    @property
    def l2_write(self) -> float:
        return self.get("lts__t_sectors_op_write.sum") * SECTOR_BYTES

    @property
    def global_ld(self) -> float:
        return self.get("l1tex__t_bytes_pipe_lsu_mem_global_op_ld.sum")

    @property
    def grid(self) -> int:
        return int(self.get("launch__grid_size"))

    @property
    def origin(self) -> str:
        return "flashattn_ext" if "flashattn::" in self.name else "torch"

    @property
    def role(self) -> str:
        n = self.name.lower()
        if "dot_do_o" in n or "preprocess" in n:
            return "bwd D = rowsum(dO*O)"
        if "convert" in n:
            return "bwd dQ convert"
        if "bwd" in n or "backward" in n:
            return "bwd"
        return "fwd"


def _number(text: str) -> float | None:
    t = text.strip().replace(",", "").replace('"', "")
    if t in ("", "n/a", "N/A"):
        return None
    try:
        return float(t)
    except ValueError:
        return None


def parse_ncu_csv(text: str) -> list[KernelMeasurement]:
    """Kernels from ``ncu --csv --page raw`` output (other lines, e.g. ==PROF== or the program's
    own prints, are skipped). The row after the header holds units; values are scaled to bytes."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"')), None)
    if start is None:
        return []
    body = [ln for ln in lines[start:] if ln.startswith('"')]
    rows = list(csv.reader(_io.StringIO("\n".join(body))))
    header = rows[0]
    name_col = header.index("Kernel Name")
    metric_cols = {h: i for i, h in enumerate(header) if h in METRICS}
    units = {}
    data_rows = rows[1:]
    if data_rows and not data_rows[0][0].strip().isdigit():  # the units row
        units = {h: data_rows[0][i] for h, i in metric_cols.items()}
        data_rows = data_rows[1:]
    out = []
    for row in data_rows:
        if len(row) != len(header):
            continue
        values = {}
        for h, i in metric_cols.items():
            v = _number(row[i])
            if v is None:
                continue
            scale = _UNIT_SCALE.get(units.get(h, "").strip().lower(), None)
            if scale is None:
                raise ValueError(f"unknown unit {units.get(h)!r} for {h}")
            values[h] = v * scale
        out.append(KernelMeasurement(row[name_col], values))
    return out


def model_bytes(role: str, seqlen: int, headdim: int, smem_bytes: int, batch_heads: int) -> float | None:
    """The model's traffic for one call (all heads), in bytes, with M = smem_bytes / 2 words and the
    model's I/O-optimal tiles for that M (flash2 for the forward, flash-bwd for the backward)."""
    M = smem_bytes // ELEMENT_BYTES
    if M < 1:
        return None
    try:
        if role == "fwd":
            words = plan_for("flash2", seqlen, headdim, M).closed_form().io_words
        elif role == "bwd":
            words = plan_for("flash-bwd", seqlen, headdim, M).closed_form().io_words
        elif role.startswith("bwd D"):
            words = 2 * seqlen * headdim + seqlen
        else:
            return None
    except CacheTooSmall:
        return None
    return float(words) * ELEMENT_BYTES * batch_heads


def kernel_tile_bytes(role: str, seqlen: int, headdim: int, grid: int, batch_heads: int) -> float | None:
    """Traffic of the FA2-order schedule with the kernel's own row block, inferred from its grid
    (grid = ceil(N / block) * batch * heads for a kernel with one CTA per block and head)."""
    if grid <= 0 or grid % batch_heads:
        return None
    blocks_per_head = grid // batch_heads
    block = -(-seqlen // blocks_per_head)
    if role == "fwd":
        words = bounds.flash2_io(seqlen, headdim, block, 1).io_words
    elif role == "bwd":
        words = bounds.flash_backward_io(seqlen, headdim, 1, block, 1).io_words
    else:
        return None
    return float(words) * ELEMENT_BYTES * batch_heads


EXPLANATION = """\
How to read this: the model counts words crossing the boundary of a fast memory of M words,
with M set to the kernel's shared memory per CTA and the model's own I/O-optimal tiles; the
'kernel tiles' column uses the kernel's row block (from its grid) instead. On the GPU the closest
counterpart is L2 -> SM traffic (L2 read sectors x 32 B). DRAM reads are far lower than both:
K and V of every head (2 N d 2 B per head) fit in the 50 MB L2, so their re-reads by each query
block hit L2 and DRAM sees close to the compulsory traffic (read Q, K, V once, write O). The
model also ignores registers (S, P and the O accumulator live there on a GPU, not in shared
memory) and counts lse/D and fp32 dQ accumulators as 2-byte words."""


def report(measurements, seqlen, headdim, batch_heads) -> str:
    lines = [f"N={seqlen} d={headdim} batch*heads={batch_heads} (bf16)",
             "| kernel | role | smem/CTA | M words | model (opt tiles) | model (kernel tiles) | L2->SM read | "
             "DRAM read | DRAM write | L2 / model | DRAM / model |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in measurements:
        pred = model_bytes(k.role, seqlen, headdim, k.smem_bytes, batch_heads)
        ktile = kernel_tile_bytes(k.role, seqlen, headdim, k.grid, batch_heads)
        ref = ktile or pred
        ratio_l2 = f"{k.l2_read / ref:.2f}" if ref else "-"
        ratio_dram = f"{(k.dram_read + k.dram_write) / ref:.2f}" if ref else "-"
        name = short_name(k.name)
        lines.append(
            f"| {name} | {k.role} | {k.smem_bytes:,} B | {k.smem_bytes // ELEMENT_BYTES:,} | "
            f"{_mb(pred)} | {_mb(ktile)} | {_mb(k.l2_read)} | {_mb(k.dram_read)} | {_mb(k.dram_write)} | "
            f"{ratio_l2} | {ratio_dram} |")
    compulsory = 4 * seqlen * headdim * ELEMENT_BYTES * batch_heads
    lines.append(f"compulsory forward traffic (Q, K, V read once, O written once): {_mb(compulsory)}")
    return "\n".join(lines)


def short_name(name: str) -> str:
    """'void ns::kernel<...>(args)' -> 'ns::kernel'."""
    n = name.strip()
    if n.startswith("void "):
        n = n[5:]
    for stop in "<(":
        n = n.split(stop, 1)[0]
    return n


def _mb(x) -> str:
    return "-" if x is None else f"{x / 1e6:,.1f} MB"


def detect(ncu_path: str | None = None):
    """(ok, reason, ncu): a CUDA device visible to torch and an ncu binary."""
    try:
        import torch  # noqa: F401  (only here, at call time)
    except ImportError:
        return False, "torch is not installed", None
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible to torch (torch.cuda.is_available() is False)", None
    ncu = ncu_path or shutil.which("ncu")
    if ncu is None and os.path.exists("/usr/local/cuda/bin/ncu"):
        ncu = "/usr/local/cuda/bin/ncu"
    if ncu is None:
        return False, "Nsight Compute (ncu) is not on PATH (try --ncu /path/to/ncu)", None
    return True, "", ncu


def ncu_command(ncu: str, driver: str, seqlen: int, headdim: int, heads: int, batch: int) -> list[str]:
    return [ncu, "--csv", "--page", "raw", "--print-units", "base", "--clock-control", "none",
            "--metrics", ",".join(METRICS), "--kernel-name-base", "demangled", "--kernel-name", KERNEL_FILTER,
            "--target-processes", "all",
            sys.executable, driver, "--seqlen", str(seqlen), "--headdim", str(headdim),
            "--heads", str(heads), "--batch", str(batch)]


def main(args) -> int:
    ok, reason, ncu = detect(getattr(args, "ncu", None))
    if not ok:
        print(f"measure: skipped - {reason}. Nothing was measured; run it on a machine with an NVIDIA "
              "GPU, a CUDA build of flashattn_ext and Nsight Compute.")
        return 0
    workdir = args.keep or tempfile.mkdtemp(prefix="flashattn_io_measure_")
    os.makedirs(workdir, exist_ok=True)
    driver = os.path.join(workdir, "driver.py")
    with open(driver, "w") as f:
        f.write(DRIVER)
    status = 0
    for d in args.headdims:
        cmd = ncu_command(ncu, driver, args.seqlen, d, args.heads, args.batch)
        print("$ " + " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        with open(os.path.join(workdir, f"ncu_d{d}.csv"), "w") as f:
            f.write(proc.stdout)
        kernels = parse_ncu_csv(proc.stdout)
        if proc.returncode != 0 or not kernels:
            print(f"ncu failed or profiled no kernel (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
            status = 1
            continue
        print(report(kernels, args.seqlen, d, args.batch * args.heads))
        print()
    print(EXPLANATION)
    print(f"(driver and raw CSV in {workdir})")
    return status
