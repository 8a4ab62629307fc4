"""The per-call planning caches (plans of eager calls, backend choice, tile shapes), the eager
path beside the operators and the packed operator arguments: cached calls behave as uncached
ones did."""

import contextlib
import math
from dataclasses import replace

import pytest
import torch

import natten
from natten import _plan, backends, ops
from natten._checks import check_fused


def _qkv(shape=(1, 9, 7, 2, 8)):
    return [torch.randn(*shape) for _ in range(3)]


@contextlib.contextmanager
def _no_plans():
    """An empty cache of eager plans; the suite's plans come back after."""
    saved = dict(_plan._PLANS)
    _plan._PLANS.clear()
    try:
        yield
    finally:
        _plan._PLANS.clear()
        _plan._PLANS.update(saved)


def test_errors_repeat_after_a_cached_plan():
    q, k, v = _qkv()
    natten.na2d(q, k, v, kernel_size=3, backend="cpu")
    for _ in range(2):
        with pytest.raises(ValueError, match="q_tile_shape"):
            natten.na2d(q, k, v, kernel_size=3, backend="cpu", q_tile_shape=(4, 0))
        with pytest.raises(ValueError, match="unknown"):
            natten.na2d(q, k, v, kernel_size=3, backend="nope")
        with pytest.raises(TypeError, match="backend"):
            natten.na2d(q, k, v, kernel_size=3, backend=["cpu"])


# (valid arguments, then arguments equal to them in Python that validation rejects)
_LOOKALIKES = [
    (dict(kernel_size=1), dict(kernel_size=True), "kernel_size"),
    (dict(kernel_size=3), dict(kernel_size=3.0), "kernel_size"),
    (dict(kernel_size=(3, 3)), dict(kernel_size=(3, 3.0)), "kernel_size"),
    (dict(kernel_size=[3, 1]), dict(kernel_size=[3, True]), "kernel_size"),
    (dict(kernel_size=3, stride=1), dict(kernel_size=3, stride=1.0), "stride"),
    (dict(kernel_size=3, dilation=(1, 2)), dict(kernel_size=3, dilation=(True, 2)), "dilation"),
    (dict(kernel_size=3, is_causal=False), dict(kernel_size=3, is_causal=0), "is_causal"),
    (dict(kernel_size=3, is_causal=(True, False)), dict(kernel_size=3, is_causal=(1, 0)), "is_causal"),
    (dict(kernel_size=3, scale=1), dict(kernel_size=3, scale=True), "scale"),
    (dict(kernel_size=3, q_tile_shape=(4, 4)), dict(kernel_size=3, q_tile_shape=(4.0, 4)), "q_tile_shape"),
    (dict(kernel_size=3, backward_kv_tile_shape=8), dict(kernel_size=3, backward_kv_tile_shape=8.0),
     "backward_kv_tile_shape"),
]


@pytest.mark.parametrize("valid, lookalike, name", _LOOKALIKES, ids=[c[2] for c in _LOOKALIKES])
def test_lookalike_arguments_fail_after_a_cached_plan(valid, lookalike, name):
    q, k, v = _qkv()
    with _no_plans():
        natten.na2d(q, k, v, backend="cpu", **valid)
        assert len(_plan._PLANS) == 1
        for _ in range(2):
            with pytest.raises(TypeError, match=name):
                natten.na2d(q, k, v, backend="cpu", **lookalike)


def test_mismatched_tensors_fail_after_a_cached_plan():
    q, k, v = _qkv()
    natten.na2d(q, k, v, kernel_size=3)
    with pytest.raises(ValueError, match="key"):
        natten.na2d(q, k.double(), v, kernel_size=3)
    with pytest.raises(ValueError, match="value"):
        natten.na2d(q, k, v[:, :8], kernel_size=3)
    with pytest.raises(ValueError, match="additional_keys"):
        natten.na2d(q, k, v, kernel_size=3, additional_keys=torch.randn(1, 2, 2, 8))


def _counting_checks(monkeypatch):
    calls = []
    real = _plan.check_fused
    monkeypatch.setattr(_plan, "check_fused", lambda *a: calls.append(1) or real(*a))
    return calls


