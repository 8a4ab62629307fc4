#!/usr/bin/env bash
# The measurements the open performance and tuning requirements are judged by, on a GPU machine
# with natten installed (`make install`), in one command; each step's whole output goes to
# OUT_DIR (default bench_out/), a summary line per step to the terminal. Steps (profiler, tuning,
# compile, bench by default, or those named):
#   suite     the whole test suite over processes sharing the GPU, kernel tests first (the group
#             "first"), then the rest; NATTEN_SUITE_GROUPS=rest runs only the second group
#   readme    every `python -m natten.profiler` line of the README, on the GPU
#   profiler  the README's first command, with and without --backprop (a row per backend)
#   tuning    --optimize --backprop on P2 and P3 into a fresh tuning cache, then a new process
#             with --backend auto (what backend=None runs), with NATTEN_LOG_LEVEL=debug
#   compile   the torch.compile tests on CUDA
#   flex      benchmarks/flex_many_shapes.py: flex-fna on 100 shapes in one process, never dense
#   bench     benchmarks/gpu_bench.py (every problem, peers in the same run), then P1-P3 under
#             torch.use_deterministic_algorithms
#   harness   the SM90 standalone harnesses (no torch; built unless build/sm90_*_check/ has them,
#             which a machine without a GPU can build): quick checks, then the timings of P1-P3
#             of every family they hold (the shipped kernels beside the variants being compared)
#   sanitize  `make sanitize`: compute-sanitizer's memcheck over a subset of the CUDA tests
#   ncu       Nsight Compute's full set, with source lines, of one SM90 backward launch of P1 (the
#             harness rebuilt with -lineinfo), and its per-line table as CSV
#     bash benchmarks/gpu_acceptance.sh [OUT_DIR] [STEP...]
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-bench_out}" && cd "${1:-bench_out}" && pwd)"
shift || true
steps="${*:-profiler tuning compile bench}"
export PYTHONUNBUFFERED=1
step() { echo "== $1 ($SECONDS s so far)"; }

