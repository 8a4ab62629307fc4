"""The tiled kernel families (autogen/registry.py), each through its backend, on problems large
enough for many query boxes, long key walks, fully visible (mask-free) key boxes and padded head
dims, for every instantiated tile pair, against the float64 oracle, with gradients wherever the
build has the family's backward kernels. The small feature cases run through test_cuda_fused.py,
and here for the families a build has forward kernels only of (which that file skips: its cases
take gradients).

Parameters come from the registry (the families, their dtypes) and from the build's manifest (the
tile pairs, which ops were built), not from the backends that loaded: a family that the build
compiled for this GPU but whose backend is missing fails here instead of yielding no tests, and so
does a backend that refuses a case its build has the kernels for.

The rules of hopper-fna (what it declines, when backend=None prefers it) are checked without a GPU
too, against the registry's instantiations."""

import pytest
import torch

from autogen import registry
from conftest import assert_close, tolerance
from fused_checks import DTYPE_CASES, FEATURE_CASES, GEOMETRY_CASES, Case, check_fused, op_for_rank
from oracle import reference_na

TILED = [f for f in registry.FAMILIES if f.tiled]


def _family(name):
    return next(f for f in registry.FAMILIES if f.name == name)


def _manifest():
    try:
        import natten._manifest as manifest
    except ImportError:
        return None
    return manifest


def _rows(family, op):
    """The build's instantiations of one op of the family (none without a manifest)."""
    manifest = _manifest()
    return [r for r in (manifest.INSTANTIATIONS if manifest is not None else ())
            if r.family == family.name and r.op == op]


FORWARD_ONLY = [f for f in TILED if not _rows(f, "fna_bwd")]
SM80, SM90 = _family("sm80"), _family("sm90")


def _runs_here(family) -> bool:
    """Whether the build compiled the family for this GPU."""
    manifest = _manifest()
    if not torch.cuda.is_available() or manifest is None:
        return False
    capability = ".".join(map(str, torch.cuda.get_device_capability()))
    return capability in family.targets(manifest.ARCHS.get(family.name, ()))


def _built(family, rank: int, dtype: torch.dtype, head_dim: int = 0, op: str = "fna_fwd") -> bool:
    """Whether the build has kernels of the op of the family for the rank and dtype at a head dim
    that holds `head_dim` (a build's kernel filter may leave some out)."""
    name = str(dtype).replace("torch.", "")
    return any(r.rank == rank and r.dtype == name and (r.head_dim or 0) >= head_dim
               for r in _rows(family, op))


def _backend(family, rank=None, dtype=None, head_dim=0):
    """The family's backend, skipping where the build did not compile the family for this GPU (or,
    given a rank and dtype, left out its kernels for them and the head dim), and failing where it
    did but the backend is not available."""
    if not _runs_here(family):
        pytest.skip(f"the build has no {family.name} kernels for this GPU (needs a CUDA build and GPU)")
    if rank is not None and not _built(family, rank, dtype, head_dim):
        pytest.skip(f"the build has no {family.name} forward kernels for rank {rank}, {dtype} and "
                    f"head dim {head_dim}")
    from natten import backends

    available = backends.names_for_device("cuda")
    assert family.backend in available, f"{family.backend} did not load although {family.name} was built"
    return family.backend


def _check_served(family, case, dtype, **tiles):
    """check_fused on the family's backend (gradients too where the build has the family's
    backward for the case), where a refusal fails: every case given here is one the backend must
    serve."""
    head_dim = max(case.D, case.Dv or case.D)
    backend = _backend(family, case.rank, dtype, head_dim)
    grad = _built(family, case.rank, dtype, head_dim, "fna_bwd")
    try:
        check_fused(case, dtype, "cuda", backend, grad=grad, extra_kwargs=tiles or None)
    except pytest.skip.Exception as e:
        pytest.fail(f"{backend} refused {case.id()} ({dtype}) although the build has its kernels: {e}")


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


@pytest.mark.parametrize("family,dtype", _family_dtypes(TILED))
@pytest.mark.parametrize("case", LARGE_CASES, ids=Case.id)
def test_large(family, dtype, case):
    _check_served(family, case, dtype)


CONFIG_CASES = {
    1: Case((200,), 33, stride=3, dilation=2, extra=3, D=32, H=2, Hkv=1),
    2: Case((30, 27), (11, 8), stride=(2, 1), dilation=(1, 2), causal=(False, True), D=64),
    3: Case((9, 18, 20), (3, 7, 9), stride=(1, 2, 1), causal=(True, False, False), D=32),
}


