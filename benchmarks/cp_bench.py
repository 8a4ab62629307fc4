"""Context-parallel benchmark: natten.distributed (halo exchange) on N GPUs against one GPU
and against gathering the whole K/V, forward and forward+backward.

For each problem (a video grid grown along time, window 8x16x16, bfloat16, 16 heads of dim
128, batch 1; the grid is sharded along time in equal slabs) it times, in the same run:

* ``1 GPU``: ``natten.na3d`` on the whole grid, on rank 0 alone;
* ``halo``: ``natten.distributed.na3d`` on every rank's slab (halo rows by point-to-point
  messages, their gradients sent back; the rows that need no halo computed while it travels);
* ``halo, serial``: the same with that overlap off (the exchange, then every row);
* ``all-gather``: every rank gathers the whole K/V (``torch.distributed.nn`` all_gather,
  reduce-scatter in the backward) and runs the same local call as ``halo`` on it, so the two
  differ only in what they move.

A multi-rank time is the slowest rank's median (ranks start each run together after a
barrier). "MB/step" is what the busiest rank receives in the forward plus what it returns in
the backward (K and V rows). "bound" is the best speed-up the local calls allow: the whole
grid's rows over the most rows a rank computes (its own where the backend computes a query
range, else its own plus the halo rows, whose queries are then computed and discarded).
"rel err" compares each rank's slab of the output with the one-GPU call on the whole grid
(same backend, same dtype). Errors become rows; process groups carry a timeout, so
a failing rank cannot leave the others waiting forever.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 benchmarks/cp_bench.py
        [--problems 32x64x64,64x64x64] [--backend NAME] [--warmup N] [--repeat N] [--json PATH]
    torchrun --nproc-per-node 2 benchmarks/cp_bench.py --device cpu --tiny   # smoke run, gloo
"""

from __future__ import annotations

import os

# NVLink multicast (NVLS) stays off: set before NCCL reads its environment.
os.environ["NCCL_NVLS_ENABLE"] = "0"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from datetime import timedelta  # noqa: E402
from typing import Callable, Dict, List  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this source tree before any installed natten

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.nn.functional as dist_nn  # noqa: E402

import natten  # noqa: E402
import natten.distributed as nd  # noqa: E402
from natten.functional import _query_range_na  # noqa: E402

