#!/usr/bin/env bash
# Builds tests/cuda/sm90_forward_check.cu (the harness and its instantiations, in parallel) into
# build/sm90_forward_check/ and runs it with the given arguments (see the .cu file); with
# BUILD_ONLY=1 it only builds. Needs nvcc 12.3+ and the nvidia-cutlass headers; running needs an
# SM90 GPU.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="$root/build/sm90_forward_check"
mkdir -p "$out"
cutlass="${CUTLASS_INCLUDE:-$(python -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))")}"
flags=(-std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a
       -I"$root/cutlass_kernels" -I"$cutlass" -Xcompiler -fopenmp)
src="$root/tests/cuda/sm90_forward_check.cu"
pids=()
for part in 0 1 2 3 4 5 6; do
  nvcc "${flags[@]}" -DNATTEN_PART=$part -Xptxas -v -c "$src" -o "$out/part$part.o" \
    > "$out/part$part.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "part $i failed:" >&2
    cat "$out/part$i.log" >&2
    status=1
  fi
done
[ $status -eq 0 ] || exit $status
nvcc "${flags[@]}" "$out"/part*.o -o "$out/sm90_forward_check"
# Resource report of the kernels: registers, spills, shared memory.
grep -h -A3 "Compiling entry function '_ZN6natten4sm90" "$out"/part*.log | grep -E "registers|spill" || true
[ "${BUILD_ONLY:-0}" = 1 ] && exit 0
exec "$out/sm90_forward_check" "$@"
