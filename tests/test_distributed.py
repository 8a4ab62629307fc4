"""natten.distributed (context parallelism): gloo process groups of 2-4 CPU ranks, and NCCL
groups of 2-4 GPUs where the machine has them, against the float64 oracle of the whole grid.

One process group per world size runs every case of that size (starting processes is the
expensive part) and writes one verdict per case; the tests below read the verdicts. Every
rank builds the same global tensors from the case's seed, runs its slab and checks its slab
of the output, the logsumexp and the gradients (for additional keys/values: the whole
gradient, which the ranks sum).
"""

import json
import os
import random
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import assert_close, tolerance
from oracle import axis_params, reference_na

_TIMEOUT_S = 60


def _case(world, shape, extents, kernel, stride=1, dilation=1, causal=False, shard_dim=0,
          heads=2, heads_kv=None, extra=0, lse=False, dtype="float64", batch=1, name="",
          dims=(8, 6), device="cpu", backend="cpu", grad=("q", "k", "v", "ek", "ev"),
          unused=()):
    """grad: the inputs that require a gradient (the others are checked to get none). unused:
    (rank, outputs) pairs: the outputs of that rank that get no gradient, "out", "lse" (left
    out of its loss) or "all" (its loss reaches them through a node that gives them none)."""
    return dict(world=world, shape=shape, extents=extents, kernel=kernel, stride=stride,
                dilation=dilation, causal=causal, shard_dim=shard_dim, heads=heads,
                heads_kv=heads_kv or heads, extra=extra, lse=lse, dtype=dtype, batch=batch,
                name=name, dims=dims, device=device, backend=backend, grad=grad,
                unused=unused)