SHARD_DIM = 0  # time
# torch.distributed.nn's all_gather is the documented autograd-aware one; its successor is private.
warnings.filterwarnings("ignore", message=".*all_gather is deprecated")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", default=None, help="comma-separated T x H x W grids (default 32x64x64,64x64x64)")
    p.add_argument("--kernel", default="8x16x16")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--backend", default=None, help="natten backend of every local call (default: natten's choice)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="8x8x8 grid, window 3x3x3, 2 heads of 16, float32")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--timeout", type=float, default=300.0, help="process-group timeout, seconds")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.kernel, args.heads, args.dim, args.dtype = "3x3x3", 2, 16, "float32"
    if args.problems is None:
        args.problems = "8x8x8" if args.tiny else "32x64x64,64x64x64"
    return args


def grid(text: str):
    return tuple(int(x) for x in text.lower().split("x"))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int,
            together: bool) -> float:
    """Median wall time of fn after warm-up; with ``together`` every run starts after a
    barrier of the group."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if together:
            dist.barrier()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return (torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref)).item()


def slab_rows(extents, kernel, stride, dilation, causal):
    """(rows of the busiest local call, K/V rows the busiest rank receives)."""
    slabs = nd._slabs(tuple(extents), kernel, stride, dilation, causal)
    received = [sum(stop - start for start, stop in row) for row in nd._routes(tuple(extents), slabs)]
    return max(b - a for a, b in slabs), max(received), slabs


def run_problem(spatial, args, device, dtype, me: int, world: int) -> List[dict]:
    kernel = grid(args.kernel)
    axis = 1 + SHARD_DIM
    total = spatial[SHARD_DIM]
    base = dict(problem="x".join(map(str, spatial)), kernel=args.kernel, gpus=world)
    rows: List[dict] = []
    extents = [total // world + (1 if j < total % world else 0) for j in range(world)]
    lo, n = sum(extents[:me]), extents[me]

    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, *spatial, args.heads, args.dim)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(3))
    d_out = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    token_bytes = args.heads * args.dim * torch.empty((), dtype=dtype).element_size()
    row_bytes = 2 * args.batch * math.prod(spatial) // total * token_bytes  # K and V

    def leaves(t, narrow=True):
        return (t.narrow(axis, lo, n) if narrow else t).detach().clone().requires_grad_(True)

    # One GPU: the whole grid on rank 0.
    row = dict(base, method="1 GPU", gpus=1)
    if me == 0:
        try:
            full = [leaves(t, narrow=False) for t in (q, k, v)]
            call = lambda: natten.na3d(*full, kernel, backend=args.backend)  # noqa: E731
            ref = call().detach()
            row["fwd_ms"] = time_ms(call, device, args.warmup, args.repeat, together=False)
            row["step_ms"] = time_ms(lambda: torch.autograd.grad(call(), full, d_out), device,
                                     args.warmup, args.repeat, together=False)
            del full
        except Exception as exc:  # noqa: BLE001 - a failing method becomes a row
            row["error"] = f"{type(exc).__name__}: {exc}"
            ref = None
    rows.append(row)
    dist.barrier()
    # Every rank needs the whole-grid output for its check; rank 0 has it.
    have_ref = torch.tensor([0 if me != 0 else int(ref is not None)], device=device)
    dist.broadcast(have_ref, 0)
    ref_slab = None
    if have_ref.item():
        whole = ref if me == 0 else torch.empty(shape, device=device, dtype=dtype)
        dist.broadcast(whole, 0)
        ref_slab = whole.narrow(axis, lo, n).clone()
        del whole
    ref = None

    try:
        longest, halo_rows, slabs = slab_rows(extents, kernel[SHARD_DIM], 1, 1, False)
    except ValueError as exc:  # the same on every rank: nobody waits
        return rows + [dict(base, method=m, error=str(exc))
                       for m in ("halo", "halo, serial", "all-gather")]
    a, b = slabs[me]
    g_slab = d_out.narrow(axis, lo, n).contiguous()
    local = [leaves(t) for t in (q, k, v)]

    def zero_rows(count):
        size = list(local[0].shape)
        size[axis] = count
        return local[0].new_zeros(size)

    def halo():
        return nd.na3d(*local, kernel, shard_dim=SHARD_DIM, backend=args.backend)

    def halo_serial():  # the exchange first, then every row's attention
        nd._OVERLAP = False
        try:
            return halo()
        finally:
            nd._OVERLAP = True

    # The same local call as natten.distributed makes: only the owned queries where the backend
    # computes a query range, else the slab plus halo with zero query rows, sliced.
    ranged = nd._query_range_backend(3, local[0], k.narrow(axis, a, b - a), v.narrow(axis, a, b - a),
                                     kernel, 1, 1, False, None, None, None, SHARD_DIM, lo - a,
                                     args.backend) is not None

    def gathered():
        parts = [torch.cat(dist_nn.all_gather(t), dim=axis).narrow(axis, a, b - a) for t in local[1:]]
        if ranged:
            return _query_range_na(3, local[0], *parts, kernel, axis=SHARD_DIM, offset=lo - a,
                                   backend=args.backend)
        qx = torch.cat([zero_rows(lo - a), local[0], zero_rows(b - lo - n)], dim=axis)
        out = natten.na3d(qx, *parts, kernel, backend=args.backend)
        return out.narrow(axis, lo - a, n)

    methods: Dict[str, tuple] = {
        "halo": (halo, 2 * halo_rows * row_bytes),
        "halo, serial": (halo_serial, 2 * halo_rows * row_bytes),
        "all-gather": (gathered, 2 * (total - n) * row_bytes),
    }
    for name, (fn, moved) in methods.items():
        computed = max(extents) if ranged else longest
        row = dict(base, method=name, moved_mb=moved / 1e6, bound=total / computed)
        status = torch.zeros(4, device=device, dtype=torch.float64)  # fwd, step, failed, err
        try:
            if name == "all-gather" and len(set(extents)) != 1:
                raise ValueError(f"all_gather needs equal slabs, got {extents}")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            out = fn()
            status[3] = rel_err(out, ref_slab) if ref_slab is not None else float("nan")
            status[0] = time_ms(fn, device, args.warmup, args.repeat, together=True)
            status[1] = time_ms(lambda: torch.autograd.grad(fn(), local, g_slab), device,
                                args.warmup, args.repeat, together=True)
            if device.type == "cuda":
                row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        except Exception as exc:  # noqa: BLE001 - a failing method becomes a row
            status[2] = 1
            row["error"] = f"rank {me}: {type(exc).__name__}: {exc}"
            if os.environ.get("CP_BENCH_TRACEBACK") == "1":
                traceback.print_exc()
        dist.all_reduce(status, op=dist.ReduceOp.MAX)
        if status[2]:
            row.setdefault("error", "failed on another rank")
        else:
            row.update(fwd_ms=status[0].item(), step_ms=status[1].item(), rel_err=status[3].item())
        rows.append(row)
    return rows


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(rows: List[dict], world: int, device, dtype, args) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{world} x {name}, torch {torch.__version__}, {args.dtype}, heads {args.heads}, dim "
          f"{args.dim}, batch {args.batch}, window {args.kernel}, sharded along time, NCCL_NVLS_ENABLE="
          f"{os.environ.get('NCCL_NVLS_ENABLE')}; median of {args.repeat} after {args.warmup} warm-up")
    head = ["problem", "method", "GPUs", "fwd ms", "fwd+bwd ms", "speed-up", "ideal", "bound",
            "MB/step", "peak GB", "rel err"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    single = {r["problem"]: r.get("step_ms") for r in rows if r["method"] == "1 GPU"}
    for r in rows:
        if "error" in r:
            print(f"| {r['problem']} | {r['method']} | {r['gpus']} | error: {r['error'][:160]} |")
            continue
        base = single.get(r["problem"])
        speed = base / r["step_ms"] if base and r["method"] != "1 GPU" else None
        print(f"| {r['problem']} | {r['method']} | {r['gpus']} | {fmt(r.get('fwd_ms'), '.2f')} | "
              f"{fmt(r.get('step_ms'), '.2f')} | {fmt(speed, '.2f')} | "
              f"{fmt(r['gpus'] if r['method'] != '1 GPU' else None, 'd')} | {fmt(r.get('bound'), '.2f')} | "
              f"{fmt(r.get('moved_mb'), '.1f')} | {fmt(r.get('peak_gb'), '.2f')} | {fmt(r.get('rel_err'), '.1e')} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("cp_bench: CUDA is not available (use --device cpu for a smoke run)", file=sys.stderr)
            return 2
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=timedelta(seconds=args.timeout))
    me, world = dist.get_rank(), dist.get_world_size()
    assert world == world_env
    dtype = getattr(torch, args.dtype)
    rows: List[dict] = []
    for text in args.problems.split(","):
        spatial = grid(text)
        try:
            rows += run_problem(spatial, args, device, dtype, me, world)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory while building inputs
            rows.append(dict(problem=text, method="setup", gpus=world, error=f"rank {me}: {exc}"))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if me == 0:
        print_table(rows, world, device, dtype, args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(world=world, args=vars(args), rows=rows), f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
