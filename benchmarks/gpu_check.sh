#!/usr/bin/env bash
# One call on a lent GPU machine (see benchmarks/RESULTS.md "GPU runs") that settles every GPU
# claim still open, in under 8 minutes: build lvopt's CUDA kernels for that GPU, run the tests
# that need a GPU (CUDA ops, Triton ops compiled rather than interpreted, the optimizer on CUDA
# parameters, the sparse step under sync-debug mode "error" and in a CUDA graph, capturable
# dense steps), the GPU benchmark with the sparse claims, the capture benchmark, and the
# language-model LV-rule experiment (streams its runs as it goes). Logs land in $OUT (or
# ./gpu-out) so that they come back with the call.
#
#     bash benchmarks/gpu_check.sh [build] [tests] [suite] [bench] [capture] [experiment] [sanitize] [profile]
#                                  (default: build tests bench capture experiment)
#
# Each step has a time budget (seconds, environment: BUILD_S, TESTS_S, BENCH_S, CAPTURE_S,
# EXPERIMENT_S, SANITIZE_S) and the whole run a deadline (TOTAL_S, default 470): a step that
# would start with less than a minute left is skipped and says so. `sanitize` (compute-sanitizer
# over the CUDA test files, benchmarks/sanitize_gpu.sh) is slow and runs in a call of its own.
#
# The machine's own python3 (with its torch and triton) is used; nothing is installed. Logs go
# to $OUT/logs; through the device tool, where at most 8 files come back, end the command with
# `cd $OUT && tar czf logs.tgz logs && rm -rf logs`.
set -u -o pipefail
OUT=${OUT:-gpu-out}/logs
mkdir -p "$OUT"
PY=${PY:-python3}
steps=${*:-build tests bench capture experiment}
T0=$(date +%s)
TOTAL_S=${TOTAL_S:-470}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

has() { [[ " $steps " == *" $1 "* ]]; }
# left: seconds before the deadline; go STEP: whether STEP is asked for and a minute is left.
left() { echo $(( TOTAL_S - ($(date +%s) - T0) )); }
go() {
  has "$1" || return 1
  if (( $(left) < 60 )); then echo "$1: skipped, $(left) s left of TOTAL_S=$TOTAL_S"; return 1; fi
  echo "== $1 ($(left) s left)"
}

if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here, nothing to settle (GPU_CHECK_SMOKE=1 runs the steps anyway, to check the script)"
  [[ -n "${GPU_CHECK_SMOKE:-}" ]] || exit 0
fi

