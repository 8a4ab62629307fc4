"""torch.compile(fullgraph=True) fed changing spatial shapes, batch sizes and head counts: the
fused ops, the unfused and original-API ops (every rank) and the modules, forward and backward,
against eager and the float64 oracle, with automatic dynamic shapes (dynamic=None) and with
dynamic=True; on the CPU and on every CUDA backend (skipped without a GPU).

What the design promises (natten._plan): a traced call keeps its sizes symbolic, and the
operators pick size-dependent tiles at run time. So a compiled function compiles once with
dynamic=True, and twice with automatic dynamic shapes (static for its first shapes, then once
more with the sizes that changed made symbolic); the counts are asserted below.

Sizes are chosen so that Dynamo's duck sizing never ties two dimensions together: dimensions of
equal size at a compile share one symbol, and a later call where they differ would recompile.
Hence no size appears twice among the batch, spatial, head, head-dim, extra-token and relative
positional bias dimensions of a compiled step, and none is 1 (Dynamo specialises sizes 0 and 1).
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch

from conftest import HAS_CUDA, assert_close, tolerance
from oracle import as_tuple, reference_na, reference_na_unfused

# Inductor is what torch.compile runs by default; on the two CPU cores of CI its code generation
# would dominate the run time, while the failures under test live in Dynamo's tracing, the fake
# implementations and AOTAutograd, which aot_eager runs in full. One CPU test runs inductor.
_COMPILER = {"cpu": "aot_eager", "cuda": "inductor"}
DYNAMIC = [pytest.param(None, id="auto-dynamic"), pytest.param(True, id="dynamic")]
CUDA = pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def _expected_compiles(dynamic: Optional[bool]) -> int:
    return 1 if dynamic else 2


@pytest.fixture(autouse=True)
def _cold_inductor_caches():
    """The graph counts are those of a process that compiles everything itself: Inductor's
    on-disk caches, warm from earlier runs or other processes on the machine, are bypassed."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(force_disable_caches=True):
        yield


class _Compiled:
    """torch.compile(fn, fullgraph=True) and the number of graphs Dynamo holds for it: one per
    compile that the guards kept (a count of calls into the compiler would also count analyses
    Dynamo restarts, and the compiles of flex-fna's own compiled FlexAttention inside the
    operator would pollute the global counters)."""

    def __init__(self, fn, dynamic: Optional[bool], device: str, compiler: Optional[str] = None):
        torch._dynamo.reset()
        self.code = (type(fn).forward if isinstance(fn, torch.nn.Module) else fn).__code__
        self.fn = torch.compile(fn, fullgraph=True, dynamic=dynamic,
                                backend=compiler or _COMPILER[device])

    def __call__(self, *args):
        return self.fn(*args)

    @property
    def compiles(self) -> int:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return len(_debug_get_cache_entry_list(self.code))


def _rand(*shape, dtype, device, requires_grad=False):
    t = torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def _leaves(tensors):
    """Float64 CPU copies to differentiate the oracle with."""
    return [None if t is None else t.detach().to("cpu", torch.float64).requires_grad_(True)
            for t in tensors]


def _grads(outputs, inputs, cotangents):
    present = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(outputs, present, cotangents))
    return [None if t is None else next(grads) for t in inputs]


def _compare(got, eager, ref, tol, what):
    for i, (g, e, r) in enumerate(zip(got, eager, ref)):
        if r is None:
            continue
        assert_close(g, e, tol, f"{what} [{i}] vs eager")
        assert_close(g, r, tol, f"{what} [{i}] vs oracle")


# ---------------------------------------------------------------------------------------------
# Fused ops
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FusedCase:
    kernel: object
    stride: object
    dilation: object
    causal: object
    steps: Tuple[Tuple[int, Tuple[int, ...], int, int], ...]  # (batch, spatial, heads, heads_kv)
    extra: int = 0  # additional key/value tokens
    D: int = 16

    @property
    def rank(self):
        return len(self.steps[0][1])


# The second step changes every size that later steps change, so that automatic dynamic shapes
# compile exactly twice.
FUSED_CASES = {
    1: FusedCase(5, 2, 2, False, ((2, (13,), 6, 3), (3, (22,), 4, 2), (5, (17,), 8, 4),
                                  (4, (11,), 10, 5)), extra=7),
    2: FusedCase((3, 5), 1, (2, 1), (False, True), ((2, (9, 11), 6, 3), (3, (12, 10), 4, 2),
                                                    (5, (7, 13), 8, 4), (4, (14, 9), 10, 5))),
    3: FusedCase(3, (1, 2, 1), 1, (True, False, False),
                 ((2, (5, 7, 4), 6, 3), (3, (8, 5, 7), 4, 2), (5, (4, 6, 9), 8, 4),
                  (4, (7, 9, 5), 10, 5))),
}
# Each CUDA backend at a dtype it serves for every case (cutlass-fna pads head dim 16 to 32).
_CUDA_DTYPE = torch.float16


