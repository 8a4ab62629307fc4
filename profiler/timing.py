"""Wall-clock measurement of one backend on one problem.

CUDA work is timed with CUDA events around each of back-to-back runs, CPU work with
``time.perf_counter`` (CPU ops are synchronous). Each measurement runs ``warmup`` untimed
iterations, then ``repeat`` timed ones; callers report the median.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch

PASSES = ("forward", "fwd+bwd")


@dataclass
class Timing:
    backend: str
    pass_name: str
    times_ms: list = field(default_factory=list)
    flops: int = 0  # flops (2 per multiply-add) of the timed pass
    error: Optional[str] = None
    host_ms: Optional[float] = None  # host time per run (see measure)

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
            "host_ms": self.host_ms,
            "error": self.error,
        }


def measure(fn: Callable[[], None], device: torch.device, warmup: int, repeat: int) -> Tuple[list, float]:
    """Milliseconds of each of ``repeat`` runs of ``fn`` after ``warmup`` untimed runs, and the
    host's milliseconds per run.

    CUDA runs go back to back, as in a training loop, each between its own pair of events: a
    run's host work (argument checks, launches) overlaps the kernels of the run before, so a
    time is the GPU's time for the run, plus the GPU's wait for the host wherever the host
    cannot keep up. The host time per run (enqueueing, read before the final synchronize) tells
    the two apart."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times, statistics.median(times)
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeat)]
    t0 = time.perf_counter()
    for start, end in events:
        start.record()
        fn()
        end.record()
    host_ms = (time.perf_counter() - t0) * 1e3 / repeat
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events], host_ms


def measure_graph(fn: Callable[[], None], device: torch.device, warmup: int, repeat: int) -> list:
    """Milliseconds of ``repeat`` back-to-back replays of a CUDA graph of one run of ``fn``: the
    GPU's time for the run with no host work in it (Python, checks, launches), which is what a
    small problem's kernels take once its host cost overlaps other work. Raises what capture
    raises for work that cannot be captured."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # capture wants its allocations and lazy set-up done
        for _ in range(max(warmup, 1)):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return measure(graph.replay, device, warmup, repeat)[0]


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
    times, host_ms = measure(fn, torch.device(problem.device), warmup, repeat)
    return Timing(label or backend, pass_name, times, flops, host_ms=host_ms)
