"""Per-kernel GPU time of one natten backend on benchmark problems (torch.profiler), next to the
host time of a whole call: tells kernel time from launch and Python overhead.

    python3 benchmarks/kernel_times.py [--problems P4,P5] [--backend cutlass-fna] [--backprop]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import natten  # noqa: E402
from problems import PROBLEMS  # noqa: E402


def report(p, args) -> None:
    """Host time per call and per-kernel GPU time of one problem."""
    na = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[p.rank]
    q, k, v, d_out = (torch.randn(p.batch, *p.spatial, p.heads, p.dim, device="cuda",
                                  dtype=torch.bfloat16) for _ in range(4))
    kw = dict(kernel_size=p.kernel, dilation=p.per_axis("dilation", 1), backend=args.backend)
    leaves = [t.requires_grad_(args.backprop) for t in (q, k, v)]

    def call():
        out = na(*leaves, **kw)
        if args.backprop:
            torch.autograd.grad(out, leaves, d_out)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.runs):
        call()
    host = (time.perf_counter() - t0) / args.runs * 1e3
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.runs * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.runs):
            call()
        torch.cuda.synchronize()
    print(f"\n{p.describe()}  {args.backend}{' fwd+bwd' if args.backprop else ' fwd'}: "
          f"host {host:.3f} ms/call (enqueue), wall {wall:.3f} ms/call")
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
        if e.device_time_total > 0:
            print(f"  {e.device_time_total / args.runs / 1e3:8.3f} ms/call  x{e.count // args.runs:<3d} "
                  f"{e.key[:110]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", default="P4,P5")
    ap.add_argument("--backend", default="cutlass-fna")
    ap.add_argument("--backprop", action="store_true")
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    failed = 0
    names = args.problems.split(",")
    for name in names:
        try:
            report(PROBLEMS[name], args)
        except Exception as e:  # noqa: BLE001 - a failing problem is one line; the others go on
            failed += 1
            print(f"\n{PROBLEMS[name].describe()}  {args.backend}: error: {type(e).__name__}: "
                  f"{' '.join(str(e).split())[:300]}")
    return 1 if failed == len(names) else 0


if __name__ == "__main__":
    sys.exit(main())
