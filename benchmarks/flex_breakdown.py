"""Where flex-fna's time goes on the large GPU problems: the flex kernel alone on prepared
(heads-first, layout-ordered) tensors, the gathers before it and the scatters after it, for the
row-major layout and tiled layouts (optionally with FlexAttention kernel options), plus the whole
natten call. Block counts (full / partial) show how much work each layout leaves.

    python3 benchmarks/flex_breakdown.py [--problems P2,P3] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import natten  # noqa: E402
from natten._checks import check_fused  # noqa: E402
from natten.backends import flex as fb  # noqa: E402
try:
    from natten.profiler.timing import measure  # noqa: E402
except ImportError:  # an in-place build (setup.py build_ext --inplace) maps no natten.profiler
    from profiler.timing import measure  # noqa: E402
from problems import PROBLEMS  # noqa: E402

# (label, query box, key box, kernel options); None boxes: row-major order.
TMA = {"USE_TMA": True}
VARIANTS = {
    "P2": [("row-major", None, None, None),
           ("row-major, TMA", None, None, TMA),
           ("tiled 8x16, kv 8x8", (8, 16), (8, 8), None),
           ("tiled 8x16, kv 8x8, TMA", (8, 16), (8, 8), TMA),
           ("tiled 8x16, kv 8x8, prescale", (8, 16), (8, 8), {"PRESCALE_QK": True}),
           ("tiled 8x16, kv 8x8, TMA, 4 stages", (8, 16), (8, 8), {**TMA, "num_stages": 4}),
           ("tiled 8x16, kv 8x16, TMA", (8, 16), (8, 16), TMA)],
    "P3": [("row-major", None, None, None),
           ("row-major, TMA", None, None, TMA),
           ("tiled 2x8x8", (2, 8, 8), (2, 8, 8), None),
           ("tiled 2x8x8, TMA", (2, 8, 8), (2, 8, 8), TMA),
           ("tiled 2x8x8, kv 2x4x8, TMA", (2, 8, 8), (2, 4, 8), TMA)],
}


def ms(fn, repeat):
    return statistics.median(measure(fn, torch.device("cuda"), 2, repeat)[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", default="P2,P3")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    for name in args.problems.split(","):
        p = PROBLEMS[name]
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(p.batch, *p.spatial, p.heads, p.dim, generator=gen).to("cuda", torch.bfloat16)
                   for _ in range(3))
        ones = (1,) * p.rank
        problem, _ = check_fused(p.rank, q, k, v, p.kernel, ones, p.per_axis("dilation", 1),
                                 (False,) * p.rank, None, None, None)
        scale = p.dim ** -0.5
        print(f"\n{p.describe()}")
        for label, qt, kt, options in VARIANTS[name]:
            layout = fb.get_layout(problem, qt, kt)
            bm = layout.block_mask
            full = int(bm.full_kv_num_blocks.sum()) if bm.full_kv_num_blocks is not None else 0
            part = int(bm.kv_num_blocks.sum())
            qf, kf, vf = fb._prepare(layout, q, k, v, None, None, 0)
            # the backend's options for these blocks, with the variant's on top
            kw = {**fb.kernel_options(q.device, q.dtype, qf.shape[-1], layout.block), **(options or {})}
            with torch.no_grad():
                try:
                    t_kernel = ms(lambda: fb.compiled_flex(qf, kf, vf, bm, scale, kw), args.repeat)
                except Exception as e:  # noqa: BLE001 - an option this torch cannot lower: a row, go on
                    print(f"  {label:28s} error: {type(e).__name__}: {' '.join(str(e).split())[:160]}", flush=True)
                    continue
                t_prep = ms(lambda: fb._prepare(layout, q, k, v, None, None, 0), args.repeat)
                out_f, lse_f = fb.run_flex(qf, kf, vf, bm, scale)
                t_finish = ms(lambda: fb._finish(layout, out_f, lse_f, p.spatial, p.dim), args.repeat)
                t_call = None
                if qt is not None and options is None:
                    t_call = ms(lambda: natten.na2d(q, k, v, p.kernel, backend="flex-fna", q_tile_shape=qt,
                                                    kv_tile_shape=kt) if p.rank == 2 else
                                natten.na3d(q, k, v, p.kernel, backend="flex-fna", q_tile_shape=qt,
                                            kv_tile_shape=kt), args.repeat)
            blocks = f"blocks {layout.block}: full {full}, partial {part}"
            print(f"  {label:28s} kernel {t_kernel:7.3f} ms  gathers {t_prep:6.3f}  scatters {t_finish:6.3f}"
                  f"  natten call {'-' if t_call is None else f'{t_call:7.3f}'}  {blocks}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
