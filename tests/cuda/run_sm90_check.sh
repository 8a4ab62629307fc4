#!/usr/bin/env bash
# Builds one SM90 harness, tests/cuda/sm90_<which>_check.cu (which: forward or backward), into
# build/sm90_<which>_check/ and runs it with the remaining arguments (see the .cu file); with
# BUILD_ONLY=1 it only builds. The harness and its instantiations are the parts NATTEN_PART = 0, 1,
# ... of the one file (the highest part its instance list names), compiled in parallel. Needs nvcc
# 12.3+ and the nvidia-cutlass headers; running needs an SM90 GPU. Prints the ptxas resource report
# of the SM90 kernels (registers, spills; one line per instantiation) and warns about any spill.
# NATTEN_NVCC_FLAGS adds nvcc flags (e.g. -lineinfo for Nsight Compute's source view).
set -euo pipefail
which="${1:?usage: run_sm90_check.sh forward|backward [harness arguments]}"
shift
case "$which" in forward | backward) ;; *) echo "run_sm90_check.sh: forward or backward, not '$which'" >&2; exit 2 ;; esac
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="$root/build/sm90_${which}_check"
src="$root/tests/cuda/sm90_${which}_check.cu"
mkdir -p "$out"
rm -f "$out"/part*.o "$out"/part*.log
cutlass="${CUTLASS_INCLUDE:-$(python -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))")}"
flags=(-std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a
       -I"$root/cutlass_kernels" -I"$cutlass" -Xcompiler -fopenmp ${NATTEN_NVCC_FLAGS:-})
parts=$(grep -oE '^ +X\(([0-9]+),' "$src" | grep -oE '[0-9]+' | sort -n | tail -1)
pids=()
for part in $(seq 0 "$parts"); do
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
nvcc "${flags[@]}" "$out"/part*.o -o "$out/sm90_${which}_check"
report="$(grep -h -A3 "Compiling entry function '_ZN6natten4sm90" "$out"/part*.log |
  awk '/Compiling entry/ {name=$0; sub(/.*Compiling entry function ./, "", name); sub(/. for .sm_90a.*/, "", name)}
       /spill/ {spill=$0} /Used/ {print name ": " $0 " |" spill}')"
echo "$report"
if echo "$report" | grep -qv " 0 bytes spill stores, 0 bytes spill loads"; then
  echo "warning: register spills in an SM90 kernel (see benchmarks/NOTES.md)" >&2
fi
[ "${BUILD_ONLY:-0}" = 1 ] && exit 0
exec "$out/sm90_${which}_check" "$@"
