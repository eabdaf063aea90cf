#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool; see benchmarks/RESULTS.md "GPU runs"):
# build lvopt's CUDA kernels for that GPU, run the tests that need a GPU (CUDA ops, Triton ops
# compiled for the GPU rather than interpreted, the optimizer on CUDA parameters), then the GPU
# benchmark. Logs land in $OUT (or ./gpu-out) so that they come back with the call.
#
#     bash benchmarks/gpu_check.sh [build] [tests] [suite] [bench] [profile]
#                                                      (default: build tests bench)
#
# The machine's own python3 (with its torch and triton) is used; nothing is installed. Logs go
# to $OUT/logs; through the device tool, where at most 8 files come back, end the command with
# `cd $OUT && tar czf logs.tgz logs && rm -rf logs`.
set -u -o pipefail
OUT=${OUT:-gpu-out}/logs
mkdir -p "$OUT"
PY=${PY:-python3}
steps=${*:-build tests bench}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

has() { [[ " $steps " == *" $1 "* ]]; }

{
  date -u
  nvidia-smi -L
  nvcc --version | tail -2
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.log"

if has build; then
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
  LVOPT_CUDA_ARCHS=${LVOPT_CUDA_ARCHS:-$cc} MAX_JOBS=${MAX_JOBS:-16} \
    $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
  # A private copy of libstdc++ inside the extension shows as local symbols of its internals.
  echo "private libstdc++ symbols in the extension: $(nm -C lvopt/_C*.so | grep -c read_utf8_code_point)"
  echo "build: $(( $(date +%s) - start )) s"
  $PY -c "import lvopt; print(lvopt.build_info())" 2>&1 | tee -a "$OUT/env.log"
fi

if has tests || has suite || has bench || has profile; then
  # torch < 2.14's custom_op indexes the mutated optional arguments that a caller left out
  # (IndexError in adinplaceorview_impl for lvopt_triton ops called without found_inf/stats);
  # 2.14 (lvopt's pin) checks the index. Patch the lent machine's older torch the same way.
  co=$($PY -c "import torch._library.custom_ops as c; print(c.__file__)")
  sed -i 's/^\(\s*\)increment_version(args\[idx\])/\1if idx < len(args): increment_version(args[idx])/' "$co" 2>/dev/null || true
fi

if has tests; then
  # The files whose tests run only (or differently) on a GPU, each in its own process so that a
  # crash in one leaves the others' results.
  for f in ${TEST_FILES:-tests/test_cuda_kernels.py tests/test_cuda_sparse_rows.py \
      tests/test_triton_fused_adamw.py tests/test_triton_fused_adamh.py \
      tests/test_triton_sparse_rows.py tests/test_sync_free.py tests/test_optim.py tests/test_bench.py}; do
    timeout ${TEST_TIMEOUT:-150} $PY -m pytest -v --tb=short -rfE -p no:cacheprovider "$f" \
      > "$OUT/pytest_$(basename "$f" .py).log" 2>&1
    echo "$f: rc=$? $(tail -1 "$OUT/pytest_$(basename "$f" .py).log")"
    grep -E "FAILED|ERROR|Fatal" "$OUT/pytest_$(basename "$f" .py).log" | head -20
  done
fi

if has suite; then
  timeout 540 $PY -m pytest -q -rfE -p no:cacheprovider -n 8 tests 2>&1 | tee "$OUT/pytest_suite.log" | tail -40
fi

if has bench; then
  timeout 200 $PY benchmarks/bench_gpu.py --device cuda 2>&1 | tee "$OUT/bench_gpu.log"
fi

if has profile; then
  # Host vs device time of the paths that miss their byte model (Triton AdamW on many tensors,
  # the sparse step); Chrome traces beside the log.
  timeout 240 $PY benchmarks/profile_gpu.py --device cuda --trace "$OUT/traces" 2>&1 | tee "$OUT/profile_gpu.log" | tail -12
fi
