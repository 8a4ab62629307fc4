"""Fused ops (natten.na1d/2d/3d, natten.fused_na*d) on every CPU backend vs the float64
oracle: outputs, LSE, and gradients of query/key/value/additional KV."""

import pytest
import torch

from conftest import LONG_TESTS, assert_close
from fused_checks import (
    DTYPE_CASES,
    FEATURE_CASES,
    GEOMETRY_CASES,
    LONG_CASES,
    TILE_CASES,
    Case,
    call_args,
    check_fused,
    dtype_id,
    make_inputs,
    op_for_rank,
    tile_combos,
)
from oracle import as_tuple, reference_na

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("case", GEOMETRY_CASES, ids=Case.id)
def test_geometry(cpu_backend, case):
    device, backend = cpu_backend
    check_fused(case, torch.float32, device, backend)


@pytest.mark.parametrize("case", FEATURE_CASES, ids=Case.id)
def test_features(cpu_backend, case):
    device, backend = cpu_backend
    check_fused(case, torch.float32, device, backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=Case.id)
def test_dtypes(cpu_backend, case, dtype):
    device, backend = cpu_backend
    check_fused(case, dtype, device, backend)


@pytest.mark.parametrize("case", [GEOMETRY_CASES[1], GEOMETRY_CASES[10], GEOMETRY_CASES[18]], ids=Case.id)
def test_fused_alias(cpu_backend, case):
    device, backend = cpu_backend
    check_fused(case, torch.float32, device, backend, fused_alias=True)


@pytest.mark.parametrize("case", [FEATURE_CASES[0], GEOMETRY_CASES[13]], ids=Case.id)
def test_return_lse_false_returns_tensor(cpu_backend, case):
    device, backend = cpu_backend
    q, k, v, ak, av = make_inputs(case, torch.float32, device, requires_grad=False)
    kw = call_args(case)
    if case.scale is not None:
        kw["scale"] = case.scale
    if case.extra:
        kw.update(additional_keys=ak, additional_values=av)
    out = op_for_rank(case.rank)(q, k, v, backend=backend, **kw)
    assert isinstance(out, torch.Tensor), f"return_lse=False must return a tensor, got {type(out)}"
    r = case.rank
    ref, _ = reference_na(
        q, k, v, as_tuple(case.kernel, r), as_tuple(case.stride, r), as_tuple(case.dilation, r),
        as_tuple(case.causal, r), scale=case.scale, additional_keys=ak, additional_values=av,
    )
    assert_close(out, ref, 1e-5)


@pytest.mark.parametrize("case", [GEOMETRY_CASES[4], GEOMETRY_CASES[16], GEOMETRY_CASES[20]], ids=Case.id)
def test_backend_none_on_cpu(case):
    check_fused(case, torch.float32, "cpu", None)


def test_no_grad_and_inference_mode(cpu_backend):
    device, backend = cpu_backend
    case = Case((6, 7), (3, 2), stride=(2, 1), causal=(False, True), extra=2)
    q, k, v, ak, av = make_inputs(case, torch.float32, device, requires_grad=True)
    ref, _ = reference_na(q.detach(), k.detach(), v.detach(), (3, 2), (2, 1), 1, (False, True),
                          additional_keys=ak.detach(), additional_values=av.detach())
    with torch.no_grad():
        o1 = op_for_rank(2)(q, k, v, backend=backend, additional_keys=ak, additional_values=av, **call_args(case))
    assert not o1.requires_grad
    assert_close(o1, ref, 1e-5)
    with torch.inference_mode():
        o2 = op_for_rank(2)(q.detach(), k.detach(), v.detach(), backend=backend, additional_keys=ak.detach(),
                            additional_values=av.detach(), **call_args(case))
    assert_close(o2, ref, 1e-5)


def test_repeated_calls_are_fresh(cpu_backend):
    """A second call with different inputs of the same shape must not reuse stale
    buffers or cached results."""
    device, backend = cpu_backend
    case = Case((10, 9), (3, 4), dilation=(2, 1))
    op = op_for_rank(2)
    for _ in range(2):
        q, k, v, _, _ = make_inputs(case, torch.float32, device, requires_grad=False)
        out = op(q, k, v, backend=backend, **call_args(case))
        ref, _ = reference_na(q, k, v, (3, 4), 1, (2, 1), False)
        assert_close(out, ref, 1e-5)


# ---------------------------------------------------------------------------
# Tile shapes (CPU accepts any positive tile shape of the right rank)
# ---------------------------------------------------------------------------

TILE_PARAMS = [
    pytest.param(r, qt, kt, id=f"{r}d-q{'x'.join(map(str, qt))}-kv{'x'.join(map(str, kt))}")
    for r in (1, 2, 3)
    for qt, kt in tile_combos(r)
]