def _fused_fn(case: FusedCase, backend):
    import natten

    op = {1: natten.na1d, 2: natten.fused_na2d, 3: natten.na3d}[case.rank]

    def fn(q, k, v, extra_k, extra_v):
        return op(q, k, v, case.kernel, stride=case.stride, dilation=case.dilation,
                  is_causal=case.causal, additional_keys=extra_k, additional_values=extra_v,
                  backend=backend, return_lse=True)

    return fn


def _fused_inputs(case, step, dtype, device):
    B, S, H, H_kv = step
    D = case.D
    q = _rand(B, *S, H, D, dtype=dtype, device=device, requires_grad=True)
    k, v = (_rand(B, *S, H_kv, D, dtype=dtype, device=device, requires_grad=True) for _ in "kv")
    extra = [None, None]
    if case.extra:
        extra = [_rand(B, case.extra, H_kv, D, dtype=dtype, device=device, requires_grad=True)
                 for _ in "kv"]
    return [q, k, v, *extra]


def _oracle_fused(case, inputs):
    leaves = _leaves(inputs)
    r = case.rank
    out, lse = reference_na(*leaves[:3], as_tuple(case.kernel, r), as_tuple(case.stride, r),
                            as_tuple(case.dilation, r), as_tuple(case.causal, r),
                            additional_keys=leaves[3], additional_values=leaves[4])
    return (out, lse), leaves


def _check_fused_steps(case, dynamic, device, backend, dtype, tol, compiler=None):
    fn = _fused_fn(case, backend)
    compiled = _Compiled(fn, dynamic, device, compiler)
    for step in case.steps:
        inputs = _fused_inputs(case, step, dtype, device)
        out, lse = compiled(*inputs)
        eager_out, eager_lse = fn(*inputs)
        (ref_out, ref_lse), leaves = _oracle_fused(case, inputs)
        what = f"{case.rank}-D step {step}"
        _compare([out, lse], [eager_out, eager_lse], [ref_out, ref_lse], tol, what)

        d_out, d_lse = torch.randn_like(out), torch.randn_like(lse)
        got = _grads([out, lse], inputs, [d_out, d_lse])
        eager = _grads([eager_out, eager_lse], inputs, [d_out, d_lse])
        ref = _grads([ref_out, ref_lse], leaves, [d_out.cpu().double(), d_lse.cpu().double()])
        _compare(got, eager, ref, tol, f"{what} gradient")
    assert compiled.compiles == _expected_compiles(dynamic), (
        f"{compiled.compiles} compiles for {len(case.steps)} shapes")


@pytest.mark.parametrize("dynamic", DYNAMIC)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_fused_ops_cpu(rank, dynamic):
    _check_fused_steps(FUSED_CASES[rank], dynamic, "cpu", "cpu", torch.float32,
                       tolerance(torch.float32))


def test_fused_ops_flex_cpu():
    # flex-fna also runs on the CPU (for tests: eager FlexAttention there is slow, so one case).
    # Under torch.compile it builds its block masks inside the operator, where the first call of
    # a compiled graph runs under a dispatch mode (natten.ops._as_plain_call), and some of its
    # gradients are views, whose strides inductor checks.
    _check_fused_steps(FUSED_CASES[1], True, "cpu", "flex-fna", torch.float32,
                       tolerance(torch.float32), "inductor")


def _skip_forward_only(case, backend):
    """The steps take gradients: a backend that serves a case's forward but declines its gradients
    (a tiled family whose build has no backward kernels for the case: the manifest decides) is
    compiled forward-only by test_cuda_tiled.py."""
    import dataclasses

    from natten import backends
    from natten._checks import check_fused

    q, k, v, extra_k, extra_v = _fused_inputs(case, case.steps[0], _CUDA_DTYPE, "cuda")
    problem, _ = check_fused(case.rank, q, k, v, case.kernel, case.stride, case.dilation, case.causal,
                             None, extra_k, extra_v)
    impl = backends.get(backend)
    reason = impl.unsupported(problem)
    if reason is not None and impl.unsupported(dataclasses.replace(problem, requires_grad=False)) is None:
        pytest.skip(f"{backend} serves the forward only: {reason}")


@pytest.mark.parametrize("dynamic", DYNAMIC)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_fused_ops_cuda(cuda_backend, rank, dynamic):
    device, backend = cuda_backend
    _skip_forward_only(FUSED_CASES[rank], backend)
    _check_fused_steps(FUSED_CASES[rank], dynamic, device, backend, _CUDA_DTYPE,
                       tolerance(_CUDA_DTYPE, device, backend))


