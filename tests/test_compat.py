"""Code written for NATTEN 0.14 runs unchanged: the modules' constructor, `bias`/`rpb` and
0.14-style checkpoints, small inputs padded by the modules, the original functional API
(natten{1,2,3}dqk included), and float64 with gradchecks on the training device (CUDA through
the reference backend; the CUDA cases skip without a GPU)."""

import dataclasses
import inspect
import math

import pytest
import torch
import torch.nn.functional as Fn

import natten
from conftest import HAS_CUDA, assert_close, assert_close_masked
from natten import functional as nf
from oracle import as_tuple, reference_na, reference_na_unfused, reference_qk

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available"))
DEVICES = ["cpu", CUDA]
F64 = 1e-10  # float64 against the float64 oracle, CPU and GPU alike


def _module(rank):
    return {1: natten.NeighborhoodAttention1D, 2: natten.NeighborhoodAttention2D,
            3: natten.NeighborhoodAttention3D}[rank]


def _original_forward(params, x, kernel, dilation, heads, is_causal=False):
    """Float64 evaluation of the original modules' forward from their parameters: project to
    q, k, v; scale q; scores q.k plus the positional bias; softmax over each window; weights
    times values; output projection. No dropout (eval mode). Causal masks are this project's."""
    rank = x.dim() - 2
    dim = x.shape[-1]
    p = {n: t.detach().double().cpu() for n, t in params.items()}
    qkv = Fn.linear(x.detach().double().cpu(), p["qkv.weight"], p.get("qkv.bias"))
    q, k, v = qkv.reshape(*x.shape[:-1], 3, heads, dim // heads).unbind(dim=-3)
    out = reference_na_unfused(q, k, v, as_tuple(kernel, rank), as_tuple(dilation, rank),
                               as_tuple(is_causal, rank), rpb=p.get("rpb"))
    return Fn.linear(out.reshape(*x.shape[:-1], dim), p["proj.weight"], p["proj.bias"])


# ---------------------------------------------------------------------------------- constructor

def test_constructor_signature_is_the_original_one():
    for rank in (1, 2, 3):
        params = list(inspect.signature(_module(rank)).parameters.values())
        names = [p.name for p in params]
        assert names == ["dim", "num_heads", "kernel_size", "dilation", "bias", "qkv_bias",
                         "qk_scale", "attn_drop", "proj_drop", "stride", "is_causal"], names
        kinds = [p.kind for p in params]
        assert kinds[:9] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 9
        assert kinds[9:] == [inspect.Parameter.KEYWORD_ONLY] * 2
        defaults = {p.name: p.default for p in params[3:]}
        assert defaults == {"dilation": 1, "bias": True, "qkv_bias": True, "qk_scale": None,
                            "attn_drop": 0.0, "proj_drop": 0.0, "stride": 1, "is_causal": False}


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_positional_constructor(rank):
    m = _module(rank)(16, 2, 3, 2, False, False, 0.25, 0.1, 0.2)
    assert m.rpb is None and m.qkv.bias is None
    assert m.dilation == (2,) * rank and m.kernel_size == (3,) * rank
    assert m.scale == 0.25 and m.attn_drop == 0.1 and m.proj_drop.p == 0.2
    m = _module(rank)(16, 2, 3, 1, True)
    assert tuple(m.rpb.shape) == (2, *(5,) * rank)
    with pytest.raises(TypeError):
        _module(rank)(16, 2, 3, 1, True, True, None, 0.0, 0.0, 1)  # stride is keyword-only


def test_issue_forms():
    m = natten.NeighborhoodAttention2D(64, 4, 7, 1, True)
    assert tuple(m.rpb.shape) == (4, 13, 13)
    m = natten.NeighborhoodAttention2D(dim=64, num_heads=4, kernel_size=7, bias=True)
    assert tuple(m.rpb.shape) == (4, 13, 13)
    assert natten.NeighborhoodAttention2D(64, 4, 7, dilation=None).dilation == (1, 1)
    m = natten.NeighborhoodAttention2D(64, 4, 7, bias=False, stride=2, is_causal=(True, False))
    assert m.rpb is None and m.stride == (2, 2) and m.is_causal == (True, False)


def test_default_bias_is_initialised_as_the_original():
    """bias defaults on; rpb is drawn from a normal of std 0.02 truncated to [-2, 2]."""
    m = natten.NeighborhoodAttention2D(64, 4, 7)
    rpb = m.rpb.detach()
    assert isinstance(m.rpb, torch.nn.Parameter) and tuple(rpb.shape) == (4, 13, 13)
    assert 0.017 < rpb.std().item() < 0.023 and abs(rpb.mean().item()) < 0.004
    assert rpb.abs().max().item() <= 2.0


# ---------------------------------------------------------------------------------- checkpoints

def _original_state_dict(rank, dim, heads, kernel, bias=True):
    sd = {"qkv.weight": torch.randn(3 * dim, dim) * dim ** -0.5, "qkv.bias": torch.randn(3 * dim),
          "proj.weight": torch.randn(dim, dim) * dim ** -0.5, "proj.bias": torch.randn(dim)}
    if bias:
        sd["rpb"] = torch.randn(heads, *(2 * k - 1 for k in as_tuple(kernel, rank)))
    return sd


@pytest.mark.parametrize("rank,shape,kernel,dilation", [
    (1, (11,), 5, 2), (2, (7, 9), 3, 2), (3, (4, 5, 6), 3, 1)], ids=["1d", "2d", "3d"])
def test_original_checkpoint_loads_strict_and_is_used(rank, shape, kernel, dilation):
    dim, heads = 16, 2
    sd = _original_state_dict(rank, dim, heads, kernel)
    m = _module(rank)(dim, heads, kernel, dilation).eval()
    assert set(m.state_dict()) == set(sd)
    m.load_state_dict(sd, strict=True)
    x = torch.randn(2, *shape, dim)
    assert_close(m(x), _original_forward(sd, x, kernel, dilation, heads), 1e-5, "module output")


def test_bias_mismatch_fails_loudly():
    """A checkpoint's rpb is never silently dropped, and a missing one is never made up."""
    with_rpb = _original_state_dict(2, 16, 2, 3)
    with pytest.raises(RuntimeError, match="rpb"):
        natten.NeighborhoodAttention2D(16, 2, 3, bias=False).load_state_dict(with_rpb)
    without = _original_state_dict(2, 16, 2, 3, bias=False)
    with pytest.raises(RuntimeError, match="rpb"):
        natten.NeighborhoodAttention2D(16, 2, 3).load_state_dict(without)


# ---------------------------------------------------------------------------------- small inputs

PAD_CASES = [
    # rank, input shape, kernel, dilation, is_causal, bias
    (1, (5,), 7, 1, False, True),
    (1, (9,), 3, 4, False, False),
    (2, (4, 9), 5, 1, False, True),
    (2, (3, 8), (5, 3), (1, 2), (True, False), False),
    (3, (2, 5, 3), 3, (1, 1, 2), False, True),
    (3, (4, 2, 2), (2, 3, 2), 1, (False, False, True), False),
]


def _pid(c):
    rank, shape, kernel, dil, causal, bias = c
    return f"{rank}d-{'x'.join(map(str, shape))}-k{kernel}-d{dil}-c{causal}-{'rpb' if bias else 'nobias'}".replace(" ", "")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", PAD_CASES, ids=_pid)
def test_small_input_is_padded_and_cropped(case, device):
    rank, shape, kernel, dil, causal, bias = case
    dim, heads = 16, 2
    m = _module(rank)(dim, heads, kernel, dil, bias, is_causal=causal).to(device).eval()
    need = [k * d for k, d in zip(as_tuple(kernel, rank), as_tuple(dil, rank))]
    short = [max(0, n - L) for L, n in zip(shape, need)]
    assert any(short)
    x = torch.randn(2, *shape, dim, device=device, requires_grad=True)
    q = torch.randn(2, *shape, heads, dim // heads, device=device)
    fused = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[rank]
    with pytest.raises(ValueError, match="kernel_size"):  # the functional ops keep refusing
        fused(q, q, q, kernel, dilation=dil, is_causal=causal)

    y = m(x)
    assert y.shape == x.shape
    # Zeros appended at the end of every short axis, the same module, the input's tokens kept.
    xp = x.detach().clone()
    for axis, n in enumerate(short):
        if n:
            zeros = torch.zeros(*xp.shape[:axis + 1], n, *xp.shape[axis + 2:], device=device)
            xp = torch.cat([xp, zeros], dim=axis + 1)
    xp.requires_grad_()
    yp = m(xp)
    crop = (slice(None), *(slice(0, L) for L in shape))
    assert_close(y, yp[crop], 1e-6, "padded module output")
    g = torch.randn_like(y)
    y.backward(g)
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    yp[crop].backward(g)
    assert_close(x.grad, xp.grad[crop], 1e-6, "input gradient")
    for n, p in m.named_parameters():
        assert_close(grads[n], p.grad, 1e-6, f"grad {n}")
    ref = _original_forward(dict(m.named_parameters()), xp, kernel, dil, heads, causal)[crop]
    assert_close(y, ref, 1e-5, "padded module output vs oracle")


def test_input_covering_the_window_is_not_padded():
    m = natten.NeighborhoodAttention2D(16, 2, 3, 2).eval()
    x = torch.randn(1, 6, 7, 16)
    assert_close(m(x), _original_forward(dict(m.named_parameters()), x, 3, 2, 2), 1e-5, "output")


# ---------------------------------------------------------------------------------- natten{r}dqk

QK_CASES = [((9,), 3, 2), ((5, 6), 3, 1), ((4, 3, 5), (3, 3, 2), (1, 1, 2))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_nattendqk(device, rank):
    shape, kernel, dil = QK_CASES[rank - 1]
    qk = getattr(nf, f"natten{rank}dqk")
    assert list(inspect.signature(qk).parameters) == ["query", "key", "kernel_size", "dilation"]
    q = torch.randn(2, 3, *shape, 8, device=device, requires_grad=True)  # heads-first
    k = torch.randn(2, 3, *shape, 8, device=device, requires_grad=True)
    attn = qk(q, k, kernel, dil)
    ref = reference_qk(q.movedim(1, rank + 1), k.movedim(1, rank + 1), as_tuple(kernel, rank),
                       as_tuple(dil, rank))
    assert_close_masked(attn.movedim(1, rank + 1), ref, 1e-5, "attn")
    assert torch.equal(attn, getattr(nf, f"natten{rank}dqkrpb")(q, k, None, kernel, dil))
    attn.sum().backward()
    assert q.grad is not None and k.grad is not None


# ---------------------------------------------------------------------------------- float64

# Tiny problems per rank: (spatial shape, kernel_size, dilation); heads and head dims below.
GRAD_CASES = {1: ((7,), 3, 2), 2: ((4, 5), 3, 1), 3: ((3, 3, 4), (2, 3, 2), (1, 1, 2))}


def _f64(*shape, device):
    return torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=True)


def _gradcheck(fn, inputs, **kwargs) -> bool:
    return torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_gradcheck_original_qkrpb(device, rank):
    shape, kernel, dil = GRAD_CASES[rank]
    q, k = _f64(1, 2, *shape, 3, device=device), _f64(1, 2, *shape, 3, device=device)
    rpb = _f64(2, *(2 * x - 1 for x in as_tuple(kernel, rank)), device=device)
    op = getattr(nf, f"natten{rank}dqkrpb")
    assert _gradcheck(lambda q, k, rpb: op(q, k, rpb, kernel, dil), (q, k, rpb))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_gradcheck_original_qk(device, rank):
    shape, kernel, dil = GRAD_CASES[rank]
    q, k = _f64(1, 2, *shape, 3, device=device), _f64(1, 2, *shape, 3, device=device)
    op = getattr(nf, f"natten{rank}dqk")
    assert _gradcheck(lambda q, k: op(q, k, kernel, dil), (q, k))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_gradcheck_original_av(device, rank):
    shape, kernel, dil = GRAD_CASES[rank]
    attn = _f64(1, 2, *shape, math.prod(as_tuple(kernel, rank)), device=device)
    v = _f64(1, 2, *shape, 3, device=device)
    op = getattr(nf, f"natten{rank}dav")
    assert _gradcheck(lambda a, v: op(a, v, kernel, dil), (attn, v))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_gradcheck_unfused(device, rank):
    """The heads-last unfused ops with bias and causal masks, through softmax."""
    shape, kernel, dil = GRAD_CASES[rank]
    causal = (True,) + (False,) * (rank - 1)
    q, k, v = (_f64(1, *shape, 2, 3, device=device) for _ in range(3))
    rpb = _f64(2, *(2 * x - 1 for x in as_tuple(kernel, rank)), device=device)
    qk, av = getattr(nf, f"na{rank}d_qk"), getattr(nf, f"na{rank}d_av")

    def f(q, k, v, rpb):
        attn = qk(q, k, kernel, dil, causal, rpb=rpb).softmax(-1)
        return av(attn, v, kernel, dil, causal)

    assert _gradcheck(f, (q, k, v, rpb))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_gradcheck_fused(device, rank):
    """backend=None: the cpu backend on the CPU, the reference kernels on CUDA."""
    shape, kernel, dil = GRAD_CASES[rank]
    q = _f64(1, *shape, 2, 3, device=device)
    k, v = _f64(1, *shape, 1, 3, device=device), _f64(1, *shape, 1, 2, device=device)
    ek, ev = _f64(1, 2, 1, 3, device=device), _f64(1, 2, 1, 2, device=device)
    op = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[rank]
    stride = (2,) + (1,) * (rank - 1)

    def f(q, k, v, ek, ev):
        return op(q, k, v, kernel, stride=stride, dilation=dil, additional_keys=ek,
                  additional_values=ev, return_lse=True)

    assert _gradcheck(f, (q, k, v, ek, ev))


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available")
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_cuda_float64_accumulates_in_double(rank):
    """Forward and backward of every float64 CUDA path within 1e-10 of the oracle: float32
    accumulation anywhere would leave errors near 1e-7."""
    from natten import backends
    from natten._checks import check_fused

    shape = {1: (33,), 2: (9, 11), 3: (5, 6, 7)}[rank]
    kernel, dil = {1: (7, 2), 2: (3, (2, 1)), 3: (3, (1, 2, 1))}[rank]
    q, k, v = (_f64(2, *shape, 4, 40, device="cuda") for _ in range(3))
    problem, _ = check_fused(rank, q, k, v, kernel, 1, dil, False, None, None, None)
    assert backends.select(problem, None).name == "reference"
    out, lse = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[rank](q, k, v, kernel, dilation=dil,
                                                                       return_lse=True)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    leaves = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = reference_na(*leaves, as_tuple(kernel, rank), 1, as_tuple(dil, rank), False)
    assert_close(out, ref, F64, "fused output")
    assert_close(lse, ref_lse, F64, "fused lse")
    g = torch.randn_like(ref)
    out.backward(g.cuda())
    ref.backward(g)
    for name, t, lf in zip("qkv", (q, k, v), leaves):
        assert_close(t.grad, lf.grad, F64, f"fused grad {name}")

    for t in (q, k, v, *leaves):
        t.grad = None
    rpb = _f64(4, *(2 * x - 1 for x in as_tuple(kernel, rank)), device="cuda")
    rpb_leaf = rpb.detach().cpu().requires_grad_()
    qk, av = getattr(nf, f"na{rank}d_qk"), getattr(nf, f"na{rank}d_av")
    out = av(qk(q * 0.2, k, kernel, dil, rpb=rpb).softmax(-1), v, kernel, dil)
    ref = reference_na_unfused(*leaves, as_tuple(kernel, rank), as_tuple(dil, rank), rpb=rpb_leaf,
                               scale=0.2)
    assert_close(out, ref, F64, "unfused output")
    out.backward(g.cuda())
    ref.backward(g)
    for name, t, lf in zip(("q", "k", "v", "rpb"), (q, k, v, rpb), (*leaves, rpb_leaf)):
        assert_close(t.grad, lf.grad, F64, f"unfused grad {name}")


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available")
@pytest.mark.parametrize("name", ["cutlass-fna", "flex-fna"])
def test_other_cuda_backends_decline_float64(name):
    if name not in natten.backends.names_for_device("cuda"):
        pytest.skip(f"{name} is not in this build")
    q = torch.randn(1, 8, 8, 2, 32, dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match="float64"):
        natten.na2d(q, q, q, 3, backend=name)


def test_float64_off_the_cpu_is_left_to_the_backends():
    """Validation admits float64 on any device; GPU backends other than the reference one
    decline it with a reason, and the registry instantiates float64 reference kernels."""
    from autogen import registry
    from natten._checks import check_fused
    from natten.backends.flex import FlexBackend

    q = torch.empty(1, 8, 8, 2, 16, dtype=torch.float64, device="meta")
    problem, _ = check_fused(2, q, q, q, 3, 1, 1, False, None, None, None)
    problem = dataclasses.replace(problem, device=torch.device("cuda", 0))
    assert "float64" in FlexBackend().unsupported(problem)
    ops = {(k.op.name, k.key.rank) for k in registry.kernels(True, "reference:float64")}
    assert ops == {(op.name, r) for op in registry.REFERENCE_OPS for r in (1, 2, 3)}


# ---------------------------------------------------------------------------------- CPU vs GPU

DEVICE_CASES = [
    # rank, input shape, kernel, dilation
    (1, (13,), 5, 2),
    (2, (7, 8), 3, (1, 2)),
    (3, (4, 5, 5), 3, 1),
]


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("bias", [True, False], ids=["rpb", "nobias"])
@pytest.mark.parametrize("case", DEVICE_CASES, ids=["1d", "2d", "3d"])
def test_module_on_cpu_and_gpu_agree(case, bias, dtype):
    from natten.backends.base import tf32_allowed

    rank, shape, kernel, dil = case
    dim = 128  # head dim 32: every GPU backend serves it
    cpu = _module(rank)(dim, 4, kernel, dil, bias).to(dtype)
    if bias:
        with torch.no_grad():  # make the bias matter (its initialisation is tiny)
            cpu.rpb.normal_()
    gpu = _module(rank)(dim, 4, kernel, dil, bias).to(dtype)
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    x = torch.randn(2, *shape, dim, dtype=dtype)
    g = torch.randn(2, *shape, dim, dtype=dtype)
    xc, xg = x.clone().requires_grad_(), x.cuda().requires_grad_()
    yc, yg = cpu(xc), gpu(xg)
    yc.backward(g)
    yg.backward(g.cuda())
    # float32 without the bias runs fused kernels, on TF32 tensor cores where torch allows it
    tol = F64 if dtype == torch.float64 else 2e-3 if not bias and tf32_allowed() else 1e-4
    assert_close(yg, yc, tol, "output")
    assert_close(xg.grad, xc.grad, tol, "input grad")
    gpu_params = dict(gpu.named_parameters())
    for name, p in cpu.named_parameters():
        assert_close(gpu_params[name].grad, p.grad, tol, f"grad {name}")