def _config_params(op):
    """(family, dtype, query box, key box) of the op's instantiations in the build."""
    params = []
    for family in TILED:
        configs = sorted({(r.rank, r.dtype, r.q_tile, r.kv_tile) for r in _rows(family, op)})
        for rank, dtype, q, kv in configs:
            params.append(pytest.param(family, getattr(torch, dtype), q, kv,
                                       id=f"{family.name}-{dtype}-{rank}d-q{q}-kv{kv}"))
    return params or [pytest.param(None, None, None, None, id=f"no-tiled-{op}",
                                   marks=pytest.mark.skip(reason=f"the build has no tiled {op} kernels"))]


@pytest.mark.parametrize("family,dtype,q_tile,kv_tile", _config_params("fna_fwd"))
def test_every_forward_tile_pair(family, dtype, q_tile, kv_tile):
    backend = _backend(family, len(q_tile), dtype)
    check_fused(CONFIG_CASES[len(q_tile)], dtype, "cuda", backend, grad=False,
                extra_kwargs={"q_tile_shape": q_tile, "kv_tile_shape": kv_tile})


@pytest.mark.parametrize("family,dtype,q_tile,kv_tile", _config_params("fna_bwd"))
def test_every_backward_tile_pair(family, dtype, q_tile, kv_tile):
    case = CONFIG_CASES[len(q_tile)]
    backend = _backend(family, case.rank, dtype, case.D)
    check_fused(case, dtype, "cuda", backend,
                extra_kwargs={"backward_q_tile_shape": q_tile, "backward_kv_tile_shape": kv_tile})


@pytest.mark.parametrize("family", TILED, ids=lambda f: f.name)
def test_lookup_miss_names_the_key_in_words(family):
    _backend(family)
    from natten import _C

    key = {"rank": 2, "dtype": "bfloat16", "head_dim": 128, "q_tile": [3, 5], "kv_tile": [8, 8]}
    with pytest.raises(RuntimeError, match="rank 2, bfloat16, head dim 128, query box 3x5, key box 8x8"):
        _C.find_tiled_kernel(family.name, "fna_fwd", key)


# ---------------------------------------------------------------------------------------------
# Families a build has forward kernels only of (a kernel filter's choice)
# ---------------------------------------------------------------------------------------------

# The small feature cases (borders, odd and even windows, stride, dilation, causal per axis, GQA,
# additional keys, mixed and padded head dims, non-contiguous inputs, batch > 1). hopper-fna
# declines exactly the 1-D ones whose dilation makes a 128-token box span more than a TMA box's
# 256 positions (dilation 3: 384; 5: 640), forward and backward alike.
SMALL_CASES = GEOMETRY_CASES + FEATURE_CASES + DTYPE_CASES
TMA_REFUSED = {"sm90": {"13-k3-s2-d3-c1-B2H2-D16", "20-k4-d5-B1H3-kv1-D16", "7-k2-s2-d3-c1-B1H2-D16-x1"}}


@pytest.mark.parametrize("family,dtype", _family_dtypes(FORWARD_ONLY))
@pytest.mark.parametrize("case", SMALL_CASES, ids=Case.id)
def test_forward_only_family_small_cases(family, dtype, case):
    if case.id() in TMA_REFUSED.get(family.name, ()):
        pytest.skip("declined by the family (test_tma_refused_cases)")
    _check_served(family, case, dtype)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("case", [c for c in SMALL_CASES if c.id() in TMA_REFUSED["sm90"]], ids=Case.id)