# ---------------------------------------------------------------------------------------------
# Unfused ops and the original (heads-first) API
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnfusedCase:
    kernel: object
    dilation: object
    causal: object
    steps: Tuple[Tuple[int, Tuple[int, ...], int], ...]  # (batch, spatial, heads)
    D: int = 16

    @property
    def rank(self):
        return len(self.steps[0][1])


# The bias tables are [heads, 2k-1 per axis]: those sizes stay out of the steps.
UNFUSED_CASES = {
    1: UnfusedCase(5, 2, False, ((2, (13,), 3), (3, (21,), 4), (5, (12,), 6), (4, (17,), 8))),
    2: UnfusedCase((3, 4), (2, 1), (False, True), ((2, (8, 11), 3), (3, (12, 10), 4),
                                                   (4, (6, 13), 6), (6, (11, 8), 2))),
    3: UnfusedCase(3, 1, (True, False, False), ((2, (4, 6, 7), 3), (3, (6, 8, 4), 7),
                                                (4, (7, 4, 6), 6), (6, (8, 7, 9), 2))),
}


def _unfused_fn(case: UnfusedCase):
    """softmax(q k^T + rpb) v through na*d_qk / na*d_av, and without a bias through the original
    API's natten*dqkrpb / natten*dav (heads-first)."""
    from natten import functional as F

    r = case.rank
    qk, av = getattr(F, f"na{r}d_qk"), getattr(F, f"na{r}d_av")
    qkrpb, legacy_av = getattr(F, f"natten{r}dqkrpb"), getattr(F, f"natten{r}dav")
    scale = case.D ** -0.5

    def fn(q, k, v, rpb):
        attn = qk(q * scale, k, case.kernel, case.dilation, case.causal, rpb=rpb)
        out = av(attn.softmax(-1), v, case.kernel, case.dilation, case.causal)
        heads_first = [t.movedim(-2, 1) for t in (q, k, v)]
        attn = qkrpb(heads_first[0] * scale, heads_first[1], None, case.kernel, case.dilation)
        legacy = legacy_av(attn.softmax(-1), heads_first[2], case.kernel, case.dilation)
        return out, legacy.movedim(1, -2)

    return fn


def _check_unfused_steps(case, dynamic, device, dtype, tol, compiler=None):
    fn = _unfused_fn(case)
    compiled = _Compiled(fn, dynamic, device, compiler)
    r = case.rank
    for step in case.steps:
        B, S, H = step
        inputs = [_rand(B, *S, H, case.D, dtype=dtype, device=device, requires_grad=True)
                  for _ in "qkv"]
        inputs.append(_rand(H, *(2 * k - 1 for k in as_tuple(case.kernel, r)), dtype=dtype,
                            device=device, requires_grad=True))
        got = compiled(*inputs)
        eager = fn(*inputs)
        leaves = _leaves(inputs)
        kernel, dilation = as_tuple(case.kernel, r), as_tuple(case.dilation, r)
        ref = [reference_na_unfused(*leaves[:3], kernel, dilation, as_tuple(case.causal, r),
                                    rpb=leaves[3]),
               reference_na_unfused(*leaves[:3], kernel, dilation)]
        what = f"{r}-D step {step}"
        _compare(got, eager, ref, tol, what)

        cotangents = [torch.randn_like(t) for t in got]
        _compare(_grads(got, inputs, cotangents), _grads(eager, inputs, cotangents),
                 _grads(ref, leaves, [c.cpu().double() for c in cotangents]), tol,
                 f"{what} gradient")
    assert compiled.compiles == _expected_compiles(dynamic), (
        f"{compiled.compiles} compiles for {len(case.steps)} shapes")


@pytest.mark.parametrize("dynamic", DYNAMIC)
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_unfused_ops(device, rank, dynamic):
    dtype = torch.float32
    _check_unfused_steps(UNFUSED_CASES[rank], dynamic, device, dtype, tolerance(dtype, device))


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

_DIM, _HEADS = 32, 4
# (batch, spatial) steps and window per rank; none of them ties to the bias tables' 2k-1.
MODULE_STEPS = {
    1: (5, ((2, (13,)), (3, (20,)), (5, (11,)), (4, (17,)))),
    2: (3, ((2, (12, 11)), (3, (16, 20)), (6, (9, 14)), (4, (20, 13)))),
    3: ((3, 2, 3), ((2, (4, 6, 7)), (3, (6, 7, 4)), (4, (7, 4, 6)), (6, (8, 9, 6)))),
}


def _module(rank, rpb, device):
    import natten

    cls = {1: natten.NeighborhoodAttention1D, 2: natten.NeighborhoodAttention2D,
           3: natten.NeighborhoodAttention3D}[rank]
    kernel, _ = MODULE_STEPS[rank]
    return cls(_DIM, _HEADS, kernel, bias=rpb).to(device)