def test_a_repeated_call_reuses_its_plan(monkeypatch):
    q, k, v = _qkv()
    calls = _counting_checks(monkeypatch)
    with _no_plans():
        first = natten.na2d(q, k, v, kernel_size=(3, 5), dilation=[2, 1])
        second = natten.na2d(q, k, v, kernel_size=(3, 5), dilation=(2, 1))
    assert len(calls) == 1, "a repeated call validated again instead of reusing its plan"
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# Calls that differ from a cached first call only in something its plan depends on.
def _variants():
    q, k, v = _qkv()
    base = dict(kernel_size=3)
    yield "dtype", (q.double(), k.double(), v.double()), base
    yield "spatial", (q[:, :7].contiguous(), k[:, :7].contiguous(), v[:, :7].contiguous()), base
    yield "head_dim", (q[..., :4].contiguous(), k[..., :4].contiguous(), v), base
    yield "value_dim", (q, k, v[..., :4].contiguous()), base
    yield "heads", (torch.randn(1, 9, 7, 4, 8), k, v), base
    yield "heads_kv", (q, k[..., :1, :].contiguous(), v[..., :1, :].contiguous()), base
    yield "batch", [t.expand(2, -1, -1, -1, -1) for t in (q, k, v)], base
    yield "window", (q, k, v), dict(kernel_size=(3, 5), is_causal=(False, True))
    yield "scale", (q, k, v), dict(kernel_size=3, scale=0.5)
    yield "extra", (q, k, v), dict(kernel_size=3, additional_keys=torch.randn(1, 3, 2, 8),
                                  additional_values=torch.randn(1, 3, 2, 8))