def _random_1d_cases(world, count, seed):
    """Small 1-D problems with random windows and random (often thin) slabs."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        k = rng.randint(1, 8)
        s = rng.randint(1, k)
        d = rng.randint(1, 3)
        length = rng.randint(max(k * d, world), 36)
        cuts = sorted(rng.sample(range(1, length), world - 1))
        extents = [b - a for a, b in zip([0] + cuts, cuts + [length])]
        out.append(_case(world, (length,), extents, k, s, d, rng.random() < 0.4,
                         heads=2, heads_kv=rng.choice([1, 2]), extra=rng.choice([0, 2]),
                         lse=rng.random() < 0.5, name=f"random1d_w{world}_{i}"))
    return out


CASES = [
    _case(2, (20,), (9, 11), 5, name="1d_uneven"),
    _case(2, (17,), (16, 1), 6, name="1d_even_window_one_row_rank"),
    _case(4, (24,), (3, 4, 2, 15), 7, name="1d_thin_slabs"),
    _case(4, (13,), (1, 6, 1, 5), 5, lse=True, name="1d_single_rows"),
    _case(3, (40,), (13, 14, 13), 6, stride=2, dilation=3, causal=True, name="1d_causal_stride_dilation"),
    _case(3, (30,), (7, 9, 14), 4, stride=4, dilation=2, name="1d_blocked_offsets"),
    _case(3, (31,), (11, 5, 15), 7, stride=3, dilation=2, lse=True, name="1d_stride_dilation_lse"),
    _case(2, (18,), (9, 9), 8, stride=5, causal=True, extra=3, name="1d_causal_blocked_extra"),
    _case(2, (11, 9), (5, 4), (3, 4), stride=(1, 2), dilation=(1, 2), causal=(False, True),
          shard_dim=1, heads=4, heads_kv=2, extra=3, lse=True, batch=2, name="2d_axis1_gqa_extra"),
    _case(3, (14, 6), (4, 7, 3), (5, 3), stride=(2, 1), dilation=(2, 1), causal=(True, False),
          shard_dim=0, lse=True, name="2d_axis0_causal_dilation"),
    _case(2, (7, 5, 6), (2, 5), (3, 3, 3), causal=(True, False, False), extra=2,
          name="3d_axis0_causal_extra"),
    _case(3, (4, 5, 13), (6, 2, 5), (2, 3, 4), stride=(1, 3, 2), dilation=(2, 1, 3),
          shard_dim=2, heads=4, heads_kv=1, lse=True, name="3d_axis2_mqa"),
    _case(2, (5, 12, 4), (5, 7), (3, 5, 2), shard_dim=1, causal=(False, False, True),
          name="3d_axis1"),
    _case(2, (16,), (7, 9), 5, dilation=2, extra=2, lse=True, dtype="float32", batch=2,
          name="1d_float32"),
    # Long slabs: most rows are computed on the own rows while the halo travels, the rest on each
    # edge (odd offsets of the own rows against the stride and dilation periods included).
    _case(3, (61,), (19, 23, 19), 6, stride=2, dilation=2, extra=2, lse=True, batch=2,
          name="1d_overlap_stride_dilation_extra"),
    _case(2, (40, 5), (21, 19), (7, 3), causal=(True, False), heads=4, heads_kv=2, lse=True,
          name="2d_overlap_causal_gqa"),
    _case(2, (4, 30, 6), (13, 17), (2, 5, 3), stride=(1, 3, 1), dilation=(2, 1, 1), shard_dim=1,
          extra=1, name="3d_overlap_axis1_stride"),
    # Rank 1's high edge needs rows of the halo on both sides: its key grid is the whole slab.
    _case(4, (33,), (2, 18, 4, 9), 4, stride=2, dilation=2, extra=2, lse=True,
          name="1d_edge_grid_both_halos"),
    # Gradients for some inputs only: the backward exchange runs with the others' left out.
    _case(2, (20,), (9, 11), 5, extra=2, lse=True, grad=("v",), name="1d_only_value_grad"),
    _case(3, (40,), (13, 14, 13), 6, stride=2, dilation=3, extra=2, grad=("q", "ek"),
          name="1d_query_and_extra_key_grads"),
    # Outputs without a gradient: the backward batch of every rank, with or without a halo,
    # still receives (and sends) the halo rows' gradients.
    _case(2, (20,), (9, 11), 5, causal=True, extra=2, lse=True,
          unused=((0, "out"), (1, "lse")), name="1d_causal_lse_or_output_unused"),
    _case(2, (20,), (9, 11), 5, causal=True, extra=2, lse=True, unused=((0, "all"),),
          name="1d_causal_no_halo_rank_without_gradient"),
    _case(3, (30,), (8, 12, 10), 5, dilation=2, causal=True, extra=2,
          unused=((1, "all"),), name="1d_causal_halo_rank_without_gradient"),
    _case(2, (20,), (9, 11), 5, extra=2, lse=True, unused=((0, "all"), (1, "out")),
          name="1d_outputs_without_gradient"),
    *_random_1d_cases(2, 8, seed=1),
    *_random_1d_cases(3, 10, seed=2),
    *_random_1d_cases(4, 10, seed=3),
]

SUBGROUP_CASE = _case(2, (6, 15), (8, 7), (3, 5), dilation=(1, 2), shard_dim=1, extra=2, lse=True,
                      name="subgroup")


_RANGE_BACKENDS = {"cpu": {"cpu"}, "cuda": {"cutlass-fna", "hopper-fna"}}


def _on_gpu(case, dtype, backend):
    return dict(case, dtype=dtype, backend=backend, device="cuda", dims=(32, 32),
                name=f"{case['name']}_{dtype}_{backend}")


# Every fixed geometry on the GPU: float32 on the plain-CUDA reference kernels, bfloat16 on the
# backend that backend=None picks.
GPU_CASES = [_on_gpu(c, dtype, backend) for c in CASES if not c["name"].startswith("random")
             for dtype, backend in (("float32", "reference"), ("bfloat16", None))]

# (world, name, text of each rank's error)
_REJECTED = "rejected their inputs"
ERROR_CASES = [
    (2, "kernel_exceeds_global_extent", ("along shard_dim 0: 7 * 2 > 13",) * 2),
    (2, "ranks_disagree_on_kernel", ("ranks disagree",) * 2),
    (2, "one_rank_bad_shard_dim", (_REJECTED, "shard_dim must be an integer in [0, 1), got 1")),
    (3, "empty_slab", (_REJECTED, "this rank holds 0", _REJECTED)),
]


def _dtype(name):
    return getattr(torch, name)


def _tensors(case, seed):
    g = torch.Generator().manual_seed(seed)
    dt = _dtype(case["dtype"])
    b, shape, h, hk = case["batch"], tuple(case["shape"]), case["heads"], case["heads_kv"]
    d, dv = case["dims"]

    def rand(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dt)

    t = dict(q=rand(b, *shape, h, d), k=rand(b, *shape, hk, d), v=rand(b, *shape, hk, dv))
    if case["extra"]:
        t["ek"] = rand(b, case["extra"], hk, d)
        t["ev"] = rand(b, case["extra"], hk, dv)
    t["gout"] = rand(b, *shape, h, dv)
    t["glse"] = rand(b, *shape, h)
    return t


def _run_case(case, seed, me, group=None, calls=None):
    """calls: how many query-range calls the rank makes, where the rule below does not say."""
    import natten.distributed as nd

    rank = len(case["shape"])
    axis = 1 + case["shard_dim"]
    lo = sum(case["extents"][:me])
    n = case["extents"][me]
    t = _tensors(case, seed)
    unused = dict(case["unused"])
    for r, outputs in unused.items():
        rows = (sum(case["extents"][:r]), case["extents"][r])
        for key, output in (("gout", "out"), ("glse", "lse")):
            if outputs in (output, "all"):
                t[key].narrow(axis, *rows).zero_()
    window = dict(kernel_size=case["kernel"], stride=case["stride"], dilation=case["dilation"],
                  is_causal=case["causal"])
    names = ["q", "k", "v"] + (["ek", "ev"] if case["extra"] else [])

    # The whole problem in float64 on the oracle.
    full = {x: t[x].detach().double().requires_grad_(True) for x in names}
    ref_out, ref_lse = reference_na(full["q"], full["k"], full["v"], **window,
                                    additional_keys=full.get("ek"),
                                    additional_values=full.get("ev"))
    loss = (ref_out * t["gout"].double()).sum()
    if case["lse"]:
        loss = loss + (ref_lse * t["glse"].double()).sum()
    loss.backward()

    # This rank's slab through natten.distributed.
    dev = case["device"]
    local = {x: t[x].narrow(axis, lo, n).to(dev).requires_grad_(x in case["grad"])
             for x in ("q", "k", "v")}
    for x in ("ek", "ev"):
        if x in t:
            local[x] = t[x].to(dev).requires_grad_(x in case["grad"])
    op = getattr(nd, f"na{rank}d")
    ranged_calls = []
    ranged_op = nd._query_range_na

    def counted(*args, **kwargs):
        ranged_calls.append(kwargs["backend"])
        return ranged_op(*args, **kwargs)

    nd._query_range_na = counted
    try:
        got = op(local["q"], local["k"], local["v"], **window, shard_dim=case["shard_dim"],
                 group=group, additional_keys=local.get("ek"), additional_values=local.get("ev"),
                 return_lse=case["lse"], backend=case["backend"])
    finally:
        nd._query_range_na = ranged_op
    # A backend that computes a query range (cpu and the tiled CUDA families) gets only the owned
    # rows as queries: the rows that need no halo in one call on the own rows (made before the
    # halo arrives), the others in one call per edge; the other backends (reference, flex-fna)
    # the whole slab.
    if calls is not None:
        assert len(ranged_calls) == calls, ranged_calls
    elif case["backend"] in ("reference", "flex-fna"):
        assert ranged_calls == [], ranged_calls
    else:
        window = _shard_axis_window(case)
        i0, i1 = nd._aligned(nd._interior(tuple(case["extents"]), me, *window),
                             window[2] * nd._query_box_rows(len(case["shape"]), case["shard_dim"]))
        calls = 1 + (i0 > 0) + (i1 < n) if i1 > i0 else 1
        assert len(ranged_calls) == calls, (ranged_calls, (i0, i1), n)
        assert set(ranged_calls) <= _RANGE_BACKENDS[dev], ranged_calls
    out, lse = got if case["lse"] else (got, None)
    mine = unused.get(me)
    if mine == "all":
        out, lse = (x if x is None else _NoGrad.apply(x) for x in (out, lse))
    local_loss = 0
    if mine != "out":
        local_loss = (out.double() * t["gout"].narrow(axis, lo, n).to(dev).double()).sum()
    if lse is not None and mine != "lse":
        local_loss = local_loss + (lse.double() * t["glse"].narrow(axis, lo, n).to(dev).double()).sum()
    local_loss.backward()

    tol = tolerance(_dtype(case["dtype"]), dev, case["backend"])
    assert_close(out, ref_out.narrow(axis, lo, n), tol, f"rank {me} output")
    if lse is not None:
        assert_close(lse, ref_lse.narrow(axis, lo, n), tol, f"rank {me} lse")
    for x in names:
        if x not in case["grad"]:
            assert local[x].grad is None, f"rank {me}: d{x} without requires_grad"
            continue
        ref_grad = full[x].grad
        if x in ("q", "k", "v"):
            ref_grad = ref_grad.narrow(axis, lo, n)
        assert_close(local[x].grad, ref_grad, tol, f"rank {me} d{x}")


class _NoGrad(torch.autograd.Function):
    """Identity whose backward gives no gradient (None)."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return None


