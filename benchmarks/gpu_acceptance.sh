#!/usr/bin/env bash
# The measurements the open performance and tuning requirements are judged by, on a GPU machine
# with natten installed (`make install`), in one command; each step's whole output goes to
# OUT_DIR (default bench_out/), a summary line per step to the terminal. Steps (all by default,
# or those named): profiler, tuning, compile, bench.
#   profiler  the README's first command, with and without --backprop (a row per backend)
#   tuning    --optimize --backprop on P2 and P3 into a fresh tuning cache, then a new process
#             with --backend auto (what backend=None runs), with NATTEN_LOG_LEVEL=debug
#   compile   the torch.compile tests on CUDA
#   bench     benchmarks/gpu_bench.py (every problem, peers in the same run)
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
  bench)
    step bench
    python3 "$root/benchmarks/gpu_bench.py" --json "$out/bench.json" > "$out/bench.log" 2>&1
    echo "bench rc=$?"; tail -n 45 "$out/bench.log" ;;
  *) echo "unknown step '$s' (profiler, tuning, compile, bench)" >&2; exit 2 ;;
  esac
done
step done