@pytest.mark.parametrize("variant", [name for name, _, _ in _variants()])
def test_a_cached_plan_follows_what_changes(variant):
    name, tensors, kwargs = next(c for c in _variants() if c[0] == variant)
    q, k, v = _qkv()
    natten.na2d(q, k, v, kernel_size=3, return_lse=True)  # cache the plan of the first call
    cached = natten.na2d(*tensors, **kwargs, return_lse=True)
    with _no_plans():
        fresh = natten.na2d(*tensors, **kwargs, return_lse=True)
    for a, b in zip(cached, fresh):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_cached_plan_follows_requires_grad_and_grad_mode():
    q, k, v = _qkv()
    d_out = torch.randn_like(q)
    natten.na2d(q, k, v, kernel_size=3)  # no tensor requires grad
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with torch.no_grad():
        assert natten.na2d(*leaves, kernel_size=3).grad_fn is None
    out = natten.na2d(*leaves, kernel_size=3)
    assert out.grad_fn is not None, "a call needing gradients reused a plan without them"
    grads = torch.autograd.grad(out, leaves, d_out)
    assert all(g is not None and g.shape == t.shape for g, t in zip(grads, leaves))
    with _no_plans():
        fresh = torch.autograd.grad(natten.na2d(*leaves, kernel_size=3), leaves, d_out)
    for a, b in zip(grads, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert natten.na2d(q, k, leaves[2], kernel_size=3).grad_fn is not None


def test_the_plan_cache_stays_bounded(monkeypatch):
    monkeypatch.setattr(_plan, "_MAX_PLANS", 3)
    with _no_plans():
        for L in range(3, 10):
            x = torch.randn(1, L, 1, 8)
            natten.na1d(x, x, x, kernel_size=3)
            assert 1 <= len(_plan._PLANS) <= 3


def test_second_derivatives_fail_loudly():
    q, k, v = [t.requires_grad_(True) for t in _qkv()]
    d_out = torch.randn_like(q).requires_grad_(True)
    d_q, = torch.autograd.grad(natten.na2d(q, k, v, kernel_size=3), q, d_out, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        d_q.sum().backward()


def test_resolved_tiles_match_the_backend():
    q, k, v = _qkv()
    problem, _ = check_fused(2, q, k, v, (3, 5), 1, (2, 1), (True, False), None, None, None)
    for name in backends.names_for_device("cpu"):
        impl = backends.get(name)
        for backward in (False, True):
            dq, dkv = impl.default_tiles(problem, backward)
            assert backends.resolve_tiles(impl, problem, None, None, backward) == (
                dq, dkv, impl.check_tiles(problem, dq, dkv, backward))
            assert backends.resolve_tiles(impl, problem, (4, 4), None, backward)[:2] == ((4, 4), dkv)


def test_window_round_trips_through_the_operator_argument():
    q, k, v = _qkv()
    problem, _ = check_fused(2, q, k, v, (3, 5), (2, 1), (1, 1), (True, False), None, None, None)
    assert ops._window(ops.pack_window(problem.window)) == problem.window


class _Intercept(torch.overrides.TorchFunctionMode):
    """Any active function mode sends natten calls through the registered operator."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _run(tensors, d_out, d_lse, use_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    extra = dict(additional_keys=leaves[3], additional_values=leaves[4]) if len(leaves) > 3 else {}
    out, lse = natten.na2d(*leaves[:3], kernel_size=(3, 5), dilation=(2, 1), is_causal=(True, False),
                           backend="cpu", return_lse=True, **extra)
    loss = (lse * d_lse).sum() + ((out * d_out).sum() if use_out else 0)
    loss.backward()
    return [out.detach(), lse.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("extra", [True, False], ids=["extra-kv", "no-extra-kv"])
@pytest.mark.parametrize("use_out", [True, False], ids=["out+lse", "lse-only"])
def test_eager_calls_match_the_operator(monkeypatch, use_out, extra):
    q, k, v = _qkv((2, 9, 7, 2, 8))
    tensors = [q, k, v] + ([torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)] if extra else [])
    d_out, d_lse = torch.randn_like(q), torch.randn(2, 9, 7, 2)
    calls = []
    real = ops.fna_forward
    monkeypatch.setattr(ops, "fna_forward", lambda *a: calls.append(1) or real(*a))
    eager = _run(tensors, d_out, d_lse, use_out)
    assert not calls, "an eager call went through the operator layer"
    with _Intercept():
        traced = _run(tensors, d_out, d_lse, use_out)
    assert calls, "a call under a function mode skipped the operator"
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_eager_outputs_match_the_operator_without_gradients():
    q, k, v = _qkv()
    with torch.no_grad():
        eager = natten.na2d(q, k, v, kernel_size=3, return_lse=True)
        with _Intercept():
            traced = natten.na2d(q, k, v, kernel_size=3, return_lse=True)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fake_tensors_take_the_operator():
    from torch._subclasses.fake_tensor import FakeTensorMode

    plans = dict(_plan._PLANS)
    with FakeTensorMode():
        q, k, v = _qkv((1, 5, 11, 2, 8))
        out = natten.na2d(q, k, v, kernel_size=3, backend="cpu")
    assert out.shape == q.shape
    assert _plan._PLANS == plans, "a traced call cached a plan"


def test_outputs_start_poisoned():
    # The suite's guard against unwritten outputs: kernels write into NaN-filled buffers.
    from natten.backends.base import new_output, output_like

    like = torch.zeros(2, 3, dtype=torch.float16)
    made = [output_like(like), new_output(like, 3, 2), new_output(like, 4, dtype=torch.float64)]
    assert [(t.shape, t.dtype) for t in made] == [((2, 3), torch.float16), ((3, 2), torch.float16),
                                                  ((4,), torch.float64)]
    assert all(t.isnan().all() for t in made)
    assert not math.isnan(like.sum().item())


def test_float32_passes_over_tf32_kernels_unless_torch_allows_tf32():
    # Decided per call (torch's setting may change between calls); run on the CPU by asking the
    # cutlass-fna backend directly.
    from natten._checks import FusedProblem, Window
    from natten.backends.sm80 import Sm80Backend

    window = Window((3, 3), (1, 1), (1, 1), (False, False))
    problem = FusedProblem(window, (8, 8), 1, 2, 2, 32, 32, 0, torch.float32, torch.device("cuda"), False)
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert "TF32" in Sm80Backend().passed_over(problem)
        torch.set_float32_matmul_precision("high")
        assert Sm80Backend().passed_over(problem) is None
        assert Sm80Backend().passed_over(replace(problem, dtype=torch.bfloat16)) is None
    finally:
        torch.set_float32_matmul_precision(saved)


def test_memoized_planning_takes_unhashable_arguments():
    # Fake-tensor propagation under torch.compile(dynamic=True) hands some torch versions'
    # operators SymInts, which cannot be hashed: the planning cache must run the function instead.
    from natten._memo import memoize

    calls = []

    @memoize
    def area(sizes):
        calls.append(sizes)
        return sizes[0] * sizes[1]

    assert area((3, 4)) == area((3, 4)) == 12 and len(calls) == 1
    assert area([3, 4]) == area([3, 4]) == 12 and len(calls) == 3
