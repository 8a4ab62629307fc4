"""The SM80 kernels' register-operand K order (tests/cuda/sm80_operand_order.cu), checked on
the host with nvcc: it needs no GPU, so a machine without one still proves that the TF32
probabilities meet the right value rows. Skipped where nvcc or the CUTLASS headers are missing,
except under CI, which must run it."""

import os
import pathlib
import shutil
import subprocess

import pytest

from autogen import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("CI", "").lower() in ("1", "true")


def test_accumulator_operand_meets_its_value_rows(tmp_path):
    nvcc, cutlass = shutil.which("nvcc"), registry.cutlass_include()
    if (nvcc is None or cutlass is None) and not REQUIRED:
        pytest.skip("needs nvcc and the nvidia-cutlass headers")
    assert nvcc is not None and cutlass is not None, "CI needs nvcc and nvidia-cutlass"
    exe = tmp_path / "operand_order"
    subprocess.run([nvcc, "-std=c++17", "--expt-relaxed-constexpr", f"-I{ROOT / 'cutlass_kernels'}",
                    f"-I{cutlass}", str(ROOT / "tests" / "cuda" / "sm80_operand_order.cu"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    result = subprocess.run([str(exe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
