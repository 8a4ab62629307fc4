#!/usr/bin/env bash
# Builds tests/cuda/sm90_backward_check.cu (the harness and its instantiations, in parallel) into
# build/sm90_backward_check/ and runs it with the given arguments (see the .cu file); with
# BUILD_ONLY=1 it only builds. Needs nvcc 12.3+ and the nvidia-cutlass headers; running needs an
# SM90 GPU. Prints the ptxas resource report of the SM90 backward kernels (registers, spills,
# shared memory is BackwardSmem: see benchmarks/NOTES.md) and warns about any spill.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="$root/build/sm90_backward_check"
mkdir -p "$out"
cutlass="${CUTLASS_INCLUDE:-$(python -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))")}"
flags=(-std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a
       -I"$root/cutlass_kernels" -I"$cutlass" -Xcompiler -fopenmp)
src="$root/tests/cuda/sm90_backward_check.cu"
pids=()
for part in 0 1 2 3 4 5; do
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
nvcc "${flags[@]}" "$out"/part*.o -o "$out/sm90_backward_check"
# Resource report of the main kernels: one line per instantiation.
report="$(grep -h -A3 "Compiling entry function '_ZN6natten4sm9019fna_backward_kernel" "$out"/part*.log |
  awk '/Compiling entry/ {name=$0; sub(/.*BackwardConfigILi/, "", name); sub(/EEEEEEEv.*/, "", name)}
       /spill/ {spill=$0} /Used/ {print name ": " $0 " |" spill}')"
echo "$report"
if echo "$report" | grep -qv " 0 bytes spill stores, 0 bytes spill loads"; then
  echo "warning: register spills in an SM90 backward kernel (see benchmarks/NOTES.md)" >&2
fi
[ "${BUILD_ONLY:-0}" = 1 ] && exit 0
exec "$out/sm90_backward_check" "$@"