def test_tma_refused_cases(case, requires_grad):
    dtype = torch.bfloat16
    backend = _backend(SM90, case.rank, dtype)
    if requires_grad and not _built(SM90, case.rank, dtype, 64, "fna_bwd"):
        pytest.skip("the build has no hopper-fna backward kernels for the case")
    q = torch.randn(case.B, *case.shape, case.H, 64, device="cuda", dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(case.B, *case.shape, case.Hkv or case.H, 64, device="cuda", dtype=dtype)
    with pytest.raises(ValueError, match=r"more than the 256 of a TMA box"):
        op_for_rank(case.rank)(q, k, k, case.kernel, stride=case.stride, dilation=case.dilation,
                               is_causal=case.causal, backend=backend)


@pytest.mark.parametrize("family", FORWARD_ONLY, ids=lambda f: f.name)
def test_forward_only_family_under_torch_compile(family):
    """Under torch.compile(fullgraph=True) the plan leaves the tiles to the operator, which resolves
    them on concrete tensors; no gradients, so the backend serves the call."""
    import natten

    backend = _backend(family, 2, torch.bfloat16)
    kernel, dilation, causal = (7, 5), (2, 1), (False, True)
    q = torch.randn(1, 20, 30, 4, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 20, 30, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in "kv")

    def f(q, k, v):
        return natten.na2d(q, k, v, kernel, dilation=dilation, is_causal=causal, backend=backend,
                           return_lse=True)

    torch._dynamo.reset()
    out, lse = torch.compile(f, fullgraph=True)(q, k, v)
    ref_out, ref_lse = reference_na(*(t.cpu().double() for t in (q, k, v)), kernel, (1, 1), dilation,
                                    causal)
    tol = tolerance(torch.bfloat16, "cuda", backend)
    assert_close(out, ref_out, tol, "output")
    assert_close(lse, ref_lse, tol, "lse")


def test_backend_none_takes_hopper_for_gradients_where_it_takes_the_forward():
    """Measured forward and forward+backward alike (benchmarks/NOTES.md), hopper-fna's rule does
    not depend on whether gradients are needed; a call that needs them runs its backward."""
    from natten import _plan

    _backend(SM90, 2, torch.bfloat16)
    _backend(SM80, 2, torch.bfloat16)
    if not _built(SM90, 2, torch.bfloat16, 64, "fna_bwd"):
        pytest.skip("the build has no hopper-fna backward kernels for the case")
    q, k, v = (torch.randn(2, 128, 128, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))

    def chosen(*qkv):
        return _plan.plan(True, 2, *qkv, None, None, (16, 16), 1, 1, False, None, None, None, None,
                          None, None).backend.name

    assert chosen(q, k, v) == "hopper-fna"  # 65536 query rows
    assert chosen(q.detach(), k.detach(), v.detach()) == "hopper-fna"
    check_fused(Case((24, 20), (9, 16), D=64, H=2), torch.bfloat16, "cuda", None)


# (spatial, batch, heads, kernel, dilation, head dim) -> the backend backend=None takes for a
# bf16 call, with or without gradients; P1-P5 as in benchmarks/problems.py.
PREFERENCE = [
    pytest.param((32768,), 1, 16, (2048,), (1,), 128, "hopper-fna", id="P1"),
    pytest.param((128, 128), 1, 16, (32, 32), (1, 1), 128, "hopper-fna", id="P2"),
    pytest.param((16, 64, 64), 1, 16, (8, 16, 16), (1, 1, 1), 128, "hopper-fna", id="P3"),
    pytest.param((56, 56), 32, 4, (7, 7), (1, 1), 32, "cutlass-fna", id="P4"),
    pytest.param((56, 56), 32, 4, (7, 7), (8, 8), 32, "cutlass-fna", id="P5"),
    # 16 x 1024 query rows: under the 32K rows from which hopper-fna is preferred.
    pytest.param((32, 32), 1, 16, (16, 16), (1, 1), 128, "cutlass-fna", id="few-rows"),
    # 2-D boxes of 16 x 8 need dilation <= 8 per axis.
    pytest.param((128, 160), 1, 16, (12, 12), (1, 9), 128, "cutlass-fna", id="dilation-9"),
]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("spatial,batch,heads,kernel,dilation,dim,expected", PREFERENCE)
def test_backend_none_prefers_hopper_on_large_problems(spatial, batch, heads, kernel, dilation, dim,
                                                       expected, requires_grad):
    from natten import _plan

    _backend(SM90, len(spatial), torch.bfloat16)
    _backend(SM80, len(spatial), torch.bfloat16)
    if requires_grad and not _built(SM90, len(spatial), torch.bfloat16, 64, "fna_bwd"):
        pytest.skip("the build has no hopper-fna backward kernels for the case")
    q = torch.randn(batch, *spatial, heads, dim, device="cuda", dtype=torch.bfloat16,
                    requires_grad=requires_grad)
    chosen = _plan.plan(True, len(spatial), q, q, q, None, None, kernel, 1, dilation, False, None,
                        None, None, None, None, None).backend.name
    assert chosen == expected


def test_hopper_kernel_errors_are_clean():
    """What the problem cannot tell Python (pointer alignment), and a problem the backend would
    have declined passed to the kernel directly, raise ValueError from the kernel's checks."""
    import natten
    from natten import _C
    from natten._manifest import Key

    backend = _backend(SM90, 2, torch.bfloat16)
    shape, n = (1, 16, 16, 2, 64), 16 * 16 * 2 * 64
    misaligned = torch.randn(n + 8, device="cuda", dtype=torch.bfloat16)[1:n + 1].view(shape)
    assert misaligned.is_contiguous() and misaligned.data_ptr() % 16 != 0
    q = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="16-byte boundaries"):
        natten.na2d(misaligned, q, q, kernel_size=5, backend=backend)

    row = next(r for r in _manifest().INSTANTIATIONS if r.family == "sm90" and r.op == "fna_fwd"
               and r.rank == 2 and r.dtype == "bfloat16")
    fields = Key(*row)._asdict()
    kernel = _C.find_tiled_kernel(fields.pop("family"), fields.pop("op"), fields)
    window = _C.Window([3, 3], [1, 1], [1, 9], [False, False])
    q = torch.randn(1, 16, 40, 2, 64, device="cuda", dtype=torch.bfloat16)
    out, lse = torch.empty_like(q), torch.empty(q.shape[:-1], device="cuda")
    with pytest.raises(ValueError, match="dilation 9 on axis 1"):
        _C.tiled_fna_forward(q, q, q, None, None, window, 0.125, kernel, out, lse)
    torch.cuda.synchronize()  # nothing was launched that could fail later


