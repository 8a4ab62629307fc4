"""Wall-clock measurement of one backend on one problem.

CUDA work is timed with CUDA events around each run (after a synchronize), CPU work with
``time.perf_counter`` (CPU ops are synchronous). Each measurement runs ``warmup`` untimed
iterations, then ``repeat`` timed ones; callers report the median.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

PASSES = ("forward", "fwd+bwd")


@dataclass
class Timing:
    backend: str
    pass_name: str
    times_ms: list = field(default_factory=list)
    flops: int = 0  # flops (2 per multiply-add) of the timed pass
    error: Optional[str] = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else float("nan")

    @property
    def min_ms(self) -> float:
        return min(self.times_ms) if self.times_ms else float("nan")

    @property
    def tflops(self) -> float:
        ms = self.median_ms
        if not self.times_ms or ms <= 0:
            return float("nan")
        return self.flops / (ms * 1e-3) / 1e12

    def to_dict(self) -> dict:
        return {
            "backend": self.backend,
            "pass": self.pass_name,
            "median_ms": None if self.error else self.median_ms,
            "min_ms": None if self.error else self.min_ms,
            "times_ms": list(self.times_ms),
            "flops": self.flops,
            "tflops": None if self.error else self.tflops,
            "error": self.error,
        }


def measure(fn: Callable[[], None], device: torch.device, warmup: int, repeat: int) -> list:
    """Milliseconds of ``repeat`` runs of ``fn`` after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeat):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def forward_fn(problem, backend: str, tiles: Optional[dict] = None) -> Callable[[], None]:
    inputs = problem.make_inputs(requires_grad=False)

    def run():
        with torch.no_grad():
            problem.call(inputs, backend, tiles)

    return run


def fwd_bwd_fn(problem, backend: str, tiles: Optional[dict] = None) -> Callable[[], None]:
    inputs = problem.make_inputs(requires_grad=True)
    leaves = list(inputs.values())
    shape = (problem.batch, *problem.input_size, problem.heads, problem.dim_value)
    grad_out = torch.randn(shape, dtype=torch.float32).to(device=problem.device, dtype=problem.torch_dtype)

    def run():
        out = problem.call(inputs, backend, tiles)
        torch.autograd.grad(out, leaves, grad_out)

    return run


def time_pass(problem, backend: str, pass_name: str, warmup: int, repeat: int,
              tiles: Optional[dict] = None, label: Optional[str] = None) -> Timing:
    """Time one pass; the forward FLOP count is 2 flops per multiply-add, and a backward
    pass counts as 2.5 forward passes (so fwd+bwd = 3.5x forward)."""
    fwd = 2 * problem.forward_flops()
    factory = {"forward": forward_fn, "fwd+bwd": fwd_bwd_fn}[pass_name]
    flops = fwd if pass_name == "forward" else int(3.5 * fwd)
    fn = factory(problem, backend, tiles)
    times = measure(fn, torch.device(problem.device), warmup, repeat)
    return Timing(label or backend, pass_name, times, flops)