@pytest.mark.parametrize("rank,q_tile,kv_tile", TILE_PARAMS)
def test_tile_shapes_do_not_change_results(cpu_backend, rank, q_tile, kv_tile):
    device, backend = cpu_backend
    if backend != "cpu":
        pytest.skip("tile shapes are backend-specific; the free-form check is for the cpu backend")
    check_fused(
        TILE_CASES[rank], torch.float32, device, backend,
        extra_kwargs=dict(q_tile_shape=q_tile, kv_tile_shape=kv_tile),
    )


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_backward_tile_shapes(cpu_backend, rank):
    device, backend = cpu_backend
    if backend != "cpu":
        pytest.skip("tile shapes are backend-specific")
    t = {1: ((4,), (5,), (3,), (2,)), 2: ((2, 3), (3, 2), (1, 4), (4, 1)), 3: ((1, 2, 3), (3, 2, 1), (2, 2, 2), (1, 1, 4))}[rank]
    check_fused(
        TILE_CASES[rank], torch.float32, device, backend,
        extra_kwargs=dict(q_tile_shape=t[0], kv_tile_shape=t[1], backward_q_tile_shape=t[2], backward_kv_tile_shape=t[3]),
    )


# ---------------------------------------------------------------------------
# gradcheck (float64, tiny)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,kw,Hkv,extra",
    [
        ((6,), dict(kernel_size=3, dilation=2), 1, 2),
        ((3, 4), dict(kernel_size=(2, 3), stride=(1, 2), is_causal=(True, False)), 2, 2),
        ((2, 2, 3), dict(kernel_size=2, stride=(1, 1, 2), is_causal=(False, True, False)), 1, 1),
    ],
    ids=["1d", "2d", "3d"],
)
def test_gradcheck(cpu_backend, shape, kw, Hkv, extra):
    device, backend = cpu_backend
    r = len(shape)
    op = op_for_rank(r)
    H, D = 2, 3

    def rnd(*s):
        return torch.randn(*s, dtype=torch.float64, device=device, requires_grad=True)

    if r == 3:
        H, D = 1, 2
    q = rnd(1, *shape, H, D)
    k = rnd(1, *shape, Hkv, D)
    v = rnd(1, *shape, Hkv, 2)
    ak = rnd(1, extra, Hkv, D)
    av = rnd(1, extra, Hkv, 2)

    def f(q, k, v, ak, av):
        return op(q, k, v, backend=backend, additional_keys=ak, additional_values=av, **kw)

    assert torch.autograd.gradcheck(f, (q, k, v, ak, av), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    "case",
    [Case((12,), 4, stride=2, dilation=2, extra=3, H=4, Hkv=2), Case((6, 7), (3, 2), causal=(True, False), D=8)],
    ids=Case.id,
)
def test_lse_backward(cpu_backend, case):
    """The returned LSE is part of the autograd graph (merge_attentions relies on it):
    d(sum(w * lse)) w.r.t. query/key/additional_keys vs the oracle."""
    device, backend = cpu_backend
    q, k, v, ak, av = make_inputs(case, torch.float32, device)
    kw = call_args(case)
    if case.extra:
        kw.update(additional_keys=ak, additional_values=av)
    out, lse = op_for_rank(case.rank)(q, k, v, backend=backend, return_lse=True, **kw)
    assert lse.requires_grad, "lse returned with return_lse=True does not require grad (detached from q/k)"
    w = torch.randn(lse.shape)
    (lse * w.to(lse.dtype)).sum().backward()
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (q, k, v, ak, av)]
    r = case.rank
    _, ref_lse = reference_na(*leaves[:3], as_tuple(case.kernel, r), as_tuple(case.stride, r),
                              as_tuple(case.dilation, r), as_tuple(case.causal, r),
                              additional_keys=leaves[3], additional_values=leaves[4])
    (ref_lse * w.double()).sum().backward()
    for name, t, lf in zip(("query", "key", "additional_keys"), (q, k, ak), (leaves[0], leaves[1], leaves[3])):
        if t is not None:
            assert_close(t.grad, lf.grad, 1e-5, f"lse grad {name}")


# ---------------------------------------------------------------------------
# Long sweeps
# ---------------------------------------------------------------------------


@pytest.mark.skipif(not LONG_TESTS, reason="set NATTEN_LONG_TESTS=1")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", LONG_CASES, ids=Case.id)
def test_long(cpu_backend, case, dtype):
    device, backend = cpu_backend
    check_fused(case, dtype, device, backend)


@pytest.mark.skipif(not LONG_TESTS, reason="set NATTEN_LONG_TESTS=1")
@pytest.mark.parametrize("seed", range(40))
def test_long_random_configs(cpu_backend, seed):
    import random

    device, backend = cpu_backend
    rng = random.Random(seed)
    rank = rng.randint(1, 3)
    shape, ks, ss, ds, cs = [], [], [], [], []
    for _ in range(rank):
        L = rng.randint(1, {1: 40, 2: 14, 3: 7}[rank])
        d = rng.randint(1, max(1, min(3, L)))
        k = rng.randint(1, L // d)
        s = rng.randint(1, k)
        shape.append(L), ks.append(k), ss.append(s), ds.append(d), cs.append(rng.random() < 0.4)
    H = rng.choice([1, 2, 4])
    Hkv = rng.choice([h for h in (1, 2, 4) if H % h == 0])
    case = Case(tuple(shape), tuple(ks), tuple(ss), tuple(ds), tuple(cs), B=rng.randint(1, 2), H=H, Hkv=Hkv,
                D=rng.choice([8, 16, 32]), Dv=rng.choice([None, 8, 24]), extra=rng.choice([0, 0, 3]),
                noncontig=rng.random() < 0.3)
    check_fused(case, rng.choice(DTYPES), device, backend)
