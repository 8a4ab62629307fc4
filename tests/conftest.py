"""Shared test machinery.

NATTEN_POISON_OUTPUTS=1 must be in the environment before `natten` is imported: the
library then fills every output buffer with NaN before its kernels run, so an element a
kernel forgot to write shows up as NaN and fails every comparison below.
"""

import os

os.environ["NATTEN_POISON_OUTPUTS"] = "1"

import math  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LONG_TESTS = os.environ.get("NATTEN_LONG_TESTS", "0") == "1"
HAS_CUDA = torch.cuda.is_available()

# ---------------------------------------------------------------------------
# Tolerances (docs/semantics.md, accuracy)
# ---------------------------------------------------------------------------

_TOL_CPU = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}
_TOL_GPU = {
    torch.float32: 1e-4,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


# Backends whose float32 runs on TF32 tensor cores.
TF32_BACKENDS = ("cutlass-fna",)


def tolerance(dtype, device="cpu", backend=None):
    dev = torch.device(device).type
    if dtype == torch.float32 and backend in TF32_BACKENDS:
        return _TOL_GPU[torch.float16]  # docs/semantics.md: tf32 as float16
    table = _TOL_CPU if dev == "cpu" else _TOL_GPU
    return table[dtype]


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64; NaN/inf anywhere in `out` gives inf."""
    out = out.detach().to(device="cpu", dtype=torch.float64)
    ref = ref.detach().to(device="cpu", dtype=torch.float64)
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if not torch.isfinite(out).all():
        return math.inf
    denom = torch.linalg.vector_norm(ref).item()
    num = torch.linalg.vector_norm(out - ref).item()
    if denom == 0.0:
        return num
    return num / denom


def assert_close(out, ref, tol, what="output"):
    if out is None:
        raise AssertionError(f"{what}: got None")
    out_c = out.detach().cpu()
    nan_count = int((~torch.isfinite(out_c.to(torch.float64))).sum().item()) if out_c.is_floating_point() else 0
    err = rel_err(out, ref)
    assert err <= tol, (
        f"{what}: rel err {err:.3e} > tol {tol:.1e} "
        f"(non-finite elements: {nan_count} of {out_c.numel()}, shape {tuple(out_c.shape)})"
    )


def assert_close_masked(out, ref, tol, what="attn"):
    """For unfused qk outputs: -inf exactly where the reference has -inf, and
    relative error over the finite entries."""
    out_c = out.detach().cpu().to(torch.float64)
    ref_c = ref.detach().cpu().to(torch.float64)
    assert out_c.shape == ref_c.shape, f"{what}: shape {tuple(out_c.shape)} != {tuple(ref_c.shape)}"
    ref_inf = torch.isneginf(ref_c)
    out_inf = torch.isneginf(out_c)
    assert torch.equal(ref_inf, out_inf), (
        f"{what}: -inf pattern differs at {int((ref_inf ^ out_inf).sum())} positions "
        f"(expected {int(ref_inf.sum())} masked entries, got {int(out_inf.sum())})"
    )
    assert_close(out_c[~ref_inf], ref_c[~ref_inf], tol, what)


# ---------------------------------------------------------------------------
# Seeds and random inputs
# ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    seed = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    torch.manual_seed(seed)
    if HAS_CUDA:
        torch.cuda.manual_seed_all(seed)
    yield seed


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False, scale=1.0):
    t = torch.randn(*shape, dtype=torch.float64) * scale
    t = t.to(device=device, dtype=dtype)
    if requires_grad:
        t.requires_grad_(True)
    return t


@pytest.fixture
def make_randn():
    """Factory fixture: make_randn(*shape, dtype=..., device=..., requires_grad=...)."""
    return randn


# ---------------------------------------------------------------------------
# Devices and backends
# ---------------------------------------------------------------------------

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def backends_for(device_type):
    import natten

    return list(natten.backends.names_for_device(device_type))


def device_backend_params(devices=("cpu", "cuda"), exclude=()):
    """pytest params, each a (device, backend name) tuple, over every backend the library
    reports usable per device. CUDA entries are skipped cleanly without a GPU."""
    params = []
    for dev in devices:
        if dev == "cuda" and not HAS_CUDA:
            params.append(
                pytest.param(("cuda", None), marks=pytest.mark.skip(reason="CUDA not available"), id="cuda")
            )
            continue
        try:
            names = backends_for(dev)
        except Exception as e:  # library missing or broken: a visible failure, not a skip
            params.append(pytest.param((dev, f"<names_for_device failed: {e!r}>"), id=f"{dev}-broken"))
            continue
        for name in names:
            if name in exclude:
                continue
            params.append(pytest.param((dev, name), id=f"{dev}-{name}"))
    return params


def pytest_generate_tests(metafunc):
    # `device_backend`: every (device, backend) pair; `cpu_backend` / `cuda_backend`:
    # the pairs of one device type.
    if "device_backend" in metafunc.fixturenames:
        metafunc.parametrize("device_backend", device_backend_params())
    if "cpu_backend" in metafunc.fixturenames:
        metafunc.parametrize("cpu_backend", device_backend_params(("cpu",)))
    if "cuda_backend" in metafunc.fixturenames:
        metafunc.parametrize("cuda_backend", device_backend_params(("cuda",)))
