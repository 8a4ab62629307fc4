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