def _shard_axis_window(case):
    """(kernel, stride, dilation, causal) along the shard axis."""
    pick = [v if isinstance(v, (tuple, list)) else [v] * len(case["shape"])
            for v in (case["kernel"], case["stride"], case["dilation"], case["causal"])]
    return tuple(v[case["shard_dim"]] for v in pick)


def _module_case(me, world):
    """A NeighborhoodAttention2D on a slab equals the module on the whole grid."""
    import natten
    import natten.distributed as nd

    torch.manual_seed(7)
    module = natten.NeighborhoodAttention2D(16, 2, (5, 3), (1, 2)).double()
    module.rpb = None  # the fused path (no relative positional bias) is the sharded one
    x = torch.randn(2, 13, 8, 16, dtype=torch.float64)
    extents = [4, 9]
    lo, n = sum(extents[:me]), extents[me]
    ref = module(x)
    got = nd.module_forward(module, x.narrow(1, lo, n), shard_dim=0)
    assert_close(got, ref.narrow(1, lo, n), 1e-10, f"rank {me} module output")


# Both ranks compute an edge on a key grid with a row to spare beyond its queries: rank 0 its rows
# 7-8 on the global rows [5, 11), rank 1 its rows 9-10 on [7, 13).
EDGE_CASE = _case(2, (20,), (9, 11), 5, extra=2, lse=True, name="edges")
# Causal: rank 0 has no halo (its windows reach no other rank's rows), so no join, and computes
# all of its rows in one call on its own keys; rank 1 computes its rows 13-19 on its own keys and
# rows 9-12 on [5, 13).
CAUSAL_EDGE_CASE = _case(2, (20,), (9, 11), 5, causal=True, extra=2, lse=True,
                         name="causal_edges")


