"""flex-fna on many problem shapes in one process, forward and backward: every call must run
compiled FlexAttention kernels, never the unfused implementation that materialises the score
matrix (what torch runs once Dynamo gives up recompiling a function).

Per shape (float16, head dim 64: 1-D, 2-D and 3-D grids of 2-4K tokens, two batch/head pairs),
one forward and backward through `natten.na{1,2,3}d(..., backend="flex-fna")`, with
  * the output checked against the `reference` backend's (rel err below 1e-2), when it is built;
  * the peak of memory allocated during the call (over what was allocated before it) below 4x
    the bytes of its inputs, outputs and gradients: scores of one (batch, head) alone would take
    N^2 x 4 bytes, which is more;
  * torch's warning about the unfused implementation turned into an error.
Shapes share compiled kernels (sizes are symbolic): a signature (dtype, head dim, blocks, which
inputs need gradients) compiles once, whatever the grid.

    python3 benchmarks/flex_many_shapes.py [--shapes 100] [--dtype float16] [--dim 64]

Exit status 0 when every shape passes, 1 otherwise (each failure is reported on one line).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Iterator, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this source tree before any installed natten

import torch  # noqa: E402

import natten  # noqa: E402

MEMORY_FACTOR = 4.0
MAX_REL_ERR = 1e-2
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def shapes(count: int) -> Iterator[Tuple[int, int, Tuple[int, ...], int]]:
    """(batch, heads, grid, window) of `count` distinct problems: ranks 1-3 in turn, two (batch,
    heads) pairs, as in a job that trains at many resolutions, and grids that grow. Grids whose
    default boxes pad them little (at most 1.33x), so that the memory bound measures the
    kernels, not the padding."""
    seen = set()
    j = 0
    while len(seen) < count:
        rank, (batch, heads), m = j % 3 + 1, ((1, 2), (2, 4))[(j // 3) % 2], j // 6
        j += 1
        if rank == 1:
            grid = (2048 + 128 * (m % 17) + 64 * (m // 17),)
        elif rank == 2:
            grid = (40 + m % 13, 56 + (m // 13) % 7)
        else:
            grid = (16, 12 + m % 5, 13 + (m // 5) % 4)
        if (batch, heads, grid) not in seen:
            seen.add((batch, heads, grid))
            yield batch, heads, grid, (9, 7, 5)[rank - 1]


def _reference_available() -> bool:
    return "reference" in natten.backends.names_for_device("cuda")


def check_shape(batch: int, heads: int, grid: Tuple[int, ...], window: int, dtype: torch.dtype,
                dim: int, compare: bool) -> Optional[str]:
    """None when forward and backward of this problem pass; else why not, in one line."""
    op = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(grid)]
    gen = torch.Generator().manual_seed(len(grid) * 1000 + batch * 10 + heads)
    q, k, v, d_out = (torch.randn(batch, *grid, heads, dim, generator=gen).to("cuda", dtype) for _ in range(4))
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    # A first call compiles where this signature has not compiled yet; compiling allocates
    # scratch memory of its own (benchmarking candidate kernels), so the second call is measured.
    torch.autograd.grad(op(*leaves, kernel_size=window, backend="flex-fna"), leaves, d_out)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = op(*leaves, kernel_size=window, backend="flex-fna")
    grads = torch.autograd.grad(out, leaves, d_out)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    budget = MEMORY_FACTOR * sum(t.numel() * t.element_size() for t in (*leaves, out, *grads))
    if peak > budget:
        return f"peak {peak / 2**20:.1f} MiB over {MEMORY_FACTOR:g}x inputs, outputs and gradients ({budget / 2**20:.1f} MiB)"
    if not all(bool(torch.isfinite(t).all()) for t in (out, *grads)):
        return "non-finite output or gradient"
    if compare:
        with torch.no_grad():
            ref = op(q, k, v, kernel_size=window, backend="reference").double()
        err = float(torch.linalg.vector_norm(out.detach().double() - ref) / torch.linalg.vector_norm(ref))
        if err > MAX_REL_ERR:
            return f"output differs from the reference backend: rel err {err:.2e}"
    return None


def run_shapes(count: int, dtype: torch.dtype = torch.float16, dim: int = 64, log=print) -> List[str]:
    """Checks `count` shapes in this process; returns the failures, one line each."""
    from torch.nn.attention import flex_attention as fa

    compare = _reference_available()
    failures = []
    # torch warns once per process that flex_attention runs unfused; forget that it did, and make
    # the warning an error for these calls.
    fa._WARNINGS_SHOWN.discard("flex_attention_performance")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*flex_attention called without torch.compile")
        for n, (batch, heads, grid, window) in enumerate(shapes(count), 1):
            what = f"batch {batch} heads {heads} grid {'x'.join(map(str, grid))} window {window}"
            try:
                problem = check_shape(batch, heads, grid, window, dtype, dim, compare)
            except Exception as e:  # noqa: BLE001 - a failing shape is reported; the others go on
                problem = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            if problem is not None:
                failures.append(f"{what}: {problem}")
            log(f"[{n}/{count}] {what}: {'ok' if problem is None else 'FAIL ' + problem} "
                f"({time.perf_counter() - t0:.0f} s)")
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--shapes", type=int, default=100, help="number of shapes (default 100)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    ap.add_argument("--dim", type=int, default=64, help="head dim (default 64)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    os.environ.setdefault("NATTEN_QUIET", "1")
    from natten.backends import flex

    failures = run_shapes(args.shapes, DTYPES[args.dtype], args.dim)
    print(f"\n{len(flex._COMPILED)} compiled FlexAttention callables in this process "
          f"({len(flex._PER_SHAPE)} signatures compiled per shape)")
    print(f"{args.shapes - len(failures)} passed, {len(failures)} failed "
          f"({torch.cuda.get_device_name()}, torch {torch.__version__})")
    for line in failures:
        print(f"FAIL {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
