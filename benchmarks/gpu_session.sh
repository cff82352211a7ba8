#!/usr/bin/env bash
# The one script for a GPU session: build, test, sanitize, benchmark.
#
#   bash benchmarks/gpu_session.sh first      # the first run: ~8 min, answers the most
#   bash benchmarks/gpu_session.sh second     # the second run, if time is left: ~10 min
#   bash benchmarks/gpu_session.sh [stage]... # single stages (below)
#
# GPU time is rare and short (15 minutes a session, calls of at most 10, a minute or more of it
# spent starting): plan both runs before starting. Every kernel has already passed the emulated
# suite on the CPU (tests/test_cuda.py, cuda_emulated): the GPU run confirms and measures.
#
#   hopper = the Hopper (sm_90a) kernels only: build d=128 bf16 for 9.0a (~1 min), tests/test_cuda_sm90.py and
#            test_cuda_sm90_bwd.py, bench_attention.py fwd and fwd+bwd (Hopper forward and backward) at
#            S 1k, 4k, 8k, 16k, causal and not, vs FLASH and CUDNN                               ~4 min
#   first = build_restricted test_restricted sanitize_small quick
#     build_restricted  sm_90 only, head dims 64 and 128, bf16 + fp16, MAX_JOBS=16. Measured on the
#                       2-core development machine (nvcc 13.0, no GPU): the 10 CUDA translation
#                       units of this set take 81 s of nvcc time in all
#                       (serial, sm_90 only), the longest 13 s (fwd d=128); the torch-side C++ ~130 s serial.
#                       With 16 jobs expect ~1.5 min.                                   ~2 min
#     test_restricted   the GPU cases of test_cuda{,_graphs,_sm90,_sm90_bwd,_varlen,_kvcache}.py (-m cuda); other
#                       head dims run in the next compiled bucket or on the SIMT path   ~2 min
#     sanitize_small    compute-sanitizer memcheck on 3 small configurations            ~1 min
#     quick             bench_attention.py --quick: D=128; S 1k, 4k, 16k; fwd and fwd+bwd;
#                       causal and not; ours vs torch's FLASH and CUDNN                 ~1.5 min
#   second = build test sanitize masked sparse decode bench128
#     build             every bucket and dtype (TORCH_CUDA_ARCH_LIST=9.0a)             ~3-5 min cold
#     test              the whole pytest suite                                          ~4 min
#     sanitize          memcheck (all), racecheck and synccheck (one head dim each)     ~4 min
#     bench128, bench64, bench256, bench   bench_attention.py per head dim (~4 min each)
#     masked            bench_masked.py: padding / 4-D float masks vs EFFICIENT, CUDNN; dropout  ~2 min
#     sparse            bench_sparse.py: density sweep vs dense and FlexAttention; 64K window     ~4 min
#     decode            bench_decode.py: kvcache decode (contiguous, paged) vs SDPA, GB/s vs the
#                       GPU's read bandwidth; varlen fwd+bwd vs dense                   ~1 min
# (FlexAttention compiles once per shape, which dominates its benchmarks' time.)
# PYTEST_EXTRA="-k test_cuda" narrows the test stages.
# Logs go to $OUT (if set, else build/gpu_session/): build.log, test.log, sanitize.log, bench.log,
# bench_masked.log, bench_sparse.log, bench_results.tar.gz (benchmarks/results/<gpu>/), summary.txt
# (printed last). At most 8 files, so they all come back from a device call.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
LOGS=${OUT:-$ROOT/build/gpu_session}
mkdir -p "$LOGS"
SUMMARY=$LOGS/summary.txt
STAGES=("$@")
[[ ${#STAGES[@]} -eq 0 ]] && STAGES=(first)
PY=${PYTHON:-python}
read -r -a PYTEST_ARGS <<<"${PYTEST_EXTRA:-}"  # e.g. PYTEST_EXTRA="-k cuda -x"
export MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}

note() { echo "$*" | tee -a "$SUMMARY"; }
stamp() { date -u +%H:%M:%S; }

{
  echo "== gpu_session $(date -u +%FT%TZ) stages: ${STAGES[*]}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} | tee -a "$SUMMARY"

stage_build() {
  local t0=$SECONDS
  note "-- build ($(stamp)): MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST" \
    "FLASHATTN_CUDA_HEADDIMS=${FLASHATTN_CUDA_HEADDIMS:-all} FLASHATTN_CUDA_DTYPES=${FLASHATTN_CUDA_DTYPES:-all}"
  if $PY -m pip install --no-build-isolation -v -e . >"$LOGS/build.log" 2>&1; then
    note "build: ok in $((SECONDS - t0)) s"
    $PY -c "import flashattn_ext, json; print(json.dumps(flashattn_ext.build_info(), default=str))" 2>&1 | tee -a "$SUMMARY"
  else
    note "build: FAILED after $((SECONDS - t0)) s (tail of build.log follows)"
    tail -40 "$LOGS/build.log" | tee -a "$SUMMARY"
    return 1
  fi
}

stage_test() {  # $@: what to test (default: the whole suite)
  local t0=$SECONDS
  note "-- test ($(stamp)) ${*:-tests/}"
  local extra=()
  $PY -c "import pytest_timeout" 2>/dev/null && extra=(--timeout=600)
  local what=("$@")
  [[ ${#what[@]} -eq 0 ]] && what=(tests/)
  $PY -m pytest -q -p no:cacheprovider -rs "${extra[@]}" "${what[@]}" "${PYTEST_ARGS[@]}" >"$LOGS/test.log" 2>&1
  local rc=$?
  note "test: rc=$rc in $((SECONDS - t0)) s: $(tail -1 "$LOGS/test.log")"
  grep -E "^(FAILED|ERROR)" "$LOGS/test.log" | head -30 | tee -a "$SUMMARY"
  return $rc
}

stage_sanitize() {  # $1 = small: memcheck on three configurations only
  local t0=$SECONDS rc=0 small=${1:-}
  note "-- sanitize ($(stamp)) ${small}"
  local cs
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [[ -z "$cs" ]]; then
    note "sanitize: compute-sanitizer not found"
    return 1
  fi
  : >"$LOGS/sanitize.log"
  local tools=(memcheck racecheck synccheck)
  [[ $small == small ]] && tools=(memcheck)
  for tool in "${tools[@]}"; do
    local subset=all
    [[ $tool != memcheck ]] && subset=race
    [[ $small == small ]] && subset=small
    echo "==== $tool ($subset)" >>"$LOGS/sanitize.log"
    if "$cs" --tool "$tool" --error-exitcode 17 --print-limit 20 \
        $PY tests/cuda_sanitizer_driver.py --subset "$subset" >>"$LOGS/sanitize.log" 2>&1; then
      note "sanitize $tool: clean"
    else
      rc=1
      note "sanitize $tool: ERRORS (see sanitize.log)"
    fi
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOGS/sanitize.log" | tail -1 | tee -a "$SUMMARY"
  done
  note "sanitize: $((SECONDS - t0)) s"
  return $rc
}

stage_bench() {
  local t0=$SECONDS
  note "-- bench ($(stamp)) $*"
  echo "==== bench_attention.py $*" >>"$LOGS/bench.log"
  $PY benchmarks/bench_attention.py "$@" >>"$LOGS/bench.log" 2>&1
  local rc=$?
  note "bench: rc=$rc in $((SECONDS - t0)) s"
  sed -n '/Ratios ours/,$p' "$LOGS/bench.log" | grep -E "S=8192 causal=False|wrote" | tail -8 | tee -a "$SUMMARY"
  tar czf "$LOGS/bench_results.tar.gz" -C benchmarks results 2>/dev/null
  return $rc
}

stage_script() {  # extra benchmarks: masked attention + dropout cost, block-sparse + 64K window
  local t0=$SECONDS name=$1
  note "-- $name ($(stamp))"
  $PY "benchmarks/$name.py" >"$LOGS/$name.log" 2>&1
  local rc=$?
  note "$name: rc=$rc in $((SECONDS - t0)) s"
  tail -8 "$LOGS/$name.log" | tee -a "$SUMMARY"
  tar czf "$LOGS/bench_results.tar.gz" -C benchmarks results 2>/dev/null
  return $rc
}

status=0
for stage in "${STAGES[@]}"; do
  case $stage in
    first)
      { FLASHATTN_CUDA_HEADDIMS=64,128 FLASHATTN_CUDA_DTYPES=bf16,fp16 TORCH_CUDA_ARCH_LIST=9.0a stage_build &&
          stage_test -m cuda tests/test_cuda.py tests/test_cuda_graphs.py tests/test_cuda_sm90.py tests/test_cuda_sm90_bwd.py tests/test_cuda_varlen.py tests/test_cuda_kvcache.py; stage_sanitize small;
        stage_bench --quick; } || status=1 ;;
    second) { stage_build && stage_test; stage_sanitize; stage_script bench_masked; stage_script bench_sparse;
              stage_script bench_decode; stage_bench --headdims 128; } || status=1 ;;
    build_restricted) FLASHATTN_CUDA_HEADDIMS=64,128 FLASHATTN_CUDA_DTYPES=bf16,fp16 TORCH_CUDA_ARCH_LIST=9.0a \
                        stage_build || status=1 ;;
    test_restricted) stage_test -m cuda tests/test_cuda.py tests/test_cuda_graphs.py tests/test_cuda_sm90.py tests/test_cuda_sm90_bwd.py tests/test_cuda_varlen.py tests/test_cuda_kvcache.py || status=1 ;;
    hopper)  # the Hopper kernels alone: d=128 bf16 build, their tests, fwd and fwd+bwd vs FLASH and CUDNN
      { FLASHATTN_CUDA_HEADDIMS=128 FLASHATTN_CUDA_DTYPES=bf16 TORCH_CUDA_ARCH_LIST=9.0a stage_build &&
          stage_test -m cuda tests/test_cuda_sm90.py tests/test_cuda_sm90_bwd.py &&
          stage_bench --headdims 128 --seqlens 1024,4096,8192,16384 --modes fwd,fwd_bwd --backends ours,flash,cudnn; } ||
        status=1 ;;
    sanitize_small) stage_sanitize small || status=1 ;;
    build) stage_build || status=1 ;;
    test) stage_test || status=1 ;;
    sanitize) stage_sanitize || status=1 ;;
    bench) for d in 64 128 256; do stage_bench --headdims $d || status=1; done ;;
    bench64 | bench128 | bench256) stage_bench --headdims "${stage#bench}" || status=1 ;;
    quick) stage_bench --quick || status=1 ;;
    masked) stage_script bench_masked || status=1 ;;
    sparse) stage_script bench_sparse || status=1 ;;
    decode) stage_script bench_decode || status=1 ;;
    all) { stage_build && stage_test; stage_sanitize; stage_bench --headdims 128; } || status=1 ;;
    *) echo "unknown stage $stage (first|second|hopper|build_restricted|test_restricted|sanitize_small|build|test|sanitize|bench|bench64|bench128|bench256|quick|masked|sparse|all)"; status=2 ;;
  esac
done
echo
echo "==== summary ($LOGS/summary.txt)"
cat "$SUMMARY"
exit $status