def _short_grids_case(me):
    """Each edge's key grid one own row short: every rank's output misses the oracle's, so the
    grids that natten.distributed uses are no longer than needed and the checks of the cases
    above would see a grid that is too short."""
    import natten.distributed as nd

    least = nd._edge_grids

    def short(extents, rank, kernel, stride, dilation, causal, inner):
        return tuple((rows, (g0, g1 - 1) if rows[0] == 0 else (g0 + 1, g1))
                     for rows, (g0, g1) in least(extents, rank, kernel, stride, dilation, causal,
                                                 inner))

    nd._edge_grids = short
    try:
        _run_case(EDGE_CASE, 5, me)
    except AssertionError as exc:
        if f"rank {me} output" in str(exc):
            return
        raise
    finally:
        nd._edge_grids = least
    raise AssertionError(f"rank {me}: the output matched with edge grids one row short")


class _Mark(torch.autograd.Function):
    """Identity; its backward notes when the gradient has passed it."""

    @staticmethod
    def forward(ctx, t, log, text):
        ctx.log, ctx.text = log, text
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        ctx.log.append(ctx.text)
        return g, None, None


def _backward_order_case(me, case):
    """One batch of messages each way per call, and the backward's (the halo rows' gradients)
    starts before the backward of the rows computed before the halo arrived, which it overlaps;
    on a rank without a halo too, whose batch receives its rows' gradients."""
    import natten.distributed as nd

    log = []
    start, ranged_op = nd._Comm.start, nd._query_range_na

    def logged_start(self, sends, recvs):
        log.append("batch")
        return start(self, sends, recvs)

    def marked(rank, query, *args, **kwargs):
        if "call" not in log:  # the first call: the interior rows
            query = _Mark.apply(query, log, "interior backward")
        log.append("call")
        return ranged_op(rank, query, *args, **kwargs)

    nd._Comm.start, nd._query_range_na = logged_start, marked
    try:
        _run_case(case, 6, me)
    finally:
        nd._Comm.start, nd._query_range_na = start, ranged_op
    events = [text for text in log if text != "call"]
    assert events == ["batch", "batch", "interior backward"], (me, log)