# ---------------------------------------------------------------------------------------------
# hopper-fna's rules without a GPU: its backend over the registry's sm90 instantiations
# ---------------------------------------------------------------------------------------------


def _hopper_build(monkeypatch, ops):
    """hopper-fna as a build of the sm90 instantiations of these ops for 9.0 would load it, on a
    9.0 GPU."""
    from natten.backends import tiled
    from natten.backends.hopper import HopperBackend

    rows = [k.key for k in registry.kernels(True) if k.family is SM90 and k.op.name in ops]
    monkeypatch.setattr(tiled, "manifest_rows", lambda: rows)
    monkeypatch.setattr(tiled, "manifest_archs", lambda: {"sm90": ("9.0",)})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    return HopperBackend()


@pytest.fixture
def hopper(monkeypatch):
    return _hopper_build(monkeypatch, ("fna_fwd", "fna_bwd"))


def _tiles(family, op, rank):
    """The registry's (query box, key box) pairs of one op of the family for a rank."""
    return next(o for o in family.ops if o.name == op).tiles[rank]


def _problem(spatial, kernel, dilation=None, dtype=torch.bfloat16, dim=128, batch=1, heads=16,
             requires_grad=False):
    from natten._checks import FusedProblem, Window

    rank = len(spatial)
    window = Window(tuple(kernel), (1,) * rank, tuple(dilation or (1,) * rank), (False,) * rank)
    return FusedProblem(window, tuple(spatial), batch, heads, heads, dim, dim, 0, dtype,
                        torch.device("cuda"), requires_grad)


@pytest.mark.parametrize("problem,reason", [
    (_problem((64, 64), (7, 7), dtype=torch.float32), "float32 is not supported by hopper-fna"),
    (_problem((64, 64), (7, 7), dim=256), "head dim 256 is not supported"),
    (_problem((64, 64), (7, 7), dim=36), "multiples of 8"),
    (_problem((400,), (9,), dilation=(3,)), "dilation 3 on axis 0 with tile extents 128/128 is not supported"),
    (_problem((400,), (9,), dilation=(3,), requires_grad=True), "span 384 positions"),
    (_problem((64, 90), (7, 7), dilation=(1, 9)), "dilation 9 on axis 1 is not supported by hopper-fna: it exceeds 8"),
    (_problem((64, 64), (7, 7), batch=2**14, heads=2**5), "32-bit"),
])
def test_hopper_declines_with_the_reason(hopper, problem, reason):
    assert reason in hopper.unsupported(problem)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("problem", [
    _problem((64, 64), (7, 7), dim=96),  # padded to 128
    _problem((64, 64), (7, 7), dim=8, dtype=torch.float16),  # padded to 64
    _problem((400,), (9,), dilation=(2,)),  # 128-token boxes over 256 positions
    _problem((64, 72), (7, 7), dilation=(8, 8)),  # 16 x 8 boxes over 128 x 64 positions
    _problem((16, 64, 64), (8, 16, 16)),
])
def test_hopper_serves(hopper, problem, requires_grad):
    import dataclasses

    problem = dataclasses.replace(problem, requires_grad=requires_grad)
    assert hopper.unsupported(problem) is None
    for backward in (False, True) if requires_grad else (False,):
        q, kv = _tiles(SM90, "fna_bwd" if backward else "fna_fwd", problem.rank)[0]
        assert hopper.default_tiles(problem, backward) == (q, kv)
        assert hopper.check_tiles(problem, q, kv, backward) is None


