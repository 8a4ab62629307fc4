"""Every GPU backend of the build over ranks 1-3, head dims 8 to 256 and the three 16/32-bit
dtypes, forward and backward, on small problems, against the float64 oracle (skipped without a
GPU). A backend either runs a case and matches the oracle, or refuses it before anything runs
with a ValueError carrying its own stated reason (Backend.unsupported); flex-fna refuses none
of these. Also flex-fna over many shapes in one process, and the profiler's default problem."""

import io
import os
import sys
from dataclasses import replace

import pytest
import torch

from conftest import HAS_CUDA
from fused_checks import Case, call_args, check_fused, dtype_id, make_inputs, op_for_rank

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available")

HEAD_DIMS = (8, 16, 32, 64, 96, 128, 160, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Small problems with a border, an even window, dilation, stride and a causal axis among them; the
# 1-D and 2-D ones give flex-fna's forward 64-token key boxes (the case Inductor once refused).
CASES = {
    1: Case((70,), 9, B=2, H=2),
    2: Case((12, 19), (4, 5), dilation=(1, 2), H=2),
    3: Case((5, 6, 9), 3, stride=(1, 1, 2), causal=(True, False, False), H=2),
}
# Backends that must run every case of this sweep.
RUNS_ALL = ("flex-fna",)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dim", HEAD_DIMS, ids=lambda d: f"hd{d}")
@pytest.mark.parametrize("rank", sorted(CASES), ids=lambda r: f"rank{r}")
def test_sweep(cuda_backend, rank, dim, dtype):
    from natten import backends
    from natten._checks import check_fused as natten_check

    device, name = cuda_backend
    case = replace(CASES[rank], D=dim)
    q, k, v, _, _ = make_inputs(case, dtype, device, requires_grad=True)
    kwargs = call_args(case)
    problem, _ = natten_check(rank, q, k, v, kwargs["kernel_size"], kwargs["stride"], kwargs["dilation"],
                              kwargs["is_causal"], None, None, None)
    reason = backends.get(name).unsupported(problem)
    if reason is not None:
        assert name not in RUNS_ALL, f"{name} refuses {case.id()} {dtype}: {reason}"
        with pytest.raises(ValueError, match="cannot run this problem") as e:
            op_for_rank(rank)(q, k, v, backend=name, **kwargs)
        assert reason in str(e.value)
        assert q.grad is None
        return
    try:
        check_fused(case, dtype, device, name)
    except pytest.skip.Exception as e:  # check_fused skips refusals: here one is a failure
        pytest.fail(f"{name} refused a case its unsupported() accepts: {e}")


def test_flex_fna_under_torch_compile():
    """Under a user's torch.compile, flex-fna runs inside the natten::fna_forward/backward operators,
    and compiles its own FlexAttention call there."""
    import natten
    from oracle import as_tuple, reference_na

    from conftest import assert_close, tolerance

    case = replace(CASES[2], D=64)
    q, k, v, _, _ = make_inputs(case, torch.float16, "cuda", requires_grad=True)
    kernel, dilation = as_tuple(case.kernel, 2), as_tuple(case.dilation, 2)

    def f(q, k, v):
        return natten.na2d(q, k, v, kernel, dilation=dilation, backend="flex-fna") * 2.0

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True)(q, k, v)
    d_out = torch.randn(out.shape, dtype=torch.float64)
    out.backward(d_out.to("cuda", torch.float16))
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in (q, k, v)]
    ref, _ = reference_na(*leaves, kernel, (1, 1), dilation, (False, False))
    (2.0 * ref).backward(d_out.half().double())
    tol = tolerance(torch.float16, "cuda", "flex-fna")
    assert_close(out, 2.0 * ref, tol, "compiled output")
    for name, t, leaf in zip("qkv", (q, k, v), leaves):
        assert_close(t.grad, leaf.grad, tol, f"compiled grad {name}")


def test_flex_many_shapes_stay_compiled():
    """Dynamo runs a function eagerly (for flex_attention: the dense implementation) once it holds
    recompile_limit compiled entries; with the limit at 1, a flex-fna that compiled every shape
    through one function would fail the second shape."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from flex_many_shapes import run_shapes

    with torch._dynamo.config.patch(recompile_limit=1):
        failures = run_shapes(6, log=lambda line: None)
    assert not failures, "\n".join(failures)


def test_profiler_default_problem():
    """`python -m natten.profiler` (no arguments) and with --backprop: a row per backend and pass,
    none of them an error, but for a pass a backend declines (fwd+bwd of a tiled family whose
    build has no backward kernels for the problem), which is a "skipped" line with the reason
    instead of a row. A family the manifest has those kernels of runs fwd+bwd."""
    from autogen import registry
    from natten import _manifest, backends
    from test_profiler import cli, table_rows

    names = backends.names_for_device("cuda")
    # The default problem: 2-D, float16, head dim 64.
    with_backward = {f.backend for f in registry.FAMILIES if f.tiled and any(
        r.family == f.name and r.op == "fna_bwd" and r.rank == 2 and r.dtype == "float16" and r.head_dim >= 64
        for r in _manifest.INSTANTIATIONS)}
    for extra, passes in (([], ["forward"]), (["--backprop"], ["forward", "fwd+bwd"])):
        out = io.StringIO()
        rc = cli.main(extra + ["--warmup", "1", "--repeat", "3"], out=out)
        text = out.getvalue()
        assert rc == 0, text
        assert "input 64x64  batch 2  heads 4  dim 64  kernel 7x7" in text and "float16" in text
        rows = table_rows(text)
        declined = {(n, p) for n in names for p in passes if f"skipped {n} {p}: " in text}
        assert all(p != "forward" for _, p in declined), text
        assert not {n for n, _ in declined} & with_backward, text
        assert [r[:2] for r in rows] == [[n, p] for n in names for p in passes if (n, p) not in declined], text
        for r in rows:
            assert not r[2].startswith("error:"), f"{r[0]} {r[1]}: {r[2]}"
            assert float(r[2]) > 0