def _queries_only_case(me):
    """torch.autograd.grad for the queries alone needs no rank's _HaloSend backward, so no rank
    starts a backward batch, the rank without a halo (rank 0, no join) included; the next call's
    messages still line up."""
    import natten.distributed as nd

    case = CAUSAL_EDGE_CASE
    t = _tensors(case, 8)
    lo, n = sum(case["extents"][:me]), case["extents"][me]
    window = dict(kernel_size=case["kernel"], is_causal=case["causal"])
    full = {x: t[x].detach().requires_grad_(x == "q") for x in ("q", "k", "v", "ek", "ev")}
    ref_out, ref_lse = reference_na(full["q"], full["k"], full["v"], **window,
                                    additional_keys=full["ek"], additional_values=full["ev"])
    ref_dq, = torch.autograd.grad((ref_out * t["gout"]).sum() + (ref_lse * t["glse"]).sum(),
                                  [full["q"]])
    local = {x: (t[x].narrow(1, lo, n) if x in ("q", "k", "v") else t[x]).requires_grad_(True)
             for x in ("q", "k", "v", "ek", "ev")}
    log = []
    start = nd._Comm.start

    def logged_start(self, sends, recvs):
        log.append("batch")
        return start(self, sends, recvs)

    nd._Comm.start = logged_start
    try:
        out, lse = nd.na1d(local["q"], local["k"], local["v"], **window,
                           additional_keys=local["ek"], additional_values=local["ev"],
                           return_lse=True, backend=case["backend"])
        loss = ((out * t["gout"].narrow(1, lo, n)).sum()
                + (lse * t["glse"].narrow(1, lo, n)).sum())
        dq, = torch.autograd.grad(loss, [local["q"]])
    finally:
        nd._Comm.start = start
    assert log == ["batch"], (me, log)
    assert_close(dq, ref_dq.narrow(1, lo, n), tolerance(torch.float64, "cpu", "cpu"),
                 f"rank {me} dq")
    _run_case(case, 9, me)


def _in_place_case(me):
    """The output of a rank without a join may be modified in place where the ordinary call's
    may (a concatenation of pieces): query boxes of 4 rows make rank 0 of the causal split join
    its rows 0-7 and row 8."""
    import natten.distributed as nd

    case = CAUSAL_EDGE_CASE
    t = _tensors(case, 10)
    lo, n = sum(case["extents"][:me]), case["extents"][me]
    window = dict(kernel_size=case["kernel"], is_causal=case["causal"])
    names = ("q", "k", "v")
    full = {x: t[x].detach().requires_grad_(True) for x in names}
    ref_out, _ = reference_na(full["q"], full["k"], full["v"], **window)
    (2 * ref_out * t["gout"]).sum().backward()
    local = {x: t[x].narrow(1, lo, n).requires_grad_(True) for x in names}
    box_rows = nd._query_box_rows
    nd._query_box_rows = lambda rank, axis: 4
    try:
        out = nd.na1d(local["q"], local["k"], local["v"], **window, backend=case["backend"])
    finally:
        nd._query_box_rows = box_rows
    out.mul_(2)
    (out * t["gout"].narrow(1, lo, n)).sum().backward()
    tol = tolerance(torch.float64, "cpu", "cpu")
    for x in names:
        assert_close(local[x].grad, full[x].grad.narrow(1, lo, n), tol, f"rank {me} d{x}")


