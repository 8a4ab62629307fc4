"""The query-range op (natten.functional._query_range_na, the groundwork of context parallelism):
the queries are rows [offset, offset + n) of the key grid along one axis, and the result, the
logsumexp and every gradient must equal the ordinary call on the key grid, sliced to those rows.
CPU backend, float64, so any difference is a bug and not rounding; then every CUDA backend that
serves ranges, in float16 and bfloat16, against the same float64 CPU reference with the usual
tolerances."""

import random

import pytest
import torch

from conftest import assert_close, tolerance
from oracle import reference_na

import natten
from natten import backends, ops
from natten._checks import check_fused
from natten.functional import _query_range_na

TOL = 1e-10
OPS = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}


def _case(shape, kernel, axis, offset, extent, stride=1, dilation=1, causal=False, heads=2,
          heads_kv=None, extra=0, batch=1, name=""):
    return dict(shape=shape, kernel=kernel, axis=axis, offset=offset, extent=extent,
                stride=stride, dilation=dilation, causal=causal, heads=heads,
                heads_kv=heads_kv or heads, extra=extra, batch=batch, name=name)


def _ranges(length):
    """Ranges touching the start, the end, both, and inside the axis; one row at each end."""
    n = max(1, length // 3)
    return (("start", 0, n), ("end", length - n, n), ("whole", 0, length),
            ("inner", n // 2 + 1, max(1, length - n - 2)), ("first_row", 0, 1),
            ("last_row", length - 1, 1))


# Every axis of every rank, odd and even windows, stride, dilation and causal masks along the
# range's axis and others, GQA/MQA and additional keys.
GEOMETRIES = [
    ("1d_odd", (17,), 5, {}),
    ("1d_even_stride_dilation", (23,), 4, dict(stride=3, dilation=2)),
    ("1d_causal_stride", (19,), 6, dict(stride=4, causal=True, extra=2)),
    ("1d_causal_dilation_gqa", (21,), 3, dict(dilation=3, causal=True, heads=4, heads_kv=2)),
    ("2d", (9, 11), (3, 4), dict(stride=(1, 2), dilation=(2, 1), causal=(False, True), extra=3,
                                  heads=4, heads_kv=1, batch=2)),
    ("2d_causal0", (10, 7), (4, 3), dict(stride=(2, 3), dilation=(1, 2), causal=(True, False))),
    ("3d", (6, 7, 8), (3, 2, 4), dict(stride=(1, 2, 3), dilation=(2, 1, 2),
                                      causal=(False, True, False), extra=2)),
    ("3d_causal_all", (5, 6, 7), (2, 3, 3), dict(stride=(2, 1, 2), causal=True, heads=3,
                                                 heads_kv=1)),
]

CASES = [
    _case(shape, kernel, axis, offset, extent, name=f"{name}_axis{axis}_{where}", **kw)
    for name, shape, kernel, kw in GEOMETRIES
    for axis in range(len(shape))
    for where, offset, extent in _ranges(shape[axis])
]


def _tensors(case, seed, dim=8, dim_v=6):
    g = torch.Generator().manual_seed(seed)
    b, shape, h, hk = case["batch"], case["shape"], case["heads"], case["heads_kv"]

    def rand(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    t = dict(q=rand(b, *shape, h, dim), k=rand(b, *shape, hk, dim), v=rand(b, *shape, hk, dim_v))
    if case["extra"]:
        t["ek"] = rand(b, case["extra"], hk, dim)
        t["ev"] = rand(b, case["extra"], hk, dim_v)
    return t


def _window(case):
    return dict(kernel_size=case["kernel"], stride=case["stride"], dilation=case["dilation"],
                is_causal=case["causal"])


def _rows(case, t):
    return t.narrow(1 + case["axis"], case["offset"], case["extent"])


def _grads(out, lse, leaves, g_out, g_lse):
    ((out * g_out.to(out)).sum() + (lse * g_lse.to(lse)).sum()).backward()
    return {x: t.grad for x, t in leaves.items()}


def _check(case, seed, run_ranged, dtype=torch.float64, device="cpu", tol=TOL, dim=8, dim_v=6):
    """The ranged call (run_ranged(leaves) -> (out, lse), leaves["q"] the query rows, of `dtype`
    on `device`) against the ordinary float64 call on the whole grid on the CPU, sliced: output,
    logsumexp and gradients."""
    rank = len(case["shape"])
    t = _tensors(case, seed, dim, dim_v)
    g = torch.Generator().manual_seed(seed + 1)
    q_rows = _rows(case, t["q"])
    g_out = torch.randn(*q_rows.shape[:-1], dim_v, generator=g, dtype=torch.float64)
    g_lse = torch.randn(*q_rows.shape[:-1], generator=g, dtype=torch.float64)

    whole = {x: u.clone().requires_grad_(True) for x, u in t.items()}
    out, lse = OPS[rank](whole["q"], whole["k"], whole["v"], **_window(case), backend="cpu",
                         additional_keys=whole.get("ek"), additional_values=whole.get("ev"),
                         return_lse=True)
    ref = (_rows(case, out), _rows(case, lse))
    ref_grads = _grads(*ref, whole, g_out, g_lse)
    ref_grads["q"] = _rows(case, ref_grads["q"])

    mine = {x: u.to(device=device, dtype=dtype).requires_grad_(True)
            for x, u in dict(t, q=q_rows).items()}
    got = run_ranged(mine)
    for what, a, b in zip(("output", "lse"), got, ref):
        assert_close(a, b, tol, what)
    for x, grad in _grads(*got, mine, g_out, g_lse).items():
        assert_close(grad, ref_grads[x], tol, f"d{x}")


def _ranged(case, **kw):
    rank = len(case["shape"])

    def run(m):
        return _query_range_na(rank, m["q"], m["k"], m["v"], **_window(case), axis=case["axis"],
                               offset=case["offset"], additional_keys=m.get("ek"),
                               additional_values=m.get("ev"), return_lse=True, **kw)
    return run


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_sliced_whole_grid(case):
    _check(case, 17, _ranged(case, backend="cpu"))


class _Intercept(torch.overrides.TorchFunctionMode):
    """Any active function mode sends natten calls through the registered operators
    (natten::fna_forward and its autograd), instead of the eager path."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


OPERATOR_CASES = [c for c in CASES if c["name"].endswith(("_inner", "_end"))][::3]


@pytest.mark.parametrize("case", OPERATOR_CASES, ids=[c["name"] for c in OPERATOR_CASES])
def test_operator_path_matches(case):
    run = _ranged(case)  # backend=None: the cpu backend is the one that serves ranges here

    def through_operator(m):
        with _Intercept():
            return run(m)
    _check(case, 5, through_operator)


def test_operator_fake_shapes():
    """The registered operator's fake results have the query range's shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(1, 3, 9, 2, 8), torch.empty(1, 7, 9, 2, 8), torch.empty(1, 7, 9, 2, 6)
        out, lse = _query_range_na(2, q, k, v, 3, axis=0, offset=2, return_lse=True)
    assert out.shape == (1, 3, 9, 2, 6) and lse.shape == (1, 3, 9, 2)


def test_against_the_oracle():
    """One geometry against the float64 oracle of tests/oracle.py, independent of natten."""
    case = _case((8, 13), (3, 5), 1, 4, 6, stride=(1, 2), dilation=(2, 1), causal=(True, False),
                 extra=2, heads=4, heads_kv=2)
    t = _tensors(case, 3)
    out, lse = _ranged(case, backend="cpu")(dict(t, q=_rows(case, t["q"])))
    ref_out, ref_lse = reference_na(t["q"], t["k"], t["v"], **_window(case),
                                    additional_keys=t["ek"], additional_values=t["ev"])
    assert_close(out, _rows(case, ref_out), TOL, "output")
    assert_close(lse, _rows(case, ref_lse), TOL, "lse")


@pytest.mark.parametrize("seed", range(3))
def test_random_ranges(seed):
    """Random 1-D and 2-D problems and ranges, float32 against float32's own whole-grid call."""
    rng = random.Random(seed)
    for _ in range(6):
        rank = rng.choice((1, 2))
        shape, kernel, stride, dilation, causal = [], [], [], [], []
        for _ in range(rank):
            k, d = rng.randint(1, 6), rng.randint(1, 3)
            shape.append(rng.randint(k * d, 20))
            kernel.append(k)
            stride.append(rng.randint(1, k))
            dilation.append(d)
            causal.append(rng.random() < 0.4)
        axis = rng.randrange(rank)
        extent = rng.randint(1, shape[axis])
        case = _case(tuple(shape), tuple(kernel), axis, rng.randint(0, shape[axis] - extent),
                     extent, tuple(stride), tuple(dilation), tuple(causal),
                     heads_kv=rng.choice((1, 2)), extra=rng.choice((0, 2)))
        _check(case, seed, _ranged(case))


BAD = [
    (dict(offset=-1), "query offset must be a non-negative integer, got -1"),
    (dict(offset=1.0), "query offset must be a non-negative integer"),
    (dict(offset=9), r"query rows \[9, 13\) along axis 0 leave the key grid, which has 12 rows"),
    (dict(axis=2), r"query range axis must be an integer in \[0, 2\), got 2"),
    (dict(axis=True), r"query range axis must be an integer in \[0, 2\), got True"),
    (dict(axis=1, offset=1), r"query rows \[1, 4\) along axis 1 leave the key grid, which has 3 rows"),
]


@pytest.mark.parametrize("args,match", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_range_raises(args, match):
    q, k = torch.randn(1, 4, 3, 1, 8), torch.randn(1, 12, 3, 1, 8)
    kw = dict(dict(axis=0, offset=0), **args)
    with pytest.raises(ValueError, match=match):
        _query_range_na(2, q, k, k, 3, **kw)


def test_other_axes_must_match_the_key_grid():
    q, k = torch.randn(1, 4, 5, 1, 8), torch.randn(1, 12, 6, 1, 8)
    with pytest.raises(ValueError, match="does not match query shape"):
        _query_range_na(2, q, k, k, 3, axis=0, offset=0)


def test_window_checked_on_the_key_grid():
    """kernel * dilation is checked against the key grid, which the queries need not fill."""
    q, k = torch.randn(1, 2, 2, 8), torch.randn(1, 9, 2, 8)
    assert _query_range_na(1, q, k, k, 7, axis=0, offset=7).shape == q.shape
    with pytest.raises(ValueError, match="input size 9"):
        _query_range_na(1, q, k, k, 5, dilation=2, axis=0, offset=0)


RANGE_BACKENDS = ("cpu", "cutlass-fna", "hopper-fna")


def test_which_backends_serve_ranges():
    """cpu, cutlass-fna and hopper-fna serve ranges; every other backend declines a range with a
    reason, so callers can fall back; asked for by name, it raises."""
    q, k = torch.randn(1, 3, 1, 8), torch.randn(1, 9, 1, 8)
    problem, _ = check_fused(1, q, k, k, 3, 1, 1, False, None, None, None, (0, 2))
    assert problem.query_spatial == (3,) and problem.spatial == (9,)
    for name, impl in backends._BACKENDS.items():
        reason = impl.query_range_unsupported(problem)
        assert (reason is None) == (name in RANGE_BACKENDS), (name, reason)
    assert backends.query_range_backend(problem, None) == (backends.get("cpu"), None)


def test_range_round_trips_through_the_operator_argument():
    q, k = torch.randn(1, 4, 3, 2, 8), torch.randn(1, 4, 9, 2, 8)
    problem, _ = check_fused(2, q, k, k, (3, 5), (1, 2), (1, 1), (True, False), None, None, None,
                             (1, 5))
    assert problem.window.query_range == (1, 5, 3)
    assert ops._window(ops.pack_window(problem.window)) == problem.window


def test_compiles():
    """torch.compile traces the range through the registered operators, forward and backward."""
    case = _case((10, 9), 3, 0, 3, 4, stride=(1, 2), causal=(False, True))
    _check(case, 9, torch.compile(_ranged(case), fullgraph=True))


# CUDA: every case above, and larger ones with many query boxes, long key walks and fully
# visible key boxes, on each CUDA backend that serves ranges. Head dims are multiples of 8 (the
# tiled families move rows in 16-byte pieces) and the value's differs from the query's.
CUDA_CASES = CASES + [
    _case((300,), 65, 0, 97, 120, name="large_1d_inner"),
    _case((257,), 31, 0, 0, 100, stride=4, causal=True, extra=70, name="large_1d_causal_start"),
    _case((40, 48), (9, 13), 0, 13, 14, dilation=(2, 1), heads=4, heads_kv=2,
          name="large_2d_dilated_axis0"),
    _case((40, 48), (9, 13), 1, 25, 23, stride=(2, 3), causal=(False, True), batch=2,
          name="large_2d_axis1_end"),
    _case((12, 10, 16), (5, 4, 9), 0, 3, 6, dilation=(2, 1, 1), causal=(True, False, False),
          extra=5, name="large_3d_inner"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", CUDA_CASES, ids=[c["name"] for c in CUDA_CASES])
def test_cuda_matches_sliced_whole_grid(case, dtype, cuda_backend):
    _, name = cuda_backend
    if name is None:
        pytest.skip("CUDA not available")
    impl = backends.get(name)
    t = _tensors(case, 0, 32, 16)
    q = _rows(case, t["q"]).to("cuda", dtype).requires_grad_(True)
    k, v = t["k"].to("cuda", dtype), t["v"].to("cuda", dtype)
    extra = [t[x].to("cuda", dtype) if x in t else None for x in ("ek", "ev")]
    problem, _ = check_fused(len(case["shape"]), q, k, v, case["kernel"], case["stride"],
                             case["dilation"], case["causal"], None, *extra,
                             (case["axis"], case["offset"]))
    reason = impl.query_range_unsupported(problem)
    if reason is not None:
        assert name not in RANGE_BACKENDS, f"{name} declines a range: {reason}"
        pytest.skip(f"{name} declines ranges: {reason}")
    reason = impl.unsupported(problem)
    if reason is not None:  # a filtered build lacks the rank, dtype or head dim
        pytest.skip(f"{name}: {reason}")
    _check(case, 0, _ranged(case, backend=name), dtype, "cuda", tolerance(dtype, "cuda", name),
           32, 16)


LARGE_CUDA_CASES = CUDA_CASES[len(CASES):]


@pytest.mark.parametrize("case", LARGE_CUDA_CASES, ids=[c["name"] for c in LARGE_CUDA_CASES])
def test_cuda_hopper_deterministic_backward(case):
    """hopper-fna under torch.use_deterministic_algorithms(True), whose backward computes dQ in a
    pass of its own (the SM80 family's dQ kernel), on query ranges."""
    if not torch.cuda.is_available() or "hopper-fna" not in backends.names_for_device("cuda"):
        pytest.skip("hopper-fna is not available here")
    t = _tensors(case, 0, 32, 16)
    q = _rows(case, t["q"]).to("cuda", torch.bfloat16).requires_grad_(True)
    k, v = t["k"].to("cuda", torch.bfloat16), t["v"].to("cuda", torch.bfloat16)
    extra = [t[x].to("cuda", torch.bfloat16) if x in t else None for x in ("ek", "ev")]
    problem, _ = check_fused(len(case["shape"]), q, k, v, case["kernel"], case["stride"],
                             case["dilation"], case["causal"], None, *extra,
                             (case["axis"], case["offset"]))
    reason = backends.get("hopper-fna").unsupported(problem)
    if reason is not None:  # a filtered build lacks the rank or head dim
        pytest.skip(f"hopper-fna: {reason}")
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    try:
        _check(case, 0, _ranged(case, backend="hopper-fna"), torch.bfloat16, "cuda",
               tolerance(torch.bfloat16, "cuda", "hopper-fna"), 32, 16)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
