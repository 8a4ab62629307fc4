"""Fused ops on every CUDA backend vs the float64 oracle (skipped without a GPU).
Same cases as the CPU file; float64 is CPU-only, and a backend that declines a dtype or
head dim (ValueError naming the reason) is skipped for that case."""

import pytest
import torch

from conftest import LONG_TESTS
from fused_checks import DTYPE_CASES, FEATURE_CASES, GEOMETRY_CASES, LONG_CASES, Case, check_fused, dtype_id

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("case", GEOMETRY_CASES + FEATURE_CASES, ids=Case.id)
def test_geometry_and_features(cuda_backend, case):
    device, backend = cuda_backend
    check_fused(case, torch.float16, device, backend)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=Case.id)
def test_dtypes(cuda_backend, case, dtype):
    device, backend = cuda_backend
    check_fused(case, dtype, device, backend)


@pytest.mark.parametrize("case", GEOMETRY_CASES[:3], ids=Case.id)
def test_backend_none(case):
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    check_fused(case, torch.float16, "cuda", None)


@pytest.mark.skipif(not LONG_TESTS, reason="set NATTEN_LONG_TESTS=1")
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", LONG_CASES, ids=Case.id)
def test_long(cuda_backend, case, dtype):
    device, backend = cuda_backend
    check_fused(case, dtype, device, backend)
