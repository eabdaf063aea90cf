#!/usr/bin/env bash
# The CUDA test files under NVIDIA compute-sanitizer: memcheck (out-of-bounds and misaligned
# accesses), racecheck (shared-memory hazards), initcheck (reads of uninitialised global
# memory), synccheck (invalid __syncthreads / barrier use). On a GPU machine with a CUDA build
# of lvopt (benchmarks/gpu_check.sh build):
#
#     bash benchmarks/sanitize_gpu.sh [memcheck] [racecheck] [initcheck] [synccheck]   (default: all four)
#
# Each tool's log (sanitizer report and pytest output, one pair per test file) and a one-line
# summary per tool go to "${OUT:-gpu-out}/sanitizer/" (summary.txt). Exit status: 0 when every
# tool ran and reported no error, or when there is nothing to run on (no GPU, no
# compute-sanitizer, no CUDA build: the reason is printed and written to summary.txt); 1 when a
# tool reported errors or its report has no summary line (a crash or a timeout).
#
# Settings (environment):
#   SANITIZE_FILES     test files (default: tests/test_fused_adamw.py tests/test_fused_adamh.py
#                      tests/test_sparse_rows.py tests/test_sparse_rows_optimizer.py; their CPU and
#                      Triton cases run too, outside the kernel filter)
#   SANITIZE_KERNELS   kernel-name substring to instrument (default: lvopt, i.e. lvopt's own
#                      kernels; empty: every kernel, torch's included, much slower)
#   SANITIZE_TIMEOUT   seconds per tool and file (default 300; the tools slow kernels 10-100x)
#   PYTEST_ARGS        extra pytest arguments, e.g. "-k adamw"
#   COMPUTE_SANITIZER  the executable (default: compute-sanitizer on PATH, else under CUDA_HOME
#                      or /usr/local/cuda)
#   PY                 python (default python3)
#   SANITIZE_NO_GPU_CHECK=1  skip the GPU and build checks (only to test this script's report
#                      parsing with a stand-in compute-sanitizer on a machine without a GPU)
set -u -o pipefail
OUT_DIR=${OUT:-gpu-out}/sanitizer
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
PY=${PY:-python3}
TOOLS=${*:-memcheck racecheck initcheck synccheck}
FILES=${SANITIZE_FILES:-tests/test_fused_adamw.py tests/test_fused_adamh.py tests/test_sparse_rows.py tests/test_sparse_rows_optimizer.py}
KERNELS=${SANITIZE_KERNELS-lvopt}
TIMEOUT=${SANITIZE_TIMEOUT:-300}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Without torch's caching allocator every tensor is its own allocation, so that memcheck sees
# an access past a tensor's end instead of landing in a neighbour inside one cached block.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1

say() { echo "sanitize_gpu: $*" | tee -a "$SUMMARY"; }

for t in $TOOLS; do
  case $t in memcheck|racecheck|initcheck|synccheck) ;;
    *) say "unknown tool '$t' (memcheck, racecheck, initcheck, synccheck)"; exit 2 ;;
  esac
done

CS=${COMPUTE_SANITIZER:-}
if [[ -z $CS ]]; then
  for c in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
      /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    if [[ -n $c && -x $c ]]; then CS=$c; break; fi
  done
fi

if [[ ${SANITIZE_NO_GPU_CHECK:-0} != 1 ]]; then
  if ! gpu=$($PY -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())" 2>/dev/null); then
    say "no GPU (torch.cuda.is_available() is False): nothing to sanitize, skipped"
    exit 0
  fi
fi
if [[ -z $CS ]]; then
  say "no compute-sanitizer found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin; or set COMPUTE_SANITIZER): skipped"
  exit 0
fi
if [[ ${SANITIZE_NO_GPU_CHECK:-0} != 1 ]]; then
  if ! $PY -c "import lvopt, sys; sys.exit(lvopt.build_info()['backends']['cuda'] != 'available')" 2>/dev/null; then
    say "lvopt has no usable CUDA build here (lvopt.build_info()['backends']['cuda']); build it first: bash benchmarks/gpu_check.sh build"
    exit 0
  fi
  echo "sanitize_gpu: $gpu, $("$CS" --version 2>/dev/null | tail -1)" | tee -a "$SUMMARY"
fi

# Errors in one compute-sanitizer report: the sum over its "ERROR SUMMARY: N error(s)" lines
# (one per process); empty when there is none (the run crashed or timed out).
errors_in() {
  grep -aoE 'ERROR SUMMARY: [0-9]+ error' "$1" 2>/dev/null | awk '{n += $3; found = 1} END {if (found) print n}'
}
# racecheck also counts hazards it classed as warnings: "RACECHECK SUMMARY: N hazards
# displayed (E errors, W warnings)".
warnings_in() {
  grep -aoE 'RACECHECK SUMMARY: .*\(([0-9]+) errors?, ([0-9]+) warnings?\)' "$1" 2>/dev/null |
    sed -E 's/.*, ([0-9]+) warnings?\)/\1/' | awk '{n += $1} END {if (NR) print n}'
}

status=0
filter=()
[[ -n $KERNELS ]] && filter=(--kernel-name "kns=$KERNELS")
for tool in $TOOLS; do
  total=0 missing=0 parts=()
  extra=()
  [[ $tool == racecheck ]] && extra=(--racecheck-report all)
  for f in $FILES; do
    name=$(basename "$f" .py)
    log="$OUT_DIR/${tool}_${name}.log"
    timeout "$TIMEOUT" "$CS" --tool "$tool" "${filter[@]}" "${extra[@]}" --target-processes all \
      --log-file "$log" $PY -m pytest -q -rfE -p no:cacheprovider ${PYTEST_ARGS:-} "$f" \
      > "$OUT_DIR/${tool}_${name}.pytest.log" 2>&1
    rc=$?
    tests=$(grep -aE '(passed|failed|skipped|error)' "$OUT_DIR/${tool}_${name}.pytest.log" | tail -1 |
      sed -E 's/=+//g; s/^ +//; s/ +$//')
    n=$(errors_in "$log")
    if [[ -z $n ]]; then
      missing=$((missing + 1))
      parts+=("$name: no ERROR SUMMARY in the report (rc=$rc$([[ $rc == 124 ]] && echo ", timed out after ${TIMEOUT}s"))")
    else
      total=$((total + n))
      w=$(warnings_in "$log")
      parts+=("$name: $n errors${w:+, $w warnings}, pytest rc=$rc (${tests:-no summary})")
    fi
  done
  line="$tool: $total errors"
  ((missing)) && line+=" + $missing reports without a summary"
  line+=" [kernels: ${KERNELS:-all}] -- $(IFS=';'; echo "${parts[*]}" | sed 's/;/; /g')"
  echo "$line" | tee -a "$SUMMARY"
  if ((total > 0 || missing > 0)); then status=1; fi
done
echo "sanitize_gpu: logs in $OUT_DIR" >&2
exit $status