{
  date -u
  nvidia-smi -L
  nvcc --version | tail -2
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.log"

if go build; then
  start=$(date +%s)
  # The lent machines' default g++ (/opt/gcc) links its own copy of libstdc++ into the
  # extension; torch uses the system's, and the two copies' locale facets crash the first
  # error message that formats a number (seen 2026-11-22: SIGSEGV in ostream<<size_t inside
  # TORCH_CHECK). The system compiler links the shared libstdc++ that torch uses.
  echo "compilers: CXX=${CXX:-unset} $(ls /usr/bin/ | grep -E '^(g\+\+|c\+\+|gcc)(-[0-9]+)?$' | tr '\n' ' ')"
  for c in /usr/bin/g++ /usr/bin/g++-13 /usr/bin/g++-14 /usr/bin/g++-12; do
    if [[ -x $c ]]; then export CXX=$c CC=${c/g++/gcc}; sys_cxx=1; break; fi
  done
  # No system compiler: link the system's shared libstdc++ ahead of the compiler's own.
  if [[ -z "${sys_cxx:-}" && -e /usr/lib/x86_64-linux-gnu/libstdc++.so.6 ]]; then
    export LDFLAGS="${LDFLAGS:-} -L/usr/lib/x86_64-linux-gnu -l:libstdc++.so.6"
  fi
  echo "building with CXX=${CXX:-default} LDFLAGS=${LDFLAGS:-}"
  # Only the GPU in hand (sm_90 for H100/H200) keeps the build short.
  cc=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
  LVOPT_CUDA_ARCHS=${LVOPT_CUDA_ARCHS:-$cc} MAX_JOBS=${MAX_JOBS:-16} timeout ${BUILD_S:-150} \
    $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
  # A private copy of libstdc++ inside the extension shows as local symbols of its internals.
  echo "private libstdc++ symbols in the extension: $(nm -C lvopt/_C*.so | grep -c read_utf8_code_point)"
  echo "build: $(( $(date +%s) - start )) s"
  $PY -c "import lvopt; print(lvopt.build_info())" 2>&1 | tee -a "$OUT/env.log"
fi

if has tests || has suite || has bench || has capture || has experiment || has profile; then
  # torch < 2.14's custom_op indexes the mutated optional arguments that a caller left out
  # (IndexError in adinplaceorview_impl for lvopt_triton ops called without found_inf/stats);
  # 2.14 (lvopt's pin) checks the index. Patch the lent machine's older torch the same way.
  co=$($PY -c "import torch._library.custom_ops as c; print(c.__file__)")
  sed -i 's/^\(\s*\)increment_version(args\[idx\])/\1if idx < len(args): increment_version(args[idx])/' "$co" 2>/dev/null || true
fi

if go tests; then
  # The files whose tests run only (or differently) on a GPU, each in its own process so that a
  # crash in one leaves the others' results; TESTS_S is shared among them.
  files=(${TEST_FILES:-tests/test_sparse_rows.py tests/test_sparse_rows_optimizer.py tests/test_cuda_capture.py \
      tests/test_fused_adamw.py tests/test_fused_adamh.py tests/test_sparse_capture.py \
      tests/test_capturable.py tests/test_triton_capturable.py tests/test_triton_fast_step.py tests/test_sync_free.py \
      tests/test_optim.py tests/test_bench.py})
  tests_end=$(( $(date +%s) + ${TESTS_S:-150} ))
  for f in "${files[@]}"; do
    [[ -e "$f" ]] || { echo "$f: absent"; continue; }
    budget=$(( tests_end - $(date +%s) ))
    (( budget > 5 )) || { echo "$f: skipped (TESTS_S spent)"; continue; }
    timeout $budget $PY -m pytest -v --tb=short -rfE -p no:cacheprovider "$f" \
      > "$OUT/pytest_$(basename "$f" .py).log" 2>&1
    echo "$f: rc=$? $(tail -1 "$OUT/pytest_$(basename "$f" .py).log")"
    grep -E "FAILED|ERROR|Fatal" "$OUT/pytest_$(basename "$f" .py).log" | head -20
  done
fi

if go suite; then
  timeout 540 $PY -m pytest -q -rfE -p no:cacheprovider -n 8 tests 2>&1 | tee "$OUT/pytest_suite.log" | tail -40
fi

if go bench; then
  # Every op against torch's, then the sparse-step claims as PASS/FAIL.
  timeout ${BENCH_S:-120} $PY benchmarks/bench_gpu.py --device cuda 2>&1 | tee "$OUT/bench_gpu.log"
fi

if go capture; then
  # The sparse step of the standard batch in a capturable group (exact history on the device)
  # eager vs replayed from a CUDA graph, both backends; Triton dense vs a device copy, a
  # captured GPT-2 step (CUDA graph) vs copy.
  if [[ -e benchmarks/bench_gpu_capture.py ]]; then
    timeout ${CAPTURE_S:-120} $PY benchmarks/bench_gpu_capture.py 2>&1 | tee "$OUT/bench_gpu_capture.log"
  else
    echo "capture: benchmarks/bench_gpu_capture.py absent"
  fi
fi

if go experiment; then
  # The LV-rule experiment as a language model; it streams runs.csv and stops at its budget.
  if [[ -e experiments/lv_rule/gpu_lm.py ]]; then
    budget=$(( $(left) - 20 ))
    (( budget > ${EXPERIMENT_S:-150} )) && budget=${EXPERIMENT_S:-150}
    OUT="${OUT%/logs}" timeout $(( budget + 30 )) $PY experiments/lv_rule/gpu_lm.py --budget-s "$budget" 2>&1 \
      | tee "$OUT/gpu_lm.log" | tail -30
  else
    echo "experiment: experiments/lv_rule/gpu_lm.py absent"
  fi
fi

if has sanitize; then
  # compute-sanitizer (memcheck, racecheck, initcheck, synccheck) over the CUDA test files.
  if [[ -e benchmarks/sanitize_gpu.sh ]]; then
    OUT="${OUT%/logs}" SANITIZE_TIMEOUT=${SANITIZE_S:-300} bash benchmarks/sanitize_gpu.sh 2>&1 | tee "$OUT/sanitize.log" | tail -20
  else
    echo "sanitize: benchmarks/sanitize_gpu.sh absent"
  fi
fi

if go profile; then
  # Host vs device time of the paths that miss their byte model (Triton AdamW on many tensors,
  # the sparse step); Chrome traces beside the log.
  timeout 240 $PY benchmarks/profile_gpu.py --device cuda --trace "$OUT/traces" 2>&1 | tee "$OUT/profile_gpu.log" | tail -12
fi
echo "gpu_check: $(( $(date +%s) - T0 )) s"