def _fallback_case(me, path):
    """The paths other than interior plus edges: ``serial`` (natten.distributed._OVERLAP off:
    every row on the slab), ``padded`` (a backend without query ranges: the ordinary call on
    the slab, zero queries as the halo's), ``edges`` (a backend that cannot compute the edges'
    grids as ranges: the interior rows' piece is dropped and every row computed on the slab)."""
    import natten.distributed as nd

    ask = nd._query_range_backend
    extents = tuple(EDGE_CASE["extents"])
    a, b = nd._slabs(extents, EDGE_CASE["kernel"], 1, 1, False)[me]

    def without_ranges(rank, q, kx, *args):
        if path == "padded" or kx.shape[1] not in (extents[me], b - a):
            return None
        return ask(rank, q, kx, *args)

    nd._query_range_backend = without_ranges
    nd._OVERLAP = path != "serial"
    try:
        _run_case(EDGE_CASE, 7, me, calls={"serial": 1, "padded": 0, "edges": 2}[path])
    finally:
        nd._query_range_backend = ask
        nd._OVERLAP = True


def _error_case(name, me):
    import natten.distributed as nd

    t = torch.randn(1, 13, 2, 8, dtype=torch.float64)
    if name == "kernel_exceeds_global_extent":
        rows = (6, 7)[me]
        nd.na1d(t[:, :rows], t[:, :rows], t[:, :rows], 7, dilation=2, backend="cpu")
    elif name == "ranks_disagree_on_kernel":
        nd.na1d(t, t, t, 3 + 2 * me, backend="cpu")
    elif name == "one_rank_bad_shard_dim":
        nd.na1d(t, t, t, 3, shard_dim=me, backend="cpu")
    elif name == "empty_slab":
        rows = (5, 0, 8)[me]
        nd.na1d(t[:, :rows], t[:, :rows], t[:, :rows], 3, backend="cpu")
    raise AssertionError(f"{name}: no error raised")


def _worker(me, world, init_file, out_dir, cases, error_names):
    torch.set_num_threads(1)
    on_gpu = cases[0]["device"] == "cuda"
    if on_gpu:
        torch.cuda.set_device(me)
        os.environ["NCCL_NVLS_ENABLE"] = "0"
    dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"file://{init_file}",
                            rank=me, world_size=world, timeout=timedelta(seconds=_TIMEOUT_S))
    verdicts = {}

    def record(key, fn):
        try:
            fn()
            verdicts[key] = "ok"
        except Exception:  # noqa: BLE001 - every failure becomes this case's verdict
            verdicts[key] = traceback.format_exc()

    for i, case in enumerate(cases):
        record(case["name"], lambda case=case, i=i: _run_case(case, 1000 + i, me))
    if world == 2 and not on_gpu:
        record("module", lambda: _module_case(me, world))
        record("short_grids", lambda: _short_grids_case(me))
        record("backward_order", lambda: _backward_order_case(me, EDGE_CASE))
        record("backward_order_causal", lambda: _backward_order_case(me, CAUSAL_EDGE_CASE))
        record("queries_only", lambda: _queries_only_case(me))
        record("in_place", lambda: _in_place_case(me))
        for path in ("serial", "padded", "edges"):
            record("fallback:" + path, lambda path=path: _fallback_case(me, path))
    if world == 3 and not on_gpu:
        # Ranks 1 and 2 of the world as a group of their own (group ranks differ from world ranks).
        sub = dist.new_group([1, 2])
        verdicts["subgroup"] = "ok"
        if me > 0:
            record("subgroup", lambda: _run_case(SUBGROUP_CASE, 99, me - 1, group=sub))
    for name in error_names:
        def expect_error(name=name):
            try:
                _error_case(name, me)
            except (ValueError, TypeError) as exc:
                raise RuntimeError(f"raised: {exc}") from None

        record("error:" + name, expect_error)
    with open(os.path.join(out_dir, f"rank{me}.json"), "w") as f:
        json.dump(verdicts, f)
    dist.destroy_process_group()


def _run_groups(cases, errors, tmp_path_factory, tag):
    """{world: [per-rank {case name: verdict}]}, one process group per world size."""
    result = {}
    for world in sorted({c["world"] for c in cases}):
        out_dir = tmp_path_factory.mktemp(f"{tag}{world}")
        mine = [c for c in cases if c["world"] == world]
        names = [name for w, name, _ in errors if w == world]
        mp.spawn(_worker, args=(world, str(out_dir / "store"), str(out_dir), mine, names),
                 nprocs=world, join=True)
        result[world] = []
        for me in range(world):
            with open(out_dir / f"rank{me}.json") as f:
                result[world].append(json.load(f))
    return result


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    return _run_groups(CASES, ERROR_CASES, tmp_path_factory, "cpu")


