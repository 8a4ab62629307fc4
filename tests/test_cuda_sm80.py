"""cutlass-fna (the sm80 family) on problems large enough for many query boxes, long key walks,
fully visible (mask-free) key boxes and padded head dims, for every instantiated tile pair,
against the float64 oracle. The small feature cases run through test_cuda_fused.py."""

import pytest
import torch

from fused_checks import Case, check_fused, dtype_id


def _backend():
    if not torch.cuda.is_available():
        return None
    from natten import backends

    b = backends._BACKENDS.get("cutlass-fna")
    return b if b is not None and b.is_available() else None


def _forward_configs():
    try:
        from natten._manifest import INSTANTIATIONS
    except ImportError:
        return []
    return sorted({(r[2], r[5], r[6]) for r in INSTANTIATIONS if r[0] == "sm80" and r[1] == "fna_fwd"})


pytestmark = pytest.mark.skipif(_backend() is None, reason="cutlass-fna needs a CUDA build and GPU")

DTYPES = [torch.float16, torch.bfloat16, torch.float32]  # float32: TF32 tensor cores

LARGE_CASES = [
    Case((300,), 65, D=64, H=2),
    Case((257,), 128, stride=8, causal=True, D=128, extra=70),
    Case((24, 40), (9, 13), D=64, B=2, H=2, Hkv=1),
    Case((20, 24), (7, 9), D=32, scale=-0.4),  # a negative scale flips which scores are large
    Case((33, 20), (16, 8), dilation=(2, 1), stride=(2, 2), D=32, extra=5),
    Case((40, 36), (21, 19), D=48, Dv=32, H=1),  # head dim padded to 64
    Case((10, 12, 20), (5, 4, 9), causal=(True, False, False), D=128),
    Case((12, 9, 16), (4, 3, 7), dilation=(2, 3, 1), stride=(2, 1, 3), D=64, Dv=32),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", LARGE_CASES, ids=Case.id)
def test_large(case, dtype):
    check_fused(case, dtype, "cuda", "cutlass-fna")


CONFIG_CASES = {
    1: Case((200,), 33, stride=3, dilation=2, extra=3, D=32, H=2, Hkv=1),
    2: Case((30, 27), (11, 8), stride=(2, 1), dilation=(1, 2), causal=(False, True), D=64),
    3: Case((9, 18, 20), (3, 7, 9), stride=(1, 2, 1), causal=(True, False, False), D=32),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("config", _forward_configs(), ids=lambda c: f"{c[0]}d-q{c[1]}-kv{c[2]}")
def test_every_forward_tile_pair(config, dtype):
    rank, q_tile, kv_tile = config
    check_fused(CONFIG_CASES[rank], dtype, "cuda", "cutlass-fna", grad=False,
                extra_kwargs={"q_tile_shape": q_tile, "kv_tile_shape": kv_tile})


def test_default_tiles_follow_the_rule():
    from natten._checks import FusedProblem, Window
    from natten.backends import sm80

    window = Window((32, 32), (1, 1), (1, 1), (False, False))
    problem = FusedProblem(window, (128, 128), 1, 16, 16, 128, 128, 0, torch.bfloat16,
                           torch.device("cuda"), False)
    q, kv = _backend().default_tiles(problem, backward=False)
    costs = {c: sm80.walk_cost(problem, *c) for c in sm80.configs(problem, False)}
    assert sm80.walk_cost(problem, q, kv) == min(costs.values())


# Head dim 256 has forward kernels only (64-query boxes); 136..256 pad up to it.
HEAD_DIM_256_CASES = [
    Case((20, 24), (7, 9), D=256, H=2, Hkv=1),
    Case((300,), 65, dilation=2, D=200, Dv=136, extra=9),
    Case((6, 10, 12), (3, 5, 4), causal=(False, True, False), D=256),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", HEAD_DIM_256_CASES, ids=Case.id)
def test_head_dim_256_forward(case, dtype):
    check_fused(case, dtype, "cuda", "cutlass-fna", grad=False)


def test_head_dim_256_gradients_take_another_backend():
    import natten

    q, k, v = (torch.randn(1, 12, 16, 1, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    with pytest.raises(ValueError, match="backward"):
        natten.na2d(q, k, v, kernel_size=5, backend="cutlass-fna")
    check_fused(Case((12, 16), 5, D=256), torch.bfloat16, "cuda", None)


def test_float32_backend_none_follows_torch_tf32_setting():
    from natten import _plan

    q = torch.randn(1, 16, 16, 2, 32, device="cuda")
    def chosen():
        return _plan.plan(True, 2, q, q, q, None, None, 5, 1, 1, False, None, None, None, None,
                          None, None).backend.name
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert chosen() != "cutlass-fna"
        torch.set_float32_matmul_precision("high")
        assert chosen() == "cutlass-fna"
    finally:
        torch.set_float32_matmul_precision(saved)
