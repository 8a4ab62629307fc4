"""The flex-fna backend: neighbourhood attention through PyTorch FlexAttention.

How a problem becomes one flex call
-----------------------------------
1. Per axis, the window of every coordinate comes from ``natten._C.axis_window`` (the one
   definition of the window); nothing here re-derives window arithmetic.
2. Per axis, coordinates are reordered group-major (all of dilation residue 0, then 1, ...),
   and each dilation group is padded to a multiple of the tile's extent on that axis. In that
   axis space the window of a query is one contiguous interval ``[lo, hi]`` of key positions.
3. Tokens are then ordered box by box: a flex block (``prod(tile)`` tokens) is a box of the
   grid inside one dilation group (e.g. 8x16 in 2-D), so many more blocks are fully dense or
   fully empty than with row-major order. Query and key layouts may use different boxes.
4. The mask of a (query token, key token) pair is ``AND_a lo_a[q] <= pos_a[k] <= hi_a[q]``,
   or true for additional keys (appended after the grid keys, visible to every query). Padded
   keys have position -1 (never visible); padded queries copy the window of a real query of
   their group and are discarded.
5. The block mask (full / partial / empty per block pair) comes from the same window tables
   per axis: a block is a box, so a block pair is visible (full) exactly when its projection on
   every axis is. Nothing on the way grows with the square of the token count.

q/k/v are gathered into that order (one gather each), flex runs, and the output and logsumexp
are scattered back. Masks, permutations and tables are cached per problem.

On CUDA flex runs compiled, with kernel options chosen with the blocks (kernel_options: Inductor
refuses blocks its own configuration does not divide), through compiled callables with symbolic
sizes, one per call signature (_compiled: a process that sees many shapes compiles each signature
once, and Dynamo's recompile limit, which would send it to the dense implementation, is never
reached; a signature that cannot compile shape-generically compiles per exact shape). A call
that cannot be compiled raises.

Backward: CUDA recomputes through flex under autograd. FlexAttention has no backward on the CPU
(torch raises), so on CPU tensors the backward recomputes with a dense masked softmax over the
same tiled layout and mask tables (meant for the small problems of tests and smoke runs). The CPU
forward runs eager flex: compiled CPU flex cannot return the logsumexp (torch 2.13).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import sys
import types
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from natten._checks import FusedProblem, Window
from natten.backends.base import Backend, Tile

_DEFAULT_BLOCK = 128
_MIN_BLOCK = 16
_MAX_HEAD_DIM_CUDA = 256  # larger head dims exceed the shared memory of flex's Triton kernels
_MIN_HEAD_DIM_CUDA = 16  # tl.dot needs K >= 16: smaller head dims are zero-padded to 16
_CACHE_SIZE = 16
# Relative extra cost of a partial block (mask evaluated per element) over a full one; a guess.
_PARTIAL_PENALTY = 0.5
# Queries x keys evaluated at once while classifying blocks (bounds temporary memory).
_CHUNK_ELEMENTS = 1 << 26


def _progress(msg: str) -> None:
    if os.environ.get("NATTEN_QUIET") != "1":
        print(f"[natten flex-fna] {msg}", file=sys.stderr, flush=True)


def _axis_window():
    from natten import _C

    return _C.axis_window


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


# ----------------------------------------------------------------------------------------
# Per-axis tables
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _AxisGeometry:
    """One axis of a problem in a group-major, per-group padded axis space."""

    extent: int
    dilation: int
    offsets: Tuple[int, ...]  # start of each dilation group in axis space
    group_len: Tuple[int, ...]  # real coordinates per group
    length: int  # axis-space length (groups padded)

    @staticmethod
    def build(extent: int, dilation: int, tile: int) -> "_AxisGeometry":
        group_len = tuple(len(range(r, extent, dilation)) for r in range(dilation))
        padded = [math.ceil(g / tile) * tile for g in group_len]
        offsets = tuple(sum(padded[:r]) for r in range(dilation))
        return _AxisGeometry(extent, dilation, offsets, group_len, sum(padded))

    def position(self, x: torch.Tensor) -> torch.Tensor:
        """Axis-space position of real coordinates x."""
        off = torch.tensor(self.offsets, dtype=torch.long)
        return off[x % self.dilation] + x // self.dilation

    def real_of_position(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(real coordinate, valid) of every axis-space position; a pad position gets the last
        real coordinate of its group (so padded queries copy a real window)."""
        real = torch.empty(self.length, dtype=torch.long)
        valid = torch.zeros(self.length, dtype=torch.bool)
        for r, (off, g) in enumerate(zip(self.offsets, self.group_len)):
            end = self.offsets[r + 1] if r + 1 < self.dilation else self.length
            i = torch.arange(end - off)
            real[off:end] = torch.clamp(i, max=g - 1) * self.dilation + r
            valid[off:end] = i < g
        return real, valid


def _axis_intervals(extent: int, kernel: int, stride: int, dilation: int, causal: bool):
    """(first, last) per real coordinate, in dilation-group coordinates, from natten._C."""
    window = _axis_window()
    rows = [window(extent, kernel, stride, dilation, causal, x) for x in range(extent)]
    first = torch.tensor([r[1] for r in rows], dtype=torch.long)
    last = torch.tensor([r[2] for r in rows], dtype=torch.long)
    return first, last