@pytest.fixture(scope="module")
def gpu_verdicts(tmp_path_factory):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        pytest.skip("needs 2 or more CUDA devices")
    cases = [c for c in GPU_CASES if c["world"] <= gpus]
    return _run_groups(cases, [], tmp_path_factory, "gpu")


def _check_all_ranks(verdicts, world, key):
    failures = [f"rank {me}:\n{v[key]}" for me, v in enumerate(verdicts[world]) if v[key] != "ok"]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_whole_grid(verdicts, case):
    _check_all_ranks(verdicts, case["world"], case["name"])


@pytest.mark.parametrize("case", GPU_CASES, ids=[c["name"] for c in GPU_CASES])
def test_matches_whole_grid_gpu(gpu_verdicts, case):
    if case["world"] not in gpu_verdicts:
        pytest.skip(f"needs {case['world']} CUDA devices")
    _check_all_ranks(gpu_verdicts, case["world"], case["name"])


# Scenarios the worker ranks check on the CPU: (ranks, name).
SCENARIOS = [
    (3, "subgroup"),               # a process group of some of the ranks
    (2, "module"),                 # natten.distributed.module_forward
    (2, "short_grids"),            # edge grids one row short miss the oracle
    (2, "backward_order"),         # the backward exchange starts before the interior's backward
    (2, "backward_order_causal"),  # and first on a rank without halo
    (2, "queries_only"),           # the gradient of the queries alone exchanges nothing
    (2, "in_place"),               # an output modified in place
]


@pytest.mark.parametrize("world,name", SCENARIOS, ids=[name for _, name in SCENARIOS])
def test_scenario(verdicts, world, name):
    _check_all_ranks(verdicts, world, name)


@pytest.mark.parametrize("path", ["serial", "padded", "edges"])
def test_fallback_paths(verdicts, path):
    _check_all_ranks(verdicts, 2, "fallback:" + path)


@pytest.mark.parametrize("world,name,texts", ERROR_CASES, ids=[e[1] for e in ERROR_CASES])
def test_bad_input_raises_on_every_rank(verdicts, world, name, texts):
    """Every rank raises (none is left waiting for messages), each with its reason."""
    for me, text in enumerate(texts):
        verdict = verdicts[world][me]["error:" + name]
        assert "raised:" in verdict and text in verdict, (me, verdict)


def test_needs_a_process_group():
    import natten.distributed as nd

    t = torch.randn(1, 8, 1, 4)
    with pytest.raises(ValueError, match="process group"):
        nd.na1d(t, t, t, 3)


def _sharded_axes(seed, max_length, max_world):
    """Random shard-axis problems: (kernel, stride, dilation, causal, extent, slab extents)."""
    rng = random.Random(seed)
    for _ in range(60):
        k = rng.randint(1, 12)
        s, d = rng.randint(1, k), rng.randint(1, 4)
        length = rng.randint(k * d, max_length)
        world = rng.randint(1, min(max_world, length))
        cuts = sorted(rng.sample(range(1, length), world - 1))
        extents = tuple(b - a for a, b in zip([0] + cuts, cuts + [length]))
        yield k, s, d, rng.random() < 0.4, length, extents


def _global_window_in(length, k, s, d, c, x, a, extent):
    """Whether global coordinate x has its global window in the grid of rows [a, a + extent)
    (the oracle's window rules, independent of natten._C)."""
    _, f, l, _ = axis_params(length, k, s, d, c, x)
    _, fs, ls, _ = axis_params(extent, k, s, d, c, x - a)
    r = (x - a) % d
    return (a + fs * d + r, a + ls * d + r) == (f * d + x % d, l * d + x % d)


@pytest.mark.parametrize("seed", range(4))
def test_slabs_give_global_windows(seed):
    """The slab of every rank reproduces the global window of each of its queries."""
    from natten.distributed import _slabs

    for k, s, d, c, length, extents in _sharded_axes(seed, 80, 5):
        lo = 0
        for n, (a, b) in zip(extents, _slabs(extents, k, s, d, c)):
            assert 0 <= a <= lo and lo + n <= b <= length and b - a >= k * d
            for x in range(lo, lo + n):
                assert _global_window_in(length, k, s, d, c, x, a, b - a), \
                    (extents, k, s, d, c, x, (a, b))
            lo += n


