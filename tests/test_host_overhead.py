"""The per-call planning caches (backend choice, tile shapes) and the packed operator
arguments: cached calls behave as uncached ones did."""

import pytest
import torch

import natten
from natten import backends, ops
from natten._checks import check_fused


def _qkv(shape=(1, 9, 7, 2, 8)):
    return [torch.randn(*shape) for _ in range(3)]


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


def _run(q, k, v, ek, ev, d_out, d_lse, use_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, ek, ev)]
    out, lse = natten.na2d(*leaves[:3], kernel_size=(3, 5), dilation=(2, 1), is_causal=(True, False),
                           additional_keys=leaves[3], additional_values=leaves[4], backend="cpu",
                           return_lse=True)
    loss = (lse * d_lse).sum() + ((out * d_out).sum() if use_out else 0)
    loss.backward()
    return [out.detach(), lse.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("use_out", [True, False], ids=["out+lse", "lse-only"])
def test_eager_calls_match_the_operator(monkeypatch, use_out):
    q, k, v = _qkv((2, 9, 7, 2, 8))
    ek, ev = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)
    d_out, d_lse = torch.randn_like(q), torch.randn(2, 9, 7, 2)
    calls = []
    real = ops.fna_forward
    monkeypatch.setattr(ops, "fna_forward", lambda *a: calls.append(1) or real(*a))
    eager = _run(q, k, v, ek, ev, d_out, d_lse, use_out)
    assert not calls, "an eager call went through the operator layer"
    with _Intercept():
        traced = _run(q, k, v, ek, ev, d_out, d_lse, use_out)
    assert calls, "a call under a function mode skipped the operator"
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fake_tensors_take_the_operator():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = _qkv()
        out = natten.na2d(q, k, v, kernel_size=3, backend="cpu")
    assert out.shape == q.shape


def test_outputs_start_poisoned():
    # The suite's guard against unwritten outputs: kernels write into NaN-filled buffers.
    from natten.backends.base import new_output

    assert new_output((3, 2), torch.float32, torch.device("cpu")).isnan().all()