def _check_module_steps(rank, rpb, dynamic, device, compiler=None):
    m = _module(rank, rpb, device)
    compiled = _Compiled(m, dynamic, device, compiler)
    params = list(m.parameters())
    tol = tolerance(torch.float32, device)
    for B, S in MODULE_STEPS[rank][1]:
        x = _rand(B, *S, _DIM, dtype=torch.float32, device=device, requires_grad=True)
        got, eager = compiled(x), m(x)
        assert_close(got, eager, tol, f"output at {(B, *S)}")
        d_out = torch.randn_like(got)
        got_grads = torch.autograd.grad(got, [x, *params], d_out)
        eager_grads = torch.autograd.grad(eager, [x, *params], d_out)
        for g, e, (name, _) in zip(got_grads, eager_grads, [("input", x), *m.named_parameters()]):
            assert_close(g, e, tol, f"gradient of {name} at {(B, *S)}")
    assert compiled.compiles == _expected_compiles(dynamic), (
        f"{compiled.compiles} compiles for {len(MODULE_STEPS[rank][1])} shapes")


# Every path of the 2-D module (fused, or unfused for the bias) in both modes; the other ranks
# run the same code, once each.
MODULE_CASES = [(2, False, None), (2, False, True), (2, True, None), (2, True, True),
                (1, True, True), (3, False, None)]


@pytest.mark.parametrize("rank,rpb,dynamic", MODULE_CASES,
                         ids=[f"{r}d-{'rpb' if b else 'fused'}-{'dynamic' if d else 'auto-dynamic'}"
                              for r, b, d in MODULE_CASES])
@pytest.mark.parametrize("device", DEVICES)
def test_modules(device, rank, rpb, dynamic):
    _check_module_steps(rank, rpb, dynamic, device)


def test_module_under_inductor_cpu():
    # The reported case: torch.compile's default compiler and settings on a 2-D model.
    _check_module_steps(2, False, None, "cpu", "inductor")


def test_unfused_ops_under_inductor_cpu():
    # Inductor asserts that the operators' results have the strides of their fake results; the
    # original API passes permuted (heads-first) tensors.
    _check_unfused_steps(UNFUSED_CASES[2], True, "cpu", torch.float32, tolerance(torch.float32),
                         "inductor")


# ---------------------------------------------------------------------------------------------
# Recompiles
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamic", DYNAMIC)
@pytest.mark.parametrize("device", DEVICES)
def test_recompiles(device, dynamic):
    """Automatic dynamic shapes: one compile for the first call, one more when the length first
    changes (the sizes that changed become symbols), then none for new lengths; one more each
    when the batch size and the head count first change. dynamic=True: one compile for all of
    them. Twelve lengths: more than torch._dynamo.config.recompile_limit (8), which fails a
    fullgraph=True compile once reached. A new head dim picks other kernels: one compile more."""
    import natten

    def fn(q, k):
        return natten.na1d(q, k, k, kernel_size=7)

    # On a GPU, float16 takes the fused kernels (float32 would take flex-fna, which compiles
    # FlexAttention for every new shape: slow, and no part of what is counted here).
    dtype = torch.float32 if device == "cpu" else torch.float16
    tol = tolerance(dtype, device)

    lengths = (64, 80, 96, 72, 100, 57, 33, 45, 120, 81, 66, 90)
    steps = [(2, L, 6) for L in lengths] + [(3, 70, 6), (5, 71, 9), (4, 77, 12)]
    if dynamic:
        expected = [1] * len(steps) + [2]
    else:
        expected = [1] + [2] * (len(lengths) - 1) + [3, 4, 4, 5]
    compiled = _Compiled(fn, dynamic, device)
    counts = []
    for B, L, H in steps:
        q = _rand(B, L, H, 16, dtype=dtype, device=device)
        k = _rand(B, L, 3, 16, dtype=dtype, device=device)
        assert_close(compiled(q, k), fn(q, k), tol, f"{(B, L, H)}")
        counts.append(compiled.compiles)
    q, k = (_rand(3, 70, h, 32, dtype=dtype, device=device) for h in (6, 3))
    assert_close(compiled(q, k), fn(q, k), tol, "head dim 32")
    counts.append(compiled.compiles)
    assert counts == expected

    # A length the window does not fit fails the guards, and the retrace raises the check's
    # error (which fullgraph=True reports as an Unsupported quoting it).
    q, k = (_rand(3, 6, h, 16, dtype=dtype, device=device) for h in (6, 3))
    with pytest.raises(Exception, match=r"kernel_size \* dilation must not exceed"):
        compiled(q, k)