@pytest.mark.parametrize("seed", range(4))
def test_interior_rows_need_no_halo(seed):
    """Each row that a rank computes before the halo arrives has, in the grid of the rank's own
    rows, its global window; and the rows next to the run do not (the run is as long as it
    can be)."""
    from natten.distributed import _interior

    found = 0
    for k, s, d, c, length, extents in _sharded_axes(100 + seed, 90, 4):
        lo = 0
        for me, n in enumerate(extents):
            i0, i1 = _interior(extents, me, k, s, d, c)
            assert 0 <= i0 <= i1 <= n
            if n >= k * d:
                def same(i):
                    return _global_window_in(length, k, s, d, c, lo + i, lo, n)

                assert all(same(i) for i in range(i0, i1)), (extents, k, s, d, c, me, (i0, i1))
                if i1 > i0:
                    assert i0 == 0 or not same(i0 - 1)
                    assert i1 == n or not same(i1)
                found += i1 - i0
            else:
                assert (i0, i1) == (0, 0)
            lo += n
    assert found > 0

def test_aligned_runs():
    from natten.distributed import _aligned

    assert _aligned((0, 13), 4) == (0, 12)
    assert _aligned((3, 16), 4) == (4, 16)
    assert _aligned((3, 13), 4) == (4, 12)
    assert _aligned((3, 9), 4) == (4, 8)
    assert _aligned((5, 7), 4) == (0, 0)
    assert _aligned((0, 0), 4) == (0, 0)
    assert _aligned((2, 11), 1) == (2, 11)


@pytest.mark.parametrize("seed", range(4))
def test_exact_rows_against_oracle(seed):
    """_exact_rows on random key grids equals the oracle's window rules row by row (grids
    shorter than kernel * dilation give no row)."""
    from natten.distributed import _exact_rows

    rng = random.Random(200 + seed)
    for k, s, d, c, length, _ in _sharded_axes(200 + seed, 70, 1):
        for _ in range(8):
            g0 = rng.randint(0, length - 1)
            g1 = rng.randint(g0 + 1, length)
            rows = range(g0, g1)
            got = _exact_rows(length, k, s, d, c, (g0, g1), rows)
            want = [g1 - g0 >= k * d and _global_window_in(length, k, s, d, c, x, g0, g1 - g0)
                    for x in rows]
            assert got == want, (length, k, s, d, c, (g0, g1))


@pytest.mark.parametrize("seed", range(4))
def test_edge_grids_are_least_exact(seed):
    """Each edge run's key grid holds the slab's rows on its side, gives every query of the run
    its global window, and no grid that ends (low edge) or starts (high edge) a row closer to
    the run does."""
    from natten.distributed import _aligned, _edge_grids, _interior, _slabs

    found = 0
    for k, s, d, c, length, extents in _sharded_axes(300 + seed, 90, 4):
        slabs = _slabs(extents, k, s, d, c)
        lo = 0
        for me, n in enumerate(extents):
            a, b = slabs[me]
            for align in (1, 2 * d):
                inner = _aligned(_interior(extents, me, k, s, d, c), align)
                if inner[1] == inner[0]:
                    continue
                edges = _edge_grids(extents, me, k, s, d, c, inner)
                assert [rows for rows, _ in edges] == [
                    rows for rows in ((0, inner[0]), (inner[1], n)) if rows[1] > rows[0]]

                def exact(grid, rows):
                    extent = grid[1] - grid[0]
                    return extent >= k * d and all(
                        _global_window_in(length, k, s, d, c, lo + i, grid[0], extent)
                        for i in range(*rows))

                for rows, (g0, g1) in edges:
                    case = (extents, k, s, d, c, me, inner, rows, (g0, g1))
                    assert a <= g0 <= lo + rows[0] and lo + rows[1] <= g1 <= b, case
                    assert exact((g0, g1), rows), case
                    if rows[0] == 0:
                        assert g0 == a, case
                        shorter = [(g0, g) for g in range(lo + rows[1], g1)]
                    else:
                        assert g1 == b, case
                        shorter = [(g, g1) for g in range(g0 + 1, lo + rows[0] + 1)]
                    assert not any(exact(grid, rows) for grid in shorter), case
                    found += 1
            lo += n
    assert found > 0