# ----------------------------------------------------------------------------------------
# Layouts: token order, tables, block mask
# ----------------------------------------------------------------------------------------


def _box_order(lengths: Sequence[int], tile: Sequence[int]) -> List[torch.Tensor]:
    """Per axis, the axis-space position of every token when the (tile-divisible) grid
    `lengths` is walked box by box (boxes row-major, row-major inside a box)."""
    rank = len(lengths)
    counts = [L // t for L, t in zip(lengths, tile)]
    full = (*counts, *tile)
    out = []
    for a in range(rank):
        shape = [1] * (2 * rank)
        shape[a] = counts[a]
        box = torch.arange(counts[a]).view(shape) * tile[a]
        shape = [1] * (2 * rank)
        shape[rank + a] = tile[a]
        inner = torch.arange(tile[a]).view(shape)
        out.append((box + inner).expand(full).reshape(-1))
    return out


def _row_major_order(spatial: Sequence[int]) -> List[torch.Tensor]:
    """Per axis, the real coordinate of every token in row-major order."""
    grids = torch.meshgrid(*[torch.arange(L) for L in spatial], indexing="ij")
    return [g.reshape(-1) for g in grids]


def _flat_index(coords: Sequence[torch.Tensor], spatial: Sequence[int]) -> torch.Tensor:
    flat = torch.zeros_like(coords[0])
    for x, L in zip(coords, spatial):
        flat = flat * L + x
    return flat


def _pad_to(t: torch.Tensor, n: int, value) -> torch.Tensor:
    if t.numel() == n:
        return t
    return torch.cat([t, t.new_full((n - t.numel(),), value)])


@dataclass
class Layout:
    """Everything flex needs for one problem shape: token order of queries and keys, mask
    tables (per axis: query window [lo, hi] and key position in key axis space), and the block
    mask. Built once per (problem, tiles, device) and cached."""

    q_gather: torch.Tensor  # [NQ] flat real token of each query slot (pads repeat a real one)
    q_scatter: torch.Tensor  # [N] query slot of each real token
    kv_gather: torch.Tensor  # [NKgrid] flat real token of each grid key slot
    num_q: int  # NQ (multiple of the query block)
    num_kv_grid: int
    num_kv: int  # grid keys + additional keys, padded to the key block
    num_extra: int
    q_lo: List[torch.Tensor]
    q_hi: List[torch.Tensor]
    kv_pos: List[torch.Tensor]
    kv_extra: torch.Tensor
    block: Tuple[int, int]
    block_mask: object = None

    def mask(self, q_idx, kv_idx):
        keep = self.kv_extra[kv_idx]
        grid = None
        for lo, hi, pos in zip(self.q_lo, self.q_hi, self.kv_pos):
            p = pos[kv_idx]
            ok = (lo[q_idx] <= p) & (p <= hi[q_idx])
            grid = ok if grid is None else grid & ok
        return keep | grid

    def dense_mask(self, q_rows: Optional[slice] = None) -> torch.Tensor:
        """Bool [rows, num_kv] of the mask (all rows by default)."""
        q = torch.arange(self.num_q, device=self.kv_extra.device)
        if q_rows is not None:
            q = q[q_rows]
        kv = torch.arange(self.num_kv, device=self.kv_extra.device)
        return self.mask(q[:, None], kv[None, :])


def _build_layout(problem: FusedProblem, q_tile: Optional[Tile], kv_tile: Optional[Tile],
                  device: torch.device) -> Layout:
    """q_tile/kv_tile None: plain row-major token order, blocks of 128 consecutive tokens."""
    w = problem.window
    spatial = problem.spatial
    rank = len(spatial)
    intervals = [_axis_intervals(L, k, s, d, c) for L, k, s, d, c in
                 zip(spatial, w.kernel_size, w.stride, w.dilation, w.is_causal)]
    row_major = q_tile is None
    if row_major:
        q_block = kv_block = _DEFAULT_BLOCK
        q_geo = kv_geo = [_AxisGeometry.build(L, d, 1) for L, d in zip(spatial, w.dilation)]
    else:
        q_block, kv_block = math.prod(q_tile), math.prod(kv_tile)
        q_geo = [_AxisGeometry.build(L, d, t) for L, d, t in zip(spatial, w.dilation, q_tile)]
        kv_geo = [_AxisGeometry.build(L, d, t) for L, d, t in zip(spatial, w.dilation, kv_tile)]

    # Token order -> real coordinates (and validity) per axis.
    def tokens(geo, tile):
        if row_major:
            coords = _row_major_order(spatial)
            return coords, torch.ones_like(coords[0], dtype=torch.bool)
        positions = _box_order([g.length for g in geo], tile)
        coords, valid = [], None
        for g, p in zip(geo, positions):
            real, ok = g.real_of_position()
            coords.append(real[p])
            valid = ok[p] if valid is None else valid & ok[p]
        return coords, valid

    q_coords, q_valid = tokens(q_geo, q_tile)
    kv_coords, kv_valid = tokens(kv_geo, kv_tile)
    num_q = math.ceil(q_coords[0].numel() / q_block) * q_block
    num_kv_grid = math.ceil(kv_coords[0].numel() / kv_block) * kv_block
    num_kv = math.ceil((num_kv_grid + problem.num_extra) / kv_block) * kv_block

    # Query tables: window interval of each query slot, in key axis space.
    q_lo, q_hi, kv_pos = [], [], []
    for a in range(rank):
        first, last = intervals[a]
        x = q_coords[a]
        g = kv_geo[a]
        base = torch.tensor(g.offsets, dtype=torch.long)[x % g.dilation]
        lo, hi = base + first[x], base + last[x]
        # row-major padding slots copy the last real query
        q_lo.append(_pad_to(lo, num_q, int(lo[-1])))
        q_hi.append(_pad_to(hi, num_q, int(hi[-1])))
        pos = torch.where(kv_valid, g.position(kv_coords[a]), torch.full_like(kv_coords[a], -1))
        kv_pos.append(_pad_to(pos, num_kv, -1))
    kv_extra = torch.zeros(num_kv, dtype=torch.bool)
    kv_extra[num_kv_grid:num_kv_grid + problem.num_extra] = True

    q_flat = _pad_to(_flat_index(q_coords, spatial), num_q, 0)
    q_real = _pad_to(q_valid, num_q, False)
    q_scatter = torch.empty(math.prod(spatial), dtype=torch.long)
    q_scatter[q_flat[q_real]] = torch.arange(num_q)[q_real]
    kv_flat = _pad_to(_flat_index(kv_coords, spatial), num_kv_grid, 0)

    to = lambda t: t.to(device=device, dtype=torch.int32)  # noqa: E731
    layout = Layout(
        q_gather=q_flat.to(device), q_scatter=q_scatter.to(device), kv_gather=kv_flat.to(device),
        num_q=num_q, num_kv_grid=num_kv_grid, num_kv=num_kv, num_extra=problem.num_extra,
        q_lo=[to(t) for t in q_lo], q_hi=[to(t) for t in q_hi], kv_pos=[to(t) for t in kv_pos],
        kv_extra=kv_extra.to(device), block=(q_block, kv_block))
    if row_major:
        nonempty, full = _element_block_tables(layout)
    else:
        nonempty, full = _box_block_tables(q_geo, kv_geo, intervals, q_tile, kv_tile, layout)
    layout.block_mask = _block_mask(layout, nonempty.to(device), full.to(device))
    return layout


def _block_indices(m: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    num = m.sum(-1, dtype=torch.int32)
    idx = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num[None, None].contiguous(), idx[None, None].contiguous()


def _element_block_tables(layout: Layout) -> Tuple[torch.Tensor, torch.Tensor]:
    """(nonempty, full) bool [query blocks, key blocks] from the element mask, evaluated chunk by
    chunk: for row-major layouts, whose blocks are not boxes of the grid."""
    qb, kb = layout.block
    nkb = layout.num_kv // kb
    rows = max(1, _CHUNK_ELEMENTS // (layout.num_kv * qb)) * qb
    any_parts, all_parts = [], []
    for start in range(0, layout.num_q, rows):
        m = layout.dense_mask(slice(start, min(start + rows, layout.num_q)))
        m = m.view(-1, qb, nkb, kb)
        any_parts.append(m.any(3).any(1))
        all_parts.append(m.all(3).all(1))
    return torch.cat(any_parts), torch.cat(all_parts)


def _axis_box_tables(q_geo: _AxisGeometry, kv_geo: _AxisGeometry, first: torch.Tensor,
                     last: torch.Tensor, q_t: int, kv_t: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Along one axis, (some, every) bool [query boxes, key boxes]: some query of the box sees some
    key of the other, every query sees every key. Windows are intervals, so a box's windows all
    lie inside [least start, greatest end] (`some` may only err towards true, which costs a masked
    block, never a result) and all contain [greatest start, least end] (`every` is exact). A key
    box holds a prefix of real keys (groups are padded at their end)."""
    real, _ = q_geo.real_of_position()  # padding queries repeat a real window
    base = torch.tensor(kv_geo.offsets, dtype=torch.long)[real % q_geo.dilation]
    lo, hi = (base + first[real]).view(-1, q_t), (base + last[real]).view(-1, q_t)
    _, kv_valid = kv_geo.real_of_position()
    n_real = kv_valid.view(-1, kv_t).sum(1)
    start = torch.arange(n_real.numel()) * kv_t
    some = (n_real > 0) & (lo.min(1).values[:, None] <= start + n_real - 1) & (hi.max(1).values[:, None] >= start)
    every = (n_real == kv_t) & (lo.max(1).values[:, None] <= start) & (hi.min(1).values[:, None] >= start + kv_t - 1)
    return some, every


def _outer_and(acc: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[i, j] & [k, l] -> [i * k + row, j * l + column]: boxes numbered row-major over the axes."""
    return (acc[:, None, :, None] & t[None, :, None, :]).reshape(acc.shape[0] * t.shape[0], -1)


def _box_block_tables(q_geo, kv_geo, intervals, q_tile: Tile, kv_tile: Tile,
                      layout: Layout) -> Tuple[torch.Tensor, torch.Tensor]:
    """(nonempty, full) bool [query blocks, key blocks] of a tiled layout without evaluating its
    element mask (whose size grows with the square of the token count): blocks are boxes, and the
    mask is a product over axes, so a block pair is visible (full) exactly when its projection on
    every axis is. Blocks of additional keys are seen by every query, and full unless padded."""
    nonempty = full = torch.ones(1, 1, dtype=torch.bool)
    for a in range(len(q_tile)):
        some, every = _axis_box_tables(q_geo[a], kv_geo[a], *intervals[a], q_tile[a], kv_tile[a])
        nonempty, full = _outer_and(nonempty, some), _outer_and(full, every)
    kb = layout.block[1]
    extra_blocks = layout.num_kv // kb - nonempty.shape[1]
    if extra_blocks:
        ends = (torch.arange(extra_blocks) + 1) * kb + layout.num_kv_grid
        whole = (ends <= layout.num_kv_grid + layout.num_extra).expand(nonempty.shape[0], -1)
        nonempty = torch.cat([nonempty, torch.ones_like(whole)], 1)
        full = torch.cat([full, whole], 1)
    return nonempty, full


def _block_mask(layout: Layout, nonempty: torch.Tensor, full: torch.Tensor):
    """BlockMask from the (nonempty, full) tables of the layout's block pairs."""
    from torch.nn.attention.flex_attention import BlockMask

    partial = nonempty & ~full
    kv_num, kv_idx = _block_indices(partial)
    full_num, full_idx = _block_indices(full)
    assert nonempty.shape == (layout.num_q // layout.block[0], layout.num_kv // layout.block[1])
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=layout.block,
                                    mask_mod=_mask_mod(layout), seq_lengths=(layout.num_q, layout.num_kv))


def _mask_mod(layout: Layout) -> Callable:
    q_lo, q_hi, kv_pos, kv_extra = tuple(layout.q_lo), tuple(layout.q_hi), tuple(layout.kv_pos), layout.kv_extra

    def mask_mod(b, h, q_idx, kv_idx):
        keep = None
        for lo, hi, pos in zip(q_lo, q_hi, kv_pos):
            p = pos[kv_idx]
            ok = (lo[q_idx] <= p) & (p <= hi[q_idx])
            keep = ok if keep is None else keep & ok
        return keep | kv_extra[kv_idx]

    return mask_mod


_LAYOUTS: "OrderedDict[tuple, Layout]" = OrderedDict()


def get_layout(problem: FusedProblem, q_tile: Optional[Tile], kv_tile: Optional[Tile]) -> Layout:
    """The cached layout of a problem (q_tile None: row-major order, as a plain NA block mask)."""
    key = (problem.spatial, problem.window, problem.num_extra, str(problem.device), q_tile, kv_tile)
    layout = _LAYOUTS.get(key)
    if layout is not None:
        _LAYOUTS.move_to_end(key)
        return layout
    what = "row-major" if q_tile is None else f"q box {q_tile}, kv box {kv_tile}"
    if math.prod(problem.spatial) >= 4096:
        _progress(f"building block mask for {problem.spatial}, window {problem.window.kernel_size} ({what})")
    layout = _build_layout(problem, q_tile, kv_tile, problem.device)
    _LAYOUTS[key] = layout
    while len(_LAYOUTS) > _CACHE_SIZE:
        _LAYOUTS.popitem(last=False)
    return layout


def problem_of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_k: Optional[torch.Tensor],
               window: Window) -> FusedProblem:
    rank = window.rank
    return FusedProblem(window, tuple(q.shape[1:rank + 1]), q.shape[0], q.shape[-2], k.shape[-2],
                        q.shape[-1], v.shape[-1], 0 if extra_k is None else extra_k.shape[1],
                        q.dtype, q.device, False)


# ----------------------------------------------------------------------------------------
# FlexAttention's kernel configurations (CUDA)
# ----------------------------------------------------------------------------------------


def inductor_configs(device: torch.device, dtype: torch.dtype, head_dim: int, backward: bool) -> list:
    """The kernel configurations (block sizes, stages, warps) that Inductor's lowering of
    flex_attention tries for this GPU, dtype and query head dim (torch's template heuristics, read
    where the lowering reads them). Its forward raises unless our blocks are multiples of the
    configuration's BLOCK_M/BLOCK_N or the kernel options replace them; its backward drops every
    configuration whose blocks do not divide ours, and fails when none is left."""
    from torch._inductor.virtualized import V

    with torch.cuda.device(device):
        if backward:
            return list(V.choices.get_flex_attention_bwd_configs(head_dim, dtype, "cuda"))
        return list(V.choices.get_flex_attention_fwd_configs(head_dim, dtype, "cuda"))


def _flex_head_dim(dim: int) -> int:
    """The query head dim flex sees (smaller ones are zero-padded, see _pad_head_dim)."""
    return max(dim, _MIN_HEAD_DIM_CUDA)


@functools.lru_cache(maxsize=None)
def kernel_options(device: torch.device, dtype: torch.dtype, head_dim: int, blocks: Tuple[int, int]) -> dict:
    """Options of every CUDA flex call with these blocks (query, key) and flex head dim.

    BACKEND TRITON: the kernels whose configurations are read here (AUTO takes a decoding kernel,
    with rules of its own, below 128 queries). fwd_BLOCK_M/N and fwd_num_stages: the forward's
    blocks and stages are at most Inductor's and its blocks at most ours; all are powers of two,
    so they divide ours, and no larger than a configuration made to fit the GPU's shared memory.
    The configurations are those of the head dim and of the power of two the kernel pads it to
    (a head dim of 160 runs the tiles of 256, which Inductor sizes smaller than its default). The
    backward keeps Inductor's configuration; check_tiles makes sure it divides the blocks."""
    padded = 1 << (head_dim - 1).bit_length()
    configs = inductor_configs(device, dtype, head_dim, False) + inductor_configs(device, dtype, padded, False)
    return {"BACKEND": "TRITON",
            "fwd_BLOCK_M": min([blocks[0]] + [c.block_m for c in configs]),
            "fwd_BLOCK_N": min([blocks[1]] + [c.block_n for c in configs]),
            "fwd_num_stages": min(c.num_stages for c in configs)}


def backward_blocks_problem(device: torch.device, dtype: torch.dtype, head_dim: int,
                            blocks: Tuple[int, int]) -> Optional[str]:
    """Why Inductor's flex backward cannot run these blocks (query, key) on this GPU, or None."""
    configs = inductor_configs(device, dtype, _flex_head_dim(head_dim), True)
    q_block, kv_block = blocks
    for c in configs:
        if (q_block % c.block_m1 == 0 and q_block % c.block_m2 == 0 and kv_block % c.block_n1 == 0
                and kv_block % c.block_n2 == 0):
            return None
    c = configs[-1]
    return (f"FlexAttention's CUDA backward runs {str(dtype).replace('torch.', '')} at head dim {head_dim} "
            f"on this GPU in blocks of {max(c.block_m1, c.block_m2)} queries and {max(c.block_n1, c.block_n2)} "
            f"keys, so backward tiles must hold multiples of those (got {q_block} and {kv_block} tokens; "
            f"the default backward tiles hold {_DEFAULT_BLOCK} each)")


# ----------------------------------------------------------------------------------------
# Running flex
# ----------------------------------------------------------------------------------------

_FLEX = None  # torch.nn.attention.flex_attention, imported on first use (a slow import)


def _flex_module():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention import flex_attention

        _FLEX = flex_attention
    return _FLEX


def compiled_flex(q, k, v, block_mask, scale: float, kernel_options: Optional[dict] = None):
    """The output of compiled flex_attention alone, for callers that time or test flex itself on
    prepared tensors (benchmark peers, tests); the same compiled callables as the backend's."""
    return _call_compiled(q, k, v, block_mask, scale, kernel_options, None)


def _flex_call(q, k, v, block_mask, scale, enable_gqa, kernel_options, aux):
    return _FLEX.flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                                kernel_options=kernel_options, return_aux=aux)


_COMPILED: "OrderedDict[tuple, Callable]" = OrderedDict()
_COMPILED_CACHE_SIZE = 256
_COMPILED_NAMES = itertools.count()
# Signatures whose shape-generic callable could not serve (a failed compile, or its recompile
# limit reached): they compile per exact shape instead.
_PER_SHAPE: set = set()


def _compiled(key: tuple, dynamic: bool) -> Callable:
    """The compiled callable of `key`, made on its first use.

    Dynamo keeps compiled entries per code object and, past torch._dynamo.config.recompile_limit
    entries (8 by default), runs the function eagerly, which for flex_attention is the unfused
    implementation that materialises every score. Each key gets a code object of its own, so
    its entries count on their own. dynamic: sizes are symbolic, so one compile serves every
    shape of a signature (a training loop over many resolutions compiles once, not per shape).
    fullgraph: a graph break would also run flex eagerly."""
    compiled = _COMPILED.get(key)
    if compiled is None:
        code = _flex_call.__code__.replace(co_name=f"_flex_call_{next(_COMPILED_NAMES)}")
        own = types.FunctionType(code, _flex_call.__globals__, code.co_name)
        compiled = _COMPILED[key] = torch.compile(own, dynamic=dynamic, fullgraph=True)
        while len(_COMPILED) > _COMPILED_CACHE_SIZE:
            _COMPILED.popitem(last=False)
    else:
        _COMPILED.move_to_end(key)
    return compiled


def _global_state() -> tuple:
    """What Dynamo also guards on, besides the arguments, that a training loop may switch between
    calls: a signature includes it, so its code object never needs a second entry for it."""
    return (torch.is_grad_enabled(), torch.is_autocast_enabled("cuda"), torch.get_default_dtype(),
            torch.are_deterministic_algorithms_enabled())


def _captured(mask_mod: Callable) -> tuple:
    """What Dynamo specialises a mask_mod's captures on, besides their tensors' shapes: the length
    of each captured tuple (one table per axis in ours)."""
    return tuple(len(c.cell_contents) if isinstance(c.cell_contents, tuple) else -1
                 for c in mask_mod.__closure__ or ())


class _CompileFailed(Exception):
    """Dynamo or Inductor could not compile a callable (the message says why)."""


def _run_compiled(key: tuple, dynamic: bool, args: tuple, what: str):
    dynamo = torch._dynamo
    first = key not in _COMPILED
    fn = _compiled(key, dynamic)
    _flex_module()  # the compiled body reads it from the module's globals
    if first:
        _progress(f"compiling flex_attention for {what}{' (any shape)' if dynamic else ''}")
    try:
        with dynamo.config.patch(suppress_errors=False):  # an error raises instead of running eagerly
            return fn(*args)
    except BaseException as e:
        # fullgraph makes a recompile past Dynamo's limit raise FailOnRecompileLimitHit
        failed_compile = isinstance(e, (dynamo.exc.TorchDynamoException, dynamo.exc.FailOnRecompileLimitHit))
        if first or failed_compile:
            _COMPILED.pop(key, None)  # a fresh callable (next call) starts with an empty cache
        if not failed_compile:
            raise
        reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise _CompileFailed(f"{type(e).__name__}: {reason.strip()}") from e


def _call_compiled(q, k, v, block_mask, scale: float, kernel_options: Optional[dict], aux):
    """flex_attention through a compiled callable: the shape-generic one of the call's signature,
    or one per exact shape where that cannot serve. A call that cannot be compiled raises; it
    never runs the dense fallback."""
    if torch._dynamo.config.disable:
        raise RuntimeError("flex-fna needs torch.compile, and TorchDynamo is disabled "
                           "(torch._dynamo.config.disable / TORCHDYNAMO_DISABLE=1): FlexAttention "
                           "would then evaluate the whole score matrix")
    # Batch and head counts are part of the signature: flex_attention specialises on them (a new
    # head count recompiles), and a training job meets few of them; token counts stay symbolic.
    signature = (q.shape[0], q.shape[1], k.shape[1], q.shape[-1], v.shape[-1], q.dtype, q.device,
                 q.requires_grad, k.requires_grad,
                 v.requires_grad, block_mask.BLOCK_SIZE, _captured(block_mask.mask_mod), scale,
                 None if kernel_options is None else tuple(sorted(kernel_options.items())), aux is None,
                 _global_state())
    args = (q, k, v, block_mask, scale, q.shape[1] != k.shape[1], kernel_options, aux)
    what = f"q {tuple(q.shape)}, k {tuple(k.shape)}, {q.dtype}, blocks {block_mask.BLOCK_SIZE}"
    if signature not in _PER_SHAPE:
        try:
            return _run_compiled(("any shape", signature), True, args, what)
        except _CompileFailed as e:
            _PER_SHAPE.add(signature)
            _progress(f"shape-generic compile failed ({e}); compiling per shape instead")
    shapes = (tuple(q.shape), q.stride(), tuple(k.shape), k.stride(), tuple(v.shape), v.stride())
    try:
        return _run_compiled((signature, shapes), False, args, what)
    except _CompileFailed as e:
        raise RuntimeError(
            f"flex-fna could not compile FlexAttention for {what}, kernel options {kernel_options}: "
            f"{e} (flex-fna does not fall back to a dense evaluation)") from e


def _use_compile(device: torch.device) -> bool:
    """Compiled flex on CUDA. On the CPU, compiled flex (torch 2.13) is inference-only and cannot
    return the logsumexp, which every natten op returns, so the backend runs eager flex there
    (it evaluates every score: fine for the tiny problems of tests and smoke runs only)."""
    return device.type == "cuda"


def run_flex(q, k, v, block_mask, scale: float, compiled: bool = True):
    """flex_attention on heads-first [B, H, N, D] tensors; returns (out, natural-log lse). Compiled
    calls on CUDA get kernel options that fit their blocks (kernel_options)."""
    fa = _flex_module()
    aux = fa.AuxRequest(lse=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if not compiled:  # eager on purpose (see _use_compile)
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
            out, result = fa.flex_attention(q, k, v, block_mask=block_mask, scale=scale,
                                            enable_gqa=q.shape[1] != k.shape[1], return_aux=aux)
        else:
            options = (kernel_options(q.device, q.dtype, q.shape[-1], block_mask.BLOCK_SIZE)
                       if q.device.type == "cuda" else None)
            out, result = _call_compiled(q, k, v, block_mask, scale, options, aux)
    return out, result.lse


def _heads_first(t: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """[B, *S, H, D] -> [B, H, len(gather), D] in layout order."""
    B, H, D = t.shape[0], t.shape[-2], t.shape[-1]
    return t.reshape(B, -1, H, D).index_select(1, gather).transpose(1, 2)


def _pad_dim(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t if t.shape[-1] >= dim else torch.nn.functional.pad(t, (0, dim - t.shape[-1]))


def _prepare(layout: Layout, q, k, v, extra_k, extra_v, pad_head_dim: int):
    qf = _heads_first(q, layout.q_gather)
    kf = _heads_first(k, layout.kv_gather)
    vf = _heads_first(v, layout.kv_gather)
    pad_kv = layout.num_kv - layout.num_kv_grid
    if pad_kv:
        parts_k, parts_v = [kf], [vf]
        if extra_k is not None:
            parts_k.append(extra_k.transpose(1, 2))
            parts_v.append(extra_v.transpose(1, 2))
        rest = pad_kv - layout.num_extra
        if rest:
            parts_k.append(kf.new_zeros((*kf.shape[:2], rest, kf.shape[-1])))
            parts_v.append(vf.new_zeros((*vf.shape[:2], rest, vf.shape[-1])))
        kf, vf = torch.cat(parts_k, 2), torch.cat(parts_v, 2)
    if pad_head_dim:
        qf, kf, vf = (_pad_dim(t, pad_head_dim) for t in (qf, kf, vf))
    return qf, kf, vf


def _finish(layout: Layout, out_f, lse_f, spatial, dim_v: int):
    """Flex outputs in layout order -> ([B, *S, H, Dv], [B, *S, H] float32)."""
    B, H = out_f.shape[0], out_f.shape[1]
    out = out_f[..., :dim_v].transpose(1, 2).index_select(1, layout.q_scatter)
    lse = lse_f.transpose(1, 2).index_select(1, layout.q_scatter)
    return out.reshape(B, *spatial, H, dim_v), lse.reshape(B, *spatial, H).float()


def _dense_attention(layout: Layout, qf, kf, vf, scale: float):
    """Masked softmax over the layout's mask; differentiable (the CPU backward)."""
    G = qf.shape[1] // kf.shape[1]
    kf = kf.repeat_interleave(G, dim=1)
    vf = vf.repeat_interleave(G, dim=1)
    acc = torch.float32
    scores = (qf.to(acc) @ kf.to(acc).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~layout.dense_mask(), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.exp(scores - lse[..., None]) @ vf.to(acc)
    return out.to(qf.dtype), lse


# ----------------------------------------------------------------------------------------
# Tiles
# ----------------------------------------------------------------------------------------


def _group_extent(problem: FusedProblem, axis: int) -> int:
    return math.ceil(problem.spatial[axis] / problem.window.dilation[axis])


def _axis_block_pairs(extent: int, kernel: int, stride: int, dilation: int, causal: bool,
                      tile: int) -> Tuple[int, int]:
    """(visible, full) pairs of (query tile, key tile) along one axis, for tiles of `tile`
    coordinates of each dilation group (groups padded to whole tiles; a padding query repeats
    its group's last window, a padding key is seen by none): visible when some query of the one
    sees some key of the other, full when every query sees every key. Windows are
    intervals whose bounds grow with the query, so a tile's union of windows runs from its
    first query's first key to its last query's last key, and their intersection the other
    way round."""
    from natten import _C

    visible = full = 0
    for lo, hi, all_lo, all_hi in _C.tile_key_ranges(extent, kernel, stride, dilation, causal, tile):
        # key tiles meeting [lo, hi]; key tiles inside [all_lo, all_hi] and the group
        visible += hi // tile - lo // tile + 1
        full += max(0, (all_hi + 1) // tile - (all_lo + tile - 1) // tile)
    return visible, full


def _box_cost(problem: FusedProblem, box: Sequence[int]) -> float:
    """Cost of query and key boxes `box`: the blocks flex visits per (batch, head), a partial
    block (its mask evaluated per element) counted _PARTIAL_PENALTY dearer than a full one. A
    block is visited (or full) exactly when its projections on every axis are, so the counts
    are products of per-axis counts."""
    visible = full = 1
    w = problem.window
    for a, t in enumerate(box):
        v, f = _axis_block_pairs(problem.spatial[a], w.kernel_size[a], w.stride[a], w.dilation[a],
                                 w.is_causal[a], t)
        visible, full = visible * v, full * f
    return full + (1 + _PARTIAL_PENALTY) * (visible - full)


def default_box(problem: FusedProblem, block: int = _DEFAULT_BLOCK) -> Tile:
    """The rule: among all boxes of power-of-two extents holding `block` tokens, the one of least
    `_box_cost` (ties: the larger extents on the later axes). Large windows get boxes shaped like
    the window (P2: 128x128, window 32x32 -> 8x16); small windows on narrow grids get whole rows
    (64x64, window 7 -> 2x64, i.e. row-major); dilation groups shorter than a box are padded."""
    rank = problem.rank
    exps = int(math.log2(block))
    best = None
    for split in _splits(exps, rank):
        box = tuple(1 << e for e in split)
        key = (_box_cost(problem, box), tuple(-t for t in reversed(box)))
        if best is None or key < best[0]:
            best = (key, box)
    return best[1]


def _splits(total: int, parts: int):
    if parts == 1:
        yield (total,)
        return
    for e in range(total + 1):
        for rest in _splits(total - e, parts - 1):
            yield (e, *rest)


def _autograd_keys():
    K = torch._C.DispatchKey
    keys = torch._C.DispatchKeySet(K.AutogradFunctionality)
    for k in (K.AutogradOther, K.AutogradNestedTensor):
        keys = keys | torch._C.DispatchKeySet(k)
    return keys


@contextlib.contextmanager
def _autograd_on():
    """Autograd inside a custom op's implementation: torch.library runs it with the autograd
    dispatch keys excluded (torch.enable_grad alone records nothing there), so re-include them
    for the recomputation that fna_backward differentiates."""
    exclude = torch._C._dispatch_tls_local_exclude_set() - _autograd_keys()
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), \
            torch.enable_grad():
        yield


class FlexBackend(Backend):
    name = "flex-fna"
    device_type = "cuda"

    def is_available(self) -> bool:
        try:
            from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401

            _axis_window()
        except ImportError:
            return False
        return True

    def unsupported(self, problem: FusedProblem) -> Optional[str]:
        if problem.device.type not in ("cuda", "cpu"):
            return f"inputs are on {problem.device}; flex-fna runs on CUDA (and on the CPU for tests)"
        if problem.dtype == torch.float64:
            return "float64 is not supported by FlexAttention kernels (use float32, float16 or bfloat16)"
        if problem.device.type == "cuda":
            if max(problem.dim, problem.dim_v) > _MAX_HEAD_DIM_CUDA:
                return (f"head dim {problem.dim} / value head dim {problem.dim_v} exceeds "
                        f"{_MAX_HEAD_DIM_CUDA}, the largest FlexAttention runs on CUDA")
        return None

    def check_tiles(self, problem: FusedProblem, q_tile: Tile, kv_tile: Tile,
                    backward: bool = False) -> Optional[str]:
        for name, tile in (("q", q_tile), ("kv", kv_tile)):
            n = math.prod(tile)
            if not _is_pow2(n) or n < _MIN_BLOCK:
                return (f"a {name} tile is one flex block, so its token count (here {n}) must be a "
                        f"power of two >= {_MIN_BLOCK} (e.g. 8x16 = 128)")
            if problem.device.type == "cuda" and n > _DEFAULT_BLOCK:
                return f"{name} tile holds {n} tokens; FlexAttention's CUDA kernels take at most {_DEFAULT_BLOCK}"
        if backward and problem.device.type == "cuda":
            return backward_blocks_problem(problem.device, problem.dtype, problem.dim,
                                           (math.prod(q_tile), math.prod(kv_tile)))
        return None

    def default_tiles(self, problem: FusedProblem, backward: bool) -> Tuple[Tile, Tile]:
        # Measured on an H100 (bf16): 2-D windows gain from key boxes of half a query box (P2:
        # 1.32 ms against 1.70 ms with 128-token key boxes), while 3-D ones lose (P3: 11.4 ms
        # against 11.0 ms), so halving is the rule up to rank 2.
        # The backward reruns flex under autograd; Inductor's backward blocks (at most 128 queries
        # and keys) divide 128-token tiles on every GPU.
        kv_block = _DEFAULT_BLOCK // 2 if problem.rank <= 2 and not backward else _DEFAULT_BLOCK
        return default_box(problem), default_box(problem, kv_block)

    def _layout(self, q, k, v, extra_k, window, q_tile, kv_tile) -> Layout:
        return get_layout(problem_of(q, k, v, extra_k, window), tuple(q_tile), tuple(kv_tile))

    @staticmethod
    def _pad_head_dim(q, v) -> int:
        if q.device.type == "cuda" and min(q.shape[-1], v.shape[-1]) < _MIN_HEAD_DIM_CUDA:
            return _MIN_HEAD_DIM_CUDA
        return 0

    def _attend(self, layout, q, k, v, extra_k, extra_v, scale, dense: bool):
        pad = self._pad_head_dim(q, v)
        qf, kf, vf = _prepare(layout, q, k, v, extra_k, extra_v, pad)
        if dense:
            out_f, lse_f = _dense_attention(layout, qf, kf, vf, scale)
        else:
            out_f, lse_f = run_flex(qf, kf, vf, layout.block_mask, scale, _use_compile(q.device))
        return _finish(layout, out_f, lse_f, q.shape[1:window_rank(q) + 1], v.shape[-1])

    def fna_forward(self, q, k, v, extra_k, extra_v, window, scale, q_tile, kv_tile):
        layout = self._layout(q, k, v, extra_k, window, q_tile, kv_tile)
        with torch.no_grad():
            return self._attend(layout, q, k, v, extra_k, extra_v, scale, dense=False)

    def fna_backward(self, d_out, d_lse, q, k, v, extra_k, extra_v, out, lse, window, scale, q_tile,
                     kv_tile):
        layout = self._layout(q, k, v, extra_k, window, q_tile, kv_tile)
        inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
        extras = [None if t is None else t.detach().requires_grad_(True) for t in (extra_k, extra_v)]
        with _autograd_on():
            # FlexAttention has no CPU backward: recompute densely over the same layout there.
            o, l = self._attend(layout, *inputs, *extras, scale, dense=q.device.type == "cpu")
            outputs, grads = [o], [d_out]
            if d_lse is not None:
                outputs.append(l)
                grads.append(d_lse.to(l.dtype))
            leaves = inputs + [t for t in extras if t is not None]
            result = torch.autograd.grad(outputs, leaves, grads, allow_unused=True)
        result = [torch.zeros_like(x) if g is None else g for g, x in zip(result, leaves)]
        d_q, d_k, d_v = result[:3]
        d_ek, d_ev = (result[3], result[4]) if extra_k is not None else (None, None)
        return d_q, d_k, d_v, d_ek, d_ev


def window_rank(q: torch.Tensor) -> int:
    return q.dim() - 3
