"""Context-parallel scaling on CPU: the same global problem on 1 process vs W processes (one thread
each, gloo over loopback), forward and forward+backward, causal (zigzag) and non-causal.

    python benchmarks/bench_distributed.py                    # B=1, H=8, D=64, S=8192, bf16 + fp32, W=2
    python benchmarks/bench_distributed.py --quick            # small smoke run

T1: flashattn_ext.flash_attn_func on the whole sequence in one process with one thread (rank 0,
    while the other ranks sleep in a barrier).
TW: ring_attention (and ulysses_attention) over W processes, one thread each; a repetition's time
    is the slowest rank's, between two barriers. T1 and TW alternate repetition by repetition;
    medians of --repeats after one warm-up.
Parallel efficiency = T1 / (W * TW). The machine is shared: a repetition in which a rank was
runnable but not running for more than --max-stolen of its time (CPU time vs wall time, less the
time blocked on communication) is discarded and measured again; the count is saved. Bytes sent per rank are counted by
flashattn_ext.distributed.count_bytes (what each rank actually handed to isend / all-to-all), with
the time it spent blocked waiting on ring transfers (the communication not hidden by compute).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def make_inputs(args, dtype):
    g = torch.Generator().manual_seed(0)
    shape_q, shape_kv = (args.batch, args.seqlen, args.heads, args.headdim), \
        (args.batch, args.seqlen, args.kv_heads, args.headdim)
    q = torch.randn(*shape_q, generator=g).to(dtype)
    k, v = (torch.randn(*shape_kv, generator=g).to(dtype) for _ in range(2))
    dout = torch.randn(*shape_q, generator=g).to(dtype)
    return q, k, v, dout


def _timed(fn, cp):
    """(wall s, fraction of it runnable but not running, blocked-on-communication s, bytes sent)."""
    with cp.count_bytes() as c:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        t, cpu = time.perf_counter() - t0, time.process_time() - c0
    # time not on a core (another program was there), not counting time blocked on communication
    return t, max(0.0, t - cpu - c.wait_s) / t, c.wait_s, c.sent_bytes


def worker(args):
    """One of W ranks. For every (dtype, method, mask, pass), each repetition times T1 (rank 0
    alone on the whole sequence, the other ranks asleep in a barrier) and then TW (all ranks on
    their shards), back to back, so slow drifts of a shared machine hit both alike."""
    torch.set_num_threads(1)
    import torch.distributed as dist
    import flashattn_ext
    from flashattn_ext import distributed as cp
    dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=args.rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=600))
    rows = []
    for dname in args.dtypes.split(","):
        full = make_inputs(args, DTYPES[dname])
        local = [cp.zigzag_shard(x, 1) for x in full]
        for method in args.methods.split(","):
            for causal in (True, False):
                for pass_ in ("fwd", "fwd+bwd"):
                    def runner(inputs, fn):
                        q, k, v = (x.detach().requires_grad_(pass_ != "fwd") for x in inputs[:3])

                        def run():
                            if pass_ == "fwd":
                                with torch.no_grad():
                                    fn(q, k, v, causal=causal)
                            else:
                                out = fn(q, k, v, causal=causal)
                                torch.autograd.grad(out, (q, k, v), inputs[3])
                        return run

                    single = runner(full, flashattn_ext.flash_attn_func)
                    multi = runner(local, cp.ring_attention if method == "ring" else cp.ulysses_attention)
                    samples, noisy = [], []
                    for attempt in range(3 * args.repeats + 1):
                        dist.barrier()
                        t1, stolen1 = _timed(single, cp)[:2] if args.rank == 0 else (0.0, 0.0)
                        dist.barrier()
                        tw, stolen, wait, sent = _timed(multi, cp)
                        # a repetition lasts until the slowest rank is done
                        tt = torch.tensor([t1, stolen1, tw, stolen, wait, sent], dtype=torch.float64)
                        dist.all_reduce(tt, op=dist.ReduceOp.MAX)
                        t1, stolen1, tw, stolen, wait, sent = tt.tolist()
                        if attempt == 0:
                            continue  # warm-up
                        sample = dict(t1=t1, tw=tw, wait=wait, sent=int(sent))
                        if max(stolen1, stolen) > args.max_stolen:  # the machine was not quiet: again
                            noisy.append(sample)
                            continue
                        samples.append(sample)
                        if len(samples) == args.repeats:
                            break
                    quiet = len(samples) == args.repeats
                    samples += noisy[:args.repeats - len(samples)]  # never quiet enough: keep them, say so
                    t1 = statistics.median(x["t1"] for x in samples)
                    tw = statistics.median(x["tw"] for x in samples)
                    rows.append(dict(dtype=dname, method=method, causal=causal, sharding="zigzag", pass_=pass_,
                                     world=args.world, t1_s=t1, tw_s=tw, efficiency=t1 / (args.world * tw),
                                     efficiency_per_repetition=[x["t1"] / (args.world * x["tw"]) for x in samples],
                                     t1_times_s=[x["t1"] for x in samples], tw_times_s=[x["tw"] for x in samples],
                                     sent_bytes_per_rank=max(x["sent"] for x in samples),
                                     blocked_s=statistics.median(x["wait"] for x in samples),
                                     discarded=len(noisy), quiet=quiet))
    dist.destroy_process_group()
    if args.rank == 0:
        print("RESULT " + json.dumps(rows))


def launch(args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--world", str(args.world)]
    for name in ("batch", "heads", "kv_heads", "seqlen", "headdim", "repeats", "dtypes", "methods", "max_stolen"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory() as tmp:
        procs = [subprocess.Popen(cmd + ["--rank", str(r), "--store", os.path.join(tmp, "store")], env=env,
                                  stdout=subprocess.PIPE, text=True) for r in range(args.world)]
        outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a rank failed: {[p.returncode for p in procs]}")
    line = next(ln for ln in outs[0].splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def kv_bytes(args, dtype_bytes, world):
    """One rank's K/V shard (what one ring step moves) in bytes."""
    return 2 * args.batch * (args.seqlen // world) * args.kv_heads * args.headdim * dtype_bytes


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=8192, help="global sequence length")
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--methods", default="ring,ulysses")
    p.add_argument("--max-stolen", type=float, default=0.03,
                   help="discard a repetition in which a rank was runnable but descheduled for more than this "
                        "fraction of its time (another program on the cores)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "cpu", "bench_distributed.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--store", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.seqlen, args.repeats, args.dtypes, args.max_stolen = 1024, 2, "bf16", 1.0
    table = launch(args)
    for r in table:
        r["kv_shard_bytes"] = kv_bytes(args, 2 if r["dtype"] == "bf16" else 4, args.world)
    print(f"B={args.batch} H={args.heads} Hk={args.kv_heads} D={args.headdim} S={args.seqlen} W={args.world}, "
          f"one thread per process; medians of {args.repeats}")
    print("| dtype | method | mask | pass | T1 | T%d | efficiency | sent per rank | blocked on comm | discarded |"
          % args.world)
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in table:
        print(f"| {r['dtype']} | {r['method']} | {'causal zigzag' if r['causal'] else 'non-causal'} | {r['pass_']} | "
              f"{1e3 * r['t1_s']:.0f} ms | {1e3 * r['tw_s']:.0f} ms | {r['efficiency']:.3f} | "
              f"{r['sent_bytes_per_rank'] / 2**20:.1f} MiB | {1e3 * r['blocked_s']:.1f} ms | "
              f"{r['discarded']}{'' if r['quiet'] else ' (NOT QUIET)'} |")
    if not args.quick:
        cpu_model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                         platform.processor())
        info = dict(command=" ".join(["python benchmarks/bench_distributed.py"] + sys.argv[1:]),
                    torch=torch.__version__, cpu_model=cpu_model, cores=os.cpu_count(), machine=platform.machine(),
                    threads_per_process=1, backend="gloo (loopback)",
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    problem=dict(B=args.batch, H=args.heads, Hk=args.kv_heads, D=args.headdim, S=args.seqlen,
                                 W=args.world))
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(info=info, results=table), f, indent=1)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
