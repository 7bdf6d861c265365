#!/usr/bin/env bash
# One GPU session on the GPU machine, over a dist/ built by scripts/build_gpu_dist.sh:
# GPU tests (--ignored), `kiln bench`, the PyTorch baselines in the same run, and the
# side-by-side table. Writes logs and JSON under $OUT; prints the table last.
#
# KILN_GPU_TESTS (test binary names, space-separated; default all of dist/tests, "" for none)
# and KILN_TEST_SKIP (a libtest --skip filter) narrow the tests when device time is short;
# KILN_BENCH_SUITES (default gemm, "" for none) picks the benches.
# KILN_SANITIZE (compute-sanitizer tools, e.g. "memcheck racecheck initcheck"; default none)
# runs the chosen tests again under each tool, and each tool's ERROR SUMMARY goes to
# sanitizer.txt. The real-model test reads KILN_SMOLLM2_GGUF and KILN_SMOLLM2_REFERENCE
# (see tests/real_model.rs), passed on from the environment.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/kiln-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
status=0
tests=${KILN_GPU_TESTS-$(ls dist/tests)}
skip=()
[ -n "${KILN_TEST_SKIP:-}" ] && skip=(--skip "$KILN_TEST_SKIP")
for name in $tests; do
  t=dist/tests/$name
  echo "== $t"
  if ! "$t" --ignored --test-threads=1 --nocapture "${skip[@]}" >"$out/$(basename "$t").log" 2>&1; then
    status=1
    echo "FAILED: $t (see $(basename "$t").log)"
  fi
  grep -E "^test |test result" "$out/$(basename "$t").log" | grep -v "ok$" || true
  grep -E "test result" "$out/$(basename "$t").log"
done
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in ${KILN_SANITIZE:-}; do
  for name in $tests; do
    t=dist/tests/$name
    log="$out/sanitize_${tool}_$name.log"
    "$sanitizer" --tool "$tool" --error-exitcode 86 --print-limit 20 \
      "$t" --ignored --test-threads=1 "${skip[@]}" >"$log" 2>&1
    code=$?
    summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | sort | uniq -c | tr -s ' ' | paste -sd ';' -)
    echo "$tool $name exit=$code ${summary:-no summary}" | tee -a "$out/sanitizer.txt"
    [ "$code" -eq 0 ] || status=1
  done
done
for suite in ${KILN_BENCH_SUITES-gemm}; do
  dist/kiln bench "$suite" --json "$out/kiln_$suite.json" >"$out/kiln_$suite.txt" 2>&1 || { status=1; tail -5 "$out/kiln_$suite.txt"; }
  python3 bench/torch_baselines.py --suite "$suite" --out "$out/torch_$suite.json" >"$out/torch_$suite.txt" 2>&1 || { status=1; tail -5 "$out/torch_$suite.txt"; }
  python3 bench/compare.py "$out/kiln_$suite.json" "$out/torch_$suite.json" | tee "$out/table_$suite.md"
done
# At most 8 files come back from the GPU machine: fold the logs into one.
for f in "$out"/*.log "$out"/*.txt; do
  [ -f "$f" ] || continue
  echo "===== $(basename "$f")" >>"$out/all_logs.txt.tmp"
  cat "$f" >>"$out/all_logs.txt.tmp"
  rm -f "$f"
done
mv "$out/all_logs.txt.tmp" "$out/logs.txt"
exit $status