for s in $steps; do
  case "$s" in
  suite)
    step suite
    # The kernel tests first, so that a call cut short by a time limit has run those.
    kernel="test_cuda_tiled.py test_cuda_fused.py test_query_range.py test_gpu_sweep.py test_backends_loaded.py"
    first=$(for f in $kernel; do printf '%s ' "$root/tests/$f"; done)
    rest=$(ls "$root"/tests/test_*.py | grep -vE "$(echo $kernel | tr ' ' '|')" | tr '\n' ' ')
    xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${NATTEN_TEST_WORKERS:-14}")
    for group in ${NATTEN_SUITE_GROUPS:-first rest}; do
      python3 -m pytest $xdist -q -p no:cacheprovider -rfE ${!group} > "$out/suite_$group.log" 2>&1
      echo "suite ($group) rc=$?"; tail -n 2 "$out/suite_$group.log"
    done ;;
  readme)
    step readme
    # Its --optimize lines write a tuning cache of their own, not the user's.
    export NATTEN_TUNE_CACHE="$out/readme_tuning.json"
    : > "$out/readme.log"
    grep -oE '^python -m natten\.profiler[^#]*' "$root/README.md" | while read -r cmd; do
      (cd /tmp && ${cmd/python/python3}) >> "$out/readme.log" 2>&1
      echo "rc=$? $cmd"
    done
    unset NATTEN_TUNE_CACHE ;;
  profiler)
    step profiler
    (cd /tmp && python3 -m natten.profiler && python3 -m natten.profiler --backprop) > "$out/profiler.log" 2>&1
    echo "profiler rc=$?"; grep -E "^(hopper-fna|cutlass-fna|flex-fna|reference|cpu) |^skipped|error" "$out/profiler.log" ;;
  tuning)
    step tuning
    export NATTEN_TUNE_CACHE="$out/tuning.json"
    rm -f "$NATTEN_TUNE_CACHE"
    for p in "-i 128 128 -k 32" "-i 16 64 64 -k 8 16 16"; do
      args="$p -b 1 -n 16 -d 128 --dtype bfloat16 --backprop"
      start=$SECONDS
      (cd /tmp && python3 -m natten.profiler $args --optimize) > "$out/optimize.log" 2>&1
      echo "optimize $p: rc=$? in $((SECONDS - start)) s"; grep -E "^winner|^without" "$out/optimize.log"
      cat "$out/optimize.log" >> "$out/tuning.log"
      (cd /tmp && NATTEN_LOG_LEVEL=debug python3 -m natten.profiler $args --backend auto) > "$out/auto.log" 2>&1
      echo "auto $p: rc=$?"; grep -E "^auto|cache" "$out/auto.log" | head -6
      cat "$out/auto.log" >> "$out/tuning.log"
    done
    rm -f "$out/optimize.log" "$out/auto.log"
    unset NATTEN_TUNE_CACHE ;;
  compile)
    step compile
    xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
    python3 -m pytest $xdist -p no:cacheprovider -rfE "$root/tests/test_compile.py" -k cuda > "$out/compile.log" 2>&1
    echo "compile rc=$?"; tail -n 3 "$out/compile.log" ;;
  flex)
    step flex
    python3 "$root/benchmarks/flex_many_shapes.py" --shapes 100 > "$out/flex_shapes.log" 2>&1
    echo "flex rc=$?"; tail -n 3 "$out/flex_shapes.log" ;;
  bench)
    step bench
    python3 "$root/benchmarks/gpu_bench.py" --json "$out/bench.json" > "$out/bench.log" 2>&1
    echo "bench rc=$?"; tail -n 45 "$out/bench.log"
    # The backwards of torch.use_deterministic_algorithms(True), hopper-fna's deterministic path
    # against cutlass-fna.
    python3 "$root/benchmarks/gpu_bench.py" --problems P1,P2,P3 --backends hopper-fna,cutlass-fna --no-peers \
      --deterministic --json "$out/bench_deterministic.json" > "$out/bench_deterministic.log" 2>&1
    echo "bench (deterministic) rc=$?"; tail -n 15 "$out/bench_deterministic.log" ;;
  harness)
    step harness
    for which in forward backward; do
      bin="$root/build/sm90_${which}_check/sm90_${which}_check"
      # A binary built elsewhere is rebuilt here when this machine lacks a library it needs.
      if [ ! -x "$bin" ] || ldd "$bin" 2>&1 | grep -q "not found"; then
        BUILD_ONLY=1 bash "$root/tests/cuda/run_sm90_check.sh" $which > "$out/harness_$which.log" 2>&1
      fi
      "$bin" --checks --quick >> "$out/harness_$which.log" 2>&1
      echo "harness $which checks rc=$?"; tail -n 1 "$out/harness_$which.log"
      "$bin" --timings >> "$out/harness_$which.log" 2>&1
      echo "harness $which timings rc=$?"; grep -E "^P[123] " "$out/harness_$which.log"
    done ;;
  sanitize)
    step sanitize
    make -C "$root" sanitize PYTHON=python3 > "$out/sanitize.log" 2>&1
    echo "sanitize rc=$?"; grep -E "ERROR SUMMARY|passed|failed" "$out/sanitize.log" | tail -n 8 ;;
  ncu)
    step ncu
    # The harness's first timed launch is P1 of its first instance (1-D, bf16, head dim 128). The
    # source view needs the harness built with NATTEN_NVCC_FLAGS=-lineinfo (built here if absent).
    bin="$root/build/sm90_backward_check/sm90_backward_check"
    if [ ! -x "$bin" ] || ldd "$bin" 2>&1 | grep -q "not found"; then
      NATTEN_NVCC_FLAGS=-lineinfo BUILD_ONLY=1 bash "$root/tests/cuda/run_sm90_check.sh" backward > "$out/ncu.log" 2>&1
    fi
    ncu --set full --import-source yes -k regex:fna_backward_kernel -c 1 -f -o "$out/p1_backward" \
      "$bin" --timings --family sm90 >> "$out/ncu.log" 2>&1
    echo "ncu rc=$?"
    ncu -i "$out/p1_backward.ncu-rep" --page details > "$out/p1_backward_details.txt" 2>&1
    ncu -i "$out/p1_backward.ncu-rep" --page source --csv --print-source sass > "$out/p1_backward_source.csv" 2>&1
    grep -E "Duration|Registers|Achieved Occupancy|Eligible|Issued Warp|No Eligible" "$out/p1_backward_details.txt" | head -12 ;;
  *) echo "unknown step '$s' (suite, readme, profiler, tuning, compile, flex, bench, harness, sanitize, ncu)" >&2; exit 2 ;;
  esac
done
step done
