"""A few calls of one natten backend on one benchmark problem and nothing else: the target
to run under a GPU profiler (ncu, nsys, compute-sanitizer).

    ncu --kernel-name regex:fna_forward --launch-skip 2 --launch-count 1 \\
        python3 benchmarks/one_call.py P4 [--backprop] [--backend cutlass-fna] [--calls 3]
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import natten  # noqa: E402
from problems import PROBLEMS  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("problem", choices=sorted(PROBLEMS))
    ap.add_argument("--backend", default="cutlass-fna")
    ap.add_argument("--backprop", action="store_true")
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args()
    p = PROBLEMS[args.problem]
    na = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[p.rank]
    gen = torch.Generator().manual_seed(0)
    q, k, v, d_out = (torch.randn(p.batch, *p.spatial, p.heads, p.dim, generator=gen)
                      .to("cuda", torch.bfloat16) for _ in range(4))
    leaves = [t.requires_grad_(args.backprop) for t in (q, k, v)]
    for _ in range(args.calls):
        out = na(*leaves, kernel_size=p.kernel, dilation=p.per_axis("dilation", 1), backend=args.backend)
        if args.backprop:
            torch.autograd.grad(out, leaves, d_out)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
