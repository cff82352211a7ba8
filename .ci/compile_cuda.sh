#!/usr/bin/env bash
# Compile-check every CUDA translation unit under csrc/cuda for sm_80 and sm_90a on a machine
# without a GPU: nvcc -c with the flags setup.py uses, 2 jobs at a time, `-Xptxas -v`.
# Writes the full ptxas report to $1 (default build/ptxas_report.txt) and a per-kernel summary
# (registers, spill stores/loads, stack, dynamic shared memory) to $1.summary and stdout.
# Fails on any compile error, if a forward kernel for head dims <= 128 spills, or if the NumPy
# model of the fragment addressing (csrc/cuda/tools/check_fragments.py) or the model of the tile
# ranges / deterministic turns / block-sparse mapping / pipeline schedules
# (csrc/cuda/tools/check_schedules.py) disagrees.
#
#   FLASHATTN_CI_ARCHS="80 90a"  architectures (default: both; the Hopper kernels, *_sm90_*.cu,
#                                only for 90a: for other targets its kernels are empty)
#   FLASHATTN_CI_JOBS=2          parallel nvcc processes
#   FLASHATTN_CI_MODELS_CHECKED=1 skip the two model checks (.ci/run: the test suite just ran them,
#                                tests/test_cuda_tools.py)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
REPORT=${1:-build/ptxas_report.txt}
mkdir -p "$(dirname "$REPORT")"
REPORT=$(cd "$(dirname "$REPORT")" && pwd)/$(basename "$REPORT")
ARCHS=${FLASHATTN_CI_ARCHS:-"80 90a"}
JOBS=${FLASHATTN_CI_JOBS:-2}
WORK=$(mktemp -d /tmp/flashattn_cuda_ci.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

if ! command -v nvcc >/dev/null; then
  echo "compile_cuda.sh: nvcc not found" >&2
  exit 1
fi

FLAGS="-I csrc -Xptxas -v"
while IFS= read -r flag; do  # the flags setup.py uses (one file for both)
  [[ -z "$flag" || "$flag" == \#* ]] && continue
  FLAGS+=" $flag"
done < csrc/cuda/nvcc_flags.txt
export FLAGS WORK

compile_one() {  # $1 = file, $2... = archs: one nvcc call, one -gencode per arch (the host side,
  # about a third of a single-arch compile, runs once)
  local file=$1 tag gencode="" a
  shift
  tag=$(echo "${file#csrc/cuda/}" | tr '/' '_')
  for a in "$@"; do gencode+=" -gencode arch=compute_$a,code=sm_$a"; done
  local start=$SECONDS
  # shellcheck disable=SC2086
  if nvcc $FLAGS $gencode -c "$file" -o "$WORK/$tag.o" >"$WORK/$tag.log" 2>&1; then
    echo "ok   $file [$*] ($((SECONDS - start)) s)"
  else
    echo "FAIL $file [$*]" >&2
    cat "$WORK/$tag.log" >&2
    touch "$WORK/$tag.failed"
  fi
}
export -f compile_one

# The instantiation files are generated from the table in buckets.h: they must be up to date.
python3 csrc/cuda/tools/generate_instantiations.py --check
if [[ "${FLASHATTN_CI_MODELS_CHECKED:-0}" != 1 ]]; then
  # The fragment / swizzle index math, checked on the CPU against a NumPy model (~10 s).
  if python3 -c "import numpy" 2>/dev/null; then
    python3 csrc/cuda/tools/check_fragments.py >"$WORK/fragments.log" 2>&1 || {
      cat "$WORK/fragments.log" >&2
      echo "compile_cuda.sh: fragment model check failed" >&2
      exit 1
    }
    echo "fragment model check: ok ($(grep -c ok "$WORK/fragments.log") tile configurations)"
  fi
  # Band ranges, deterministic dQ turns, block-sparse mapping and the shared-memory pipeline
  # schedules, mirrored in plain Python (~5 s).
  python3 csrc/cuda/tools/check_schedules.py >"$WORK/schedules.log" 2>&1 || {
    cat "$WORK/schedules.log" >&2
    echo "compile_cuda.sh: schedule model check failed" >&2
    exit 1
  }
  echo "schedule model check: ok"
else
  echo "fragment and schedule model checks: run by the test suite (tests/test_cuda_tools.py)"
fi

mapfile -t FILES < <(find csrc/cuda -name '*.cu' -not -path 'csrc/cuda/emulator/*' | sort)
echo "compile_cuda.sh: ${#FILES[@]} translation units, archs [$ARCHS] (one nvcc call per unit), $JOBS jobs"
T0=$SECONDS
# Largest first (the instantiation files) so the two workers finish together.
for f in "${FILES[@]}"; do
  archs=""
  for a in $ARCHS; do
    [[ "$f" == *_sm90_* && "$a" != 90a ]] && continue
    archs+=" $a"
  done
  [[ -n "$archs" ]] && echo "$f$archs"
done |
  sort -t' ' -k1,1 -r | xargs -P "$JOBS" -L 1 bash -c 'compile_one "$0" "$@"'
ELAPSED=$((SECONDS - T0))

cat "$WORK"/*.log > "$REPORT"
if compgen -G "$WORK/*.failed" >/dev/null; then
  echo "compile_cuda.sh: compile errors (see above)" >&2
  exit 1
fi
if grep -qiE "warning" "$REPORT"; then
  echo "compile_cuda.sh: nvcc/ptxas warnings:"
  grep -iE "warning" "$REPORT" | sort -u | head -20
fi

# Dynamic shared memory per kernel configuration, from the traits themselves (tools/table.py
# compiles tools/tile_configs.cpp on the host).
SMEM_TABLE=$(python3 - <<'PY'
import sys
sys.path.insert(0, "csrc/cuda/tools")
import table
for c in table.tile_configs():
    extra = f"{c['stages']} stage(s), sub-tiles {c.get('sub_tiles', 1)}" if c["dir"] == "fwd" else f"{c['stages']} stage(s)"
    print(f"{c['dir']} d={c['headdim']:<3} {c['role']:<13} {c['block_m']:>3} x {c['block_n']:<3} {c['warps']} warps, {extra}, {c['smem_bytes']} B")
PY
)

python3 - "$REPORT" "$ELAPSED" "$SMEM_TABLE" <<'PY'
import re, subprocess, sys
report, elapsed, smem_table = sys.argv[1], sys.argv[2], sys.argv[3]
rows, cur = [], None
for line in open(report):
    m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'", line)
    if m:
        cur = {"mangled": m.group(1), "arch": m.group(2), "regs": "?", "spill_st": 0, "spill_ld": 0, "stack": 0}
        rows.append(cur)
        continue
    if cur is None:
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
    m = re.search(r"Used (\d+) registers", line)
    if m:
        cur["regs"] = int(m.group(1))
    m = re.search(r"(\d+) bytes smem", line)
    if m:
        cur["static_smem"] = int(m.group(1))
try:
    names = subprocess.run(["c++filt"], input="\n".join(r["mangled"] for r in rows), capture_output=True,
                           text=True, check=True).stdout.split("\n")
except (OSError, subprocess.CalledProcessError):  # no binutils: keep the mangled names
    names = [r["mangled"] for r in rows]
def short(n):
    n = n.replace("flashattn::cuda::", "").replace("(anonymous namespace)::", "")
    n = re.sub(r"\(.*\)$", "", n)
    return n.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
seen, lines, bad = set(), [], []
for r, n in zip(rows, names):
    key = (short(n), r["arch"])
    if key in seen:
        continue
    seen.add(key)
    lines.append(f"{r['arch']:6} regs {str(r['regs']):>3}  spill st/ld {r['spill_st']:>4}/{r['spill_ld']:<4} stack {r['stack']:>4}  {key[0]}")
    m = re.match(r"void fwd_kernel<FwdTraits<\w+, (\d+),", key[0])
    if m and int(m.group(1)) <= 128 and (r["spill_st"] or r["spill_ld"]):
        bad.append(lines[-1])
    if key[0].startswith(("void fwd_sm90_kernel", "void bwd_sm90_kernel")) and (r["spill_st"] or r["spill_ld"] or r["stack"]):
        bad.append(lines[-1])  # the Hopper kernels: no spill at any head dim
summary = "\n".join(sorted(lines, key=lambda s: (s.split("  ")[-1], s[:6])))
sm90 = open("csrc/cuda/fwd_sm90.cuh").read()
regs = dict(re.findall(r"k(Producer|Consumer)Regs = (\d+)", sm90))
sm90_note = (f"Hopper forward and backward (fwd_sm90_kernel, bwd_sm90_kernel, 384 threads, __launch_bounds__(384, 1): ptxas reports the entry "
             f"budget): after setmaxnreg the producer warpgroup holds {regs.get('Producer')} registers per thread, "
             f"each of the two consumer warpgroups {regs.get('Consumer')}")
text = f"ptxas summary ({len(lines)} kernels, compile wall time {elapsed} s)\n{summary}\n\n{sm90_note}\n\nTile configurations (dynamic shared memory per CTA):\n{smem_table}\n"
open(report + ".summary", "w").write(text)
print(text)
if bad:
    print("FAIL: forward kernels for head dims <= 128 (any head dim for the Hopper kernels) spill:\n" + "\n".join(bad))
    sys.exit(1)
PY
echo "compile_cuda.sh: done in ${ELAPSED} s; report $REPORT"
