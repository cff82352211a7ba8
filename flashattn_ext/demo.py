"""The main job: a small GPT-style model trains a few steps with flashattn_ext and with torch's
own scaled_dot_product_attention, from the same initialization on the same batches, and prints
how closely the losses agree, tokens/s and peak memory.

    python -m flashattn_ext.demo                # CPU by default, the GPU when there is one
    python -m flashattn_ext.demo --steps 20 --seq-len 512 --device cpu

The model calls torch.nn.functional.scaled_dot_product_attention, like any third-party model;
flashattn_ext takes over through patch_sdpa(), unmodified.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        # (B, T, H, D) viewed as (B, H, T, D): no copy; flashattn_ext reads the strides as they are
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab, seq_len, d_model, n_heads, n_layers):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def batches(args, device):
    """Deterministic synthetic 'text': a noisy repeating pattern the model can learn."""
    g = torch.Generator().manual_seed(0)
    period = 37
    base = torch.randint(0, args.vocab, (period,), generator=g)
    for _ in range(args.steps):
        start = torch.randint(0, period, (args.batch, 1), generator=g)
        idx = base[(start + torch.arange(args.seq_len + 1)) % period]
        noise = torch.rand(idx.shape, generator=g) < 0.1
        idx = torch.where(noise, torch.randint(0, args.vocab, idx.shape, generator=g), idx)
        yield idx[:, :-1].to(device), idx[:, 1:].to(device)


def peak_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train(args, backend):
    """Runs in its own process so peak memory belongs to this backend alone."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(args.vocab, args.seq_len, args.d_model, args.heads, args.layers).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else None
    patch = None
    if backend == "flashattn_ext":
        import flashattn_ext
        patch = flashattn_ext.patch_sdpa()
    data = list(batches(args, device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_mem = peak_memory_bytes(device)
    losses, times = [], []
    for x, y in data:
        t0 = time.perf_counter()
        if amp:
            with amp:
                logits = model(x)
        else:
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, args.vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    calls = patch.calls if patch else None
    if patch:
        patch.undo()
    steady = times[1:] or times
    return {
        "backend": backend,
        "losses": losses,
        "tokens_per_s": args.batch * args.seq_len * len(steady) / sum(steady),
        "peak_mem_mib": (peak_memory_bytes(device) - (base_mem if device.type == "cpu" else 0)) / 2**20,
        "attention_calls": calls,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--worker", choices=["flashattn_ext", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(train(args, args.worker)))
        return 0

    print(f"flashattn_ext demo: GPT {args.layers} layers, d_model {args.d_model}, {args.heads} heads "
          f"(head dim {args.d_model // args.heads}), seq {args.seq_len}, batch {args.batch}, {args.steps} steps "
          f"on {args.device}{' (bf16 autocast)' if args.device.startswith('cuda') else ' (fp32)'}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    results = {}
    for backend in ("torch", "flashattn_ext"):
        cmd = [sys.executable, "-m", "flashattn_ext.demo", "--worker", backend] + (argv if argv is not None else sys.argv[1:])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
        results[backend] = json.loads(out.stdout.strip().splitlines()[-1])
    ours, ref = results["flashattn_ext"], results["torch"]
    print(f"\n{'step':>4}  {'loss torch':>11}  {'loss flashattn_ext':>18}  {'|diff|':>9}")
    for i, (a, b) in enumerate(zip(ref["losses"], ours["losses"])):
        print(f"{i:>4}  {a:>11.5f}  {b:>18.5f}  {abs(a - b):>9.2e}")
    max_diff = max(abs(a - b) for a, b in zip(ref["losses"], ours["losses"]))
    print(f"\nloss agreement: max |diff| = {max_diff:.2e} over {args.steps} steps "
          f"(loss {ref['losses'][0]:.3f} -> {ref['losses'][-1]:.3f}); attention calls through flashattn_ext: "
          f"{ours['attention_calls']}")
    mem_label = "peak CUDA memory" if args.device.startswith("cuda") else "peak RSS growth"
    print(f"{'':14}{'tokens/s':>10}  {mem_label:>17}")
    for r in (ref, ours):
        print(f"{r['backend']:<14}{r['tokens_per_s']:>10.0f}  {r['peak_mem_mib']:>13.1f} MiB")
    print(f"speed ratio flashattn_ext / torch: {ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x")
    tol = 1e-3 if args.device == "cpu" else 5e-2
    ok = max_diff < tol and ours["attention_calls"] and math.isfinite(ours["losses"][-1])
    print("OK" if ok else f"MISMATCH (tolerance {tol})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
