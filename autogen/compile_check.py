"""python -m autogen.compile_check: compile CUDA instantiations with nvcc alone (no torch, no
GPU) for every target their family lists, so a machine without CUDA torch still proves the
kernels build.

By default one rank/dtype of every op of every CUDA family (the sm90 forward included);
--filter narrows or widens it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import time

from autogen import generate, registry

DEFAULT_FILTER = "reference:bfloat16:*:2,sm80:bfloat16:128:2,sm80:float32:128:2,sm90:bfloat16:128:2"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m autogen.compile_check", description=__doc__)
    parser.add_argument("--filter", default=DEFAULT_FILTER, help="family:dtype:head_dim:rank globs")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("NATTEN_N_WORKERS", os.cpu_count() or 1)))
    args = parser.parse_args()
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        # CI must prove the kernels build; elsewhere a machine without the toolkit skips it.
        required = os.environ.get("CI", "").lower() in ("1", "true")
        print(f"compile check: nvcc not found{'' if required else ', skipped'}", file=sys.stderr)
        return 1 if required else 0
    cutlass = registry.cutlass_include()
    if cutlass is None:
        print("compile check: nvidia-cutlass is not installed (pip install --no-deps nvidia-cutlass)",
              file=sys.stderr)
        return 1
    kernels = [k for k in registry.kernels(True, args.filter) if k.family.cuda]
    out_dir = generate.ROOT / "build" / "compile_check"
    out_dir.mkdir(parents=True, exist_ok=True)
    include = generate.ROOT / "cutlass_kernels"

    def compile_one(k):
        src = out_dir / f"{k.name}.cu"
        src.write_text(generate.instance(k))
        gencodes = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in k.family.archs]
        cmd = [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", *gencodes, f"-I{include}", f"-I{cutlass}",
               "-c", str(src), "-o", str(out_dir / f"{k.name}.o")]
        start = time.time()
        result = subprocess.run(cmd, capture_output=True, text=True)
        return k, result, time.time() - start

    failed = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for i, (k, result, seconds) in enumerate(pool.map(compile_one, kernels), 1):
            status = "ok" if result.returncode == 0 else "FAILED"
            targets = ", ".join(f"sm_{a}" for a in k.family.archs)
            print(f"[{i}/{len(kernels)}] {k.name} ({targets}): {status} in {seconds:.0f} s", flush=True)
            if result.returncode != 0 or result.stderr.strip():
                print(result.stderr, file=sys.stderr)
            failed += result.returncode != 0
    print(f"compile check: {len(kernels) - failed} passed, {failed} failed")
    return 1 if failed or not kernels else 0


if __name__ == "__main__":
    sys.exit(main())
