"""The tiled kernel families (autogen/registry.py), each through its backend, on problems large
enough for many query boxes, long key walks, fully visible (mask-free) key boxes and padded head
dims, for every instantiated tile pair, against the float64 oracle. The small feature cases run
through test_cuda_fused.py.

Parameters come from the registry (the families, their dtypes) and from the build's manifest (the
tile pairs), not from the backends that loaded: a family that the build compiled for this GPU but
whose backend is missing fails here instead of yielding no tests."""

import pytest
import torch

from autogen import registry
from fused_checks import Case, check_fused, dtype_id

# Families whose kernels are not written yet: their backend must decline every problem, saying so.
WITHOUT_KERNELS = {"sm90"}

TILED = [f for f in registry.FAMILIES if f.tiled]
WITH_KERNELS = [f for f in TILED if f.name not in WITHOUT_KERNELS]


def _manifest():
    try:
        import natten._manifest as manifest
    except ImportError:
        return None
    return manifest


def _runs_here(family) -> bool:
    """Whether the build compiled the family for this GPU."""
    manifest = _manifest()
    if not torch.cuda.is_available() or manifest is None:
        return False
    capability = ".".join(map(str, torch.cuda.get_device_capability()))
    return capability in family.targets(manifest.ARCHS.get(family.name, ()))


def _backend(family):
    """The family's backend, skipping where the build did not compile the family for this GPU
    (and failing where it did but the backend is not available)."""
    if not _runs_here(family):
        pytest.skip(f"the build has no {family.name} kernels for this GPU (needs a CUDA build and GPU)")
    from natten import backends

    available = backends.names_for_device("cuda")
    assert family.backend in available, f"{family.backend} did not load although {family.name} was built"
    return family.backend


def _forward_configs(family):
    """(rank, query box, key box) of the family's forward instantiations in the build."""
    manifest = _manifest()
    rows = manifest.INSTANTIATIONS if manifest is not None else ()
    return sorted({(r.rank, r.q_tile, r.kv_tile) for r in rows
                   if r.family == family.name and r.op == "fna_fwd"})


def _family_dtypes(families):
    return [pytest.param(f, getattr(torch, d), id=f"{f.name}-{d}") for f in families for d in f.dtypes]


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


@pytest.mark.parametrize("family,dtype", _family_dtypes(WITH_KERNELS))
@pytest.mark.parametrize("case", LARGE_CASES, ids=Case.id)
def test_large(family, dtype, case):
    check_fused(case, dtype, "cuda", _backend(family))


CONFIG_CASES = {
    1: Case((200,), 33, stride=3, dilation=2, extra=3, D=32, H=2, Hkv=1),
    2: Case((30, 27), (11, 8), stride=(2, 1), dilation=(1, 2), causal=(False, True), D=64),
    3: Case((9, 18, 20), (3, 7, 9), stride=(1, 2, 1), causal=(True, False, False), D=32),
}


def _config_params():
    params = []
    for family in WITH_KERNELS:
        for dtype in family.dtypes:
            for rank, q, kv in _forward_configs(family):
                params.append(pytest.param(family, getattr(torch, dtype), q, kv,
                                           id=f"{family.name}-{dtype}-{rank}d-q{q}-kv{kv}"))
    return params or [pytest.param(None, None, None, None, id="no-tiled-build",
                                   marks=pytest.mark.skip(reason="the build has no tiled kernels"))]


@pytest.mark.parametrize("family,dtype,q_tile,kv_tile", _config_params())
def test_every_forward_tile_pair(family, dtype, q_tile, kv_tile):
    backend = _backend(family)
    check_fused(CONFIG_CASES[len(q_tile)], dtype, "cuda", backend, grad=False,
                extra_kwargs={"q_tile_shape": q_tile, "kv_tile_shape": kv_tile})


@pytest.mark.parametrize("family", [f for f in TILED if f.name in WITHOUT_KERNELS], ids=lambda f: f.name)
def test_family_without_kernels_declines_with_the_reason(family):
    import natten

    _backend(family)
    q = torch.randn(1, 12, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"{family.backend} supports no problem yet"):
        natten.na2d(q, q, q, kernel_size=5, backend=family.backend)
    # Its entry points exist, and decline too (through the family's error path).
    from natten import _C
    from natten._manifest import Key

    row = next(r for r in _manifest().INSTANTIATIONS if r.family == family.name and r.op == "fna_fwd"
               and r.rank == 2 and r.dtype == "bfloat16")
    fields = Key(*row)._asdict()
    kernel = _C.find_tiled_kernel(fields.pop("family"), fields.pop("op"), fields)
    window = _C.Window([5, 5], [1, 1], [1, 1], [False, False])
    out, lse = torch.empty_like(q), torch.empty(q.shape[:-1], device="cuda")
    with pytest.raises(ValueError, match="not implemented"):
        _C.tiled_fna_forward(q, q, q, None, None, window, 0.125, kernel, out, lse)


@pytest.mark.parametrize("family", WITH_KERNELS, ids=lambda f: f.name)
def test_lookup_miss_names_the_key_in_words(family):
    _backend(family)
    from natten import _C

    key = {"rank": 2, "dtype": "bfloat16", "head_dim": 128, "q_tile": [3, 5], "kv_tile": [8, 8]}
    with pytest.raises(RuntimeError, match="rank 2, bfloat16, head dim 128, query box 3x5, key box 8x8"):
        _C.find_tiled_kernel(family.name, "fna_fwd", key)


# Head dim 256 has forward kernels only (64-query boxes); 136..256 pad up to it.
HEAD_DIM_256_CASES = [
    Case((20, 24), (7, 9), D=256, H=2, Hkv=1),
    Case((300,), 65, dilation=2, D=200, Dv=136, extra=9),
    Case((6, 10, 12), (3, 5, 4), causal=(False, True, False), D=256),
]
SM80 = next(f for f in registry.FAMILIES if f.name == "sm80")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", HEAD_DIM_256_CASES, ids=Case.id)
def test_sm80_head_dim_256_forward(case, dtype):
    check_fused(case, dtype, "cuda", _backend(SM80), grad=False)


def test_sm80_head_dim_256_gradients_take_another_backend():
    import natten

    _backend(SM80)
    q, k, v = (torch.randn(1, 12, 16, 1, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    with pytest.raises(ValueError, match="backward"):
        natten.na2d(q, k, v, kernel_size=5, backend="cutlass-fna")
    check_fused(Case((12, 16), 5, D=256), torch.bfloat16, "cuda", None)


def test_sm80_float32_backend_none_follows_torch_tf32_setting():
    from natten import _plan

    _backend(SM80)
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