def test_hopper_without_backward_kernels_declines_gradients(monkeypatch):
    """A build whose kernel filter left the sm90 backward out: gradients are declined by name."""
    hopper = _hopper_build(monkeypatch, ("fna_fwd",))
    problem = _problem((64, 64), (7, 7), requires_grad=True)
    assert "head dim 128 is not supported by this build's hopper-fna backward kernels" in hopper.unsupported(problem)
    assert hopper.unsupported(_problem((64, 64), (7, 7))) is None


def test_hopper_tiles_are_checked_against_dilation(hopper):
    problem = _problem((400,), (9,), dilation=(3,))
    assert "span 384 positions" in hopper.check_tiles(problem, (128,), (128,))
    assert "not an instantiated" in hopper.check_tiles(_problem((400,), (9,)), (64,), (64,))
    assert "not an instantiated" in hopper.check_tiles(_problem((400,), (9,)), (128,), (128,), True)


@pytest.mark.parametrize("problem,why", [
    (_problem((32768,), (2048,)), None),
    (_problem((128, 128), (32, 32)), None),
    (_problem((16, 64, 64), (8, 16, 16)), None),
    (_problem((56, 56), (7, 7), dim=32, batch=32, heads=4), "windows of 49 keys"),
    (_problem((32, 32), (16, 16)), "fewer query rows"),  # 16384
    (_problem((32, 64), (16, 16)), None),  # exactly 32K rows
    (_problem((128, 128), (32, 32), requires_grad=True), None),
])
def test_hopper_preference_rule(hopper, problem, why):
    reason = hopper.passed_over(problem)
    assert reason is None if why is None else why in reason



@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for the test, restored after."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


# Rank 1 with additional keys, causal and stride; rank 2 with GQA; rank 3 with dilation, stride and
# a value head dim of its own.
DETERMINISTIC_CASES = [LARGE_CASES[1], LARGE_CASES[2], LARGE_CASES[7]]


@pytest.mark.parametrize("case", DETERMINISTIC_CASES, ids=Case.id)
def test_hopper_deterministic_backward(deterministic, case):
    """Under use_deterministic_algorithms(True) hopper-fna's backward computes dQ in a pass of its
    own: its gradients match the oracle, and a second run gives the same bits."""
    from fused_checks import call_args, make_inputs

    _check_served(SM90, case, torch.bfloat16)
    backend = _backend(SM90, case.rank, torch.bfloat16, max(case.D, case.Dv or case.D))
    if not _built(SM90, case.rank, torch.bfloat16, case.D, "fna_bwd"):
        pytest.skip("the build has no hopper-fna backward kernels for the case")
    torch.manual_seed(0)
    q, k, v, ak, av = make_inputs(case, torch.bfloat16, "cuda", requires_grad=True)
    kwargs = call_args(case)
    if case.extra:
        kwargs.update(additional_keys=ak, additional_values=av)
    leaves = [t for t in (q, k, v, ak, av) if t is not None]
    out = op_for_rank(case.rank)(q, k, v, backend=backend, **kwargs)
    d_out = torch.randn_like(out)

    def grads():
        out = op_for_rank(case.rank)(q, k, v, backend=backend, **kwargs)
        return torch.autograd.grad(out, leaves, d_out)

    first, second = grads(), grads()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_backend_none_keeps_hopper_when_deterministic(deterministic):
    """backend=None gives a problem that needs gradients to hopper-fna under
    use_deterministic_algorithms(True) as it does without it, and the gradients repeat bit for
    bit."""
    import natten
    from natten import backends

    _backend(SM90, 1, torch.bfloat16, 64)
    if not _built(SM90, 1, torch.bfloat16, 64, "fna_bwd"):
        pytest.skip("the build has no hopper-fna backward kernels for rank 1 and bfloat16")
    assert backends.select(_problem((4096,), (129,), dim=64, heads=8, requires_grad=True), None).name == "hopper-fna"
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4096, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    d_out = torch.randn_like(q)

    def grads():
        out = natten.na1d(q, k, v, kernel_size=129)
        return torch.autograd.grad(out, (q, k, v), d_out)

    first, second = grads(), grads()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
