"""Speed-of-light bounds of tiled neighborhood attention.

A tiled kernel computes whole tiles: each query tile scores every key tile its queries'
windows touch, including the pairs no query of the tile sees. Per configuration this module
counts those tile FLOPs, sets them against the useful FLOPs (the exactly visible pairs,
natten.flops), and gives the best time the configuration could reach at dense attention's rate
(the tiles' FLOPs at the TFLOP/s dense SDPA of the same head dim reaches). The window of a
query comes from natten._C.axis_window, the definition every kernel shares.

Which key tiles a query tile touches depends on how a backend lays tiles out:
- ``walk`` (cutlass-fna): the key tiles start at the first key of the union of the query
  tile's windows, per axis and dilation group (``cutlass_kernels/sm80/tile_geometry.cuh``);
- ``aligned`` (flex-fna): key tiles sit on a fixed grid of each (padded) dilation group, so
  a window's union is rounded out to tile boundaries at both ends;
- ``exact`` (cpu, reference): only visible pairs are scored.
Additional keys are scored in whole key tiles by every query tile.

Counts are per (batch entry, head); the problem's head dims are used (a backend that pads
head dims computes more). A backward pass counts 2.5 forward passes over its own tiles, as the
profiler's FLOP convention does.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

LAYOUTS = {"cutlass-fna": "walk", "hopper-fna": "walk", "flex-fna": "aligned", "cpu": "exact",
           "reference": "exact"}
BACKWARD_FACTOR = 2.5


def _group_lengths(extent: int, dilation: int):
    return [extent // dilation + (1 if r < extent % dilation else 0) for r in range(dilation)]


def axis_tile_pairs(extent: int, kernel: int, stride: int, dilation: int, causal: bool,
                    q_tile: int, kv_tile: int, layout: str) -> int:
    """(query, key) pairs the tiles of one axis score, summed over its query tiles: per
    dilation group and query tile, the tile's extent times the keys of the key tiles it
    touches. Pairs are a product over axes, so a grid's count is the product of these."""
    from natten import _C

    if layout == "exact":
        q_tile = kv_tile = 1
    total = 0
    for residue, length in enumerate(_group_lengths(extent, dilation)):
        def window(xi):
            _, first, last = _C.axis_window(extent, kernel, stride, dilation, causal, residue + xi * dilation)
            return first, last

        for begin in range(0, length, q_tile):
            first = window(begin)[0]
            last = window(min(begin + q_tile, length) - 1)[1]
            if layout == "aligned":
                tiles = last // kv_tile - first // kv_tile + 1
            else:
                tiles = math.ceil((last - first + 1) / kv_tile)
            total += q_tile * tiles * kv_tile
    return total


def query_tiles(spatial: Sequence[int], dilation: Sequence[int], q_tile: Sequence[int]) -> int:
    """Query tiles of a grid (per axis, every dilation group is cut into tiles of its own)."""
    return math.prod(sum(math.ceil(g / t) for g in _group_lengths(L, d))
                     for L, d, t in zip(spatial, dilation, q_tile))


def forward_tile_flops(problem, q_tile: Sequence[int], kv_tile: Sequence[int], layout: str) -> int:
    """FLOPs (2 per multiply-add) a forward pass with these tiles computes, over all batch
    entries and heads. `problem` is a profiler Problem."""
    rank = problem.rank
    if layout == "exact":
        q_tile = kv_tile = (1,) * rank
    pairs = math.prod(
        axis_tile_pairs(L, k, s, d, c, tq, tk, layout) for L, k, s, d, c, tq, tk in zip(
            problem.input_size, problem.kernel_size, problem.stride, problem.dilation,
            problem.is_causal, q_tile, kv_tile))
    if problem.extra_kv:
        kv_size = math.prod(kv_tile)
        pairs += (query_tiles(problem.input_size, problem.dilation, q_tile) * math.prod(q_tile)
                  * math.ceil(problem.extra_kv / kv_size) * kv_size)
    return 2 * pairs * (problem.dim + problem.dim_value) * problem.batch * problem.heads


class Bound:
    """The bound of one configuration and pass."""

    def __init__(self, tile_flops: int, useful_flops: int, dense_tflops: Optional[float]):
        self.tile_flops = tile_flops
        self.useful_flops = useful_flops
        self.dense_tflops = dense_tflops

    @property
    def efficiency(self) -> float:
        """Useful FLOPs per FLOP the tiles compute."""
        return self.useful_flops / self.tile_flops if self.tile_flops else float("nan")

    @property
    def best_ms(self) -> Optional[float]:
        """The configuration's time at dense attention's rate, or None when the rate is unknown."""
        if not self.dense_tflops:
            return None
        return self.tile_flops / (self.dense_tflops * 1e12) * 1e3

    def fraction(self, ms: Optional[float]) -> Optional[float]:
        """How close a measured time comes to the bound (1.0: at the bound)."""
        best = self.best_ms
        if best is None or not ms:
            return None
        return best / ms

    def to_dict(self) -> dict:
        return {"tile_flops": self.tile_flops, "useful_flops": self.useful_flops,
                "efficiency": self.efficiency, "dense_tflops": self.dense_tflops, "best_ms": self.best_ms}


def bound(problem, backend: str, pass_name: str, q_tile, kv_tile, backward_q_tile=None,
          backward_kv_tile=None, dense_tflops: Optional[float] = None) -> Bound:
    """The bound of a configuration for "forward" or "fwd+bwd" (backward tiles required)."""
    layout = LAYOUTS.get(backend, "walk")
    useful = 2 * problem.forward_flops()
    tile = forward_tile_flops(problem, q_tile, kv_tile, layout)
    if pass_name == "fwd+bwd":
        useful = int(useful * (1 + BACKWARD_FACTOR))
        tile += int(BACKWARD_FACTOR * forward_tile_flops(problem, backward_q_tile, backward_kv_tile, layout))
    return Bound(tile, useful, dense_tflops)


def measure_dense_tflops(problem, pass_name: str, repeat: int = 10) -> float:
    """TFLOP/s of torch's dense scaled_dot_product_attention on the problem's device, dtype and
    head dims (the problem's heads, 8192 queries and keys: enough to fill a GPU), FLOPs counted
    as the profiler counts them (fwd+bwd: 3.5x forward)."""
    from .timing import measure

    device = torch.device(problem.device)
    # float32 / float64 attention runs torch's math kernel, which holds the whole score matrix.
    tokens = 8192 if problem.torch_dtype in (torch.float16, torch.bfloat16) else 2048
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(width, grad):
        t = torch.randn(1, problem.heads, tokens, width, generator=gen).to(device, problem.torch_dtype)
        return t.requires_grad_(grad)

    grad = pass_name == "fwd+bwd"
    q, k, v = rand(problem.dim, grad), rand(problem.dim, grad), rand(problem.dim_value, grad)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run():
        if grad:
            out = sdpa(q, k, v)
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        else:
            with torch.no_grad():
                sdpa(q, k, v)

    times, _ = measure(run, device, 3, repeat)
    flops = 2 * tokens * tokens * (problem.dim + problem.dim_value) * problem.heads
    if grad:
        flops = int(flops * (1 + BACKWARD_FACTOR))
    ms = sorted(times)[len(times) // 2]
    return flops / (ms * 1e-3) / 1e12
