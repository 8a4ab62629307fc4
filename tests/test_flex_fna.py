"""The flex-fna backend on CPU tensors against the float64 oracle (runs without a GPU).

On the CPU the backend runs eager flex for the forward (compiled CPU flex cannot return the
logsumexp) and a dense recomputation over the same tiled layout for the backward, so these
tests check the layout, permutations, mask tables, extra KV, GQA and gradient wiring. The block
mask itself (full / partial / empty blocks, which eager flex ignores) is checked separately
against the oracle's dense mask, and once through compiled CPU flex, which does use it.

Float32 tolerance is the CPU's 1e-5 (docs/semantics.md): flex's CPU math path accumulates in float32 and lands
near 1e-7 on these sizes."""

import math

import pytest
import torch

from conftest import assert_close, tolerance
from fused_checks import FEATURE_CASES, GEOMETRY_CASES, Case, check_fused
from oracle import as_tuple, na_mask, reference_na

import natten
from natten._checks import check_fused as natten_check_fused
from natten.backends import flex

BACKEND = "flex-fna"
CASES = GEOMETRY_CASES + FEATURE_CASES


@pytest.mark.parametrize("case", CASES, ids=Case.id)
def test_against_oracle(case):
    check_fused(case, torch.float32, "cpu", BACKEND)


@pytest.mark.parametrize("tiles", [((4, 4), (2, 8)), ((16, 1), (1, 16)), ((8, 16), (8, 16))], ids=str)
def test_explicit_tiles(tiles):
    case = Case((9, 7), (4, 3), stride=(2, 1), causal=(False, True), dilation=(2, 1), extra=2, H=2, Hkv=1)
    check_fused(case, torch.float32, "cpu", BACKEND,
                extra_kwargs=dict(q_tile_shape=tiles[0], kv_tile_shape=tiles[1],
                                  backward_q_tile_shape=tiles[1], backward_kv_tile_shape=tiles[0]))


def _problem(shape, kernel, stride=1, dilation=1, causal=False, extra=0):
    q = torch.empty(1, *shape, 1, 16, device="meta")
    ek = torch.empty(1, extra, 1, 16, device="meta") if extra else None
    problem, _ = natten_check_fused(len(shape), q, q, q, kernel, stride, dilation, causal, None, ek, ek)
    # the layout is built on the CPU
    return flex.FusedProblem(**{**problem.__dict__, "device": torch.device("cpu")})


MASK_CASES = [
    ((40,), 9, 2, 3, True, 5, (16,), (32,)),
    ((20, 24), (7, 5), (1, 3), (2, 1), (False, True), 3, (4, 8), (8, 4)),
    ((24, 24), 9, 1, 1, False, 0, None, None),  # row-major
    ((6, 10, 12), (3, 4, 5), (1, 2, 1), (2, 1, 2), (False, False, True), 17, (2, 2, 8), (1, 4, 4)),
]


@pytest.mark.parametrize("spec", MASK_CASES, ids=lambda s: "x".join(map(str, s[0])))
def test_block_mask_matches_oracle(spec):
    """Blocks marked full are fully visible, blocks not listed are fully invisible, and the
    element mask of partial blocks is the window mask of docs/semantics.md, in the layout's token order."""
    shape, kernel, stride, dilation, causal, extra, q_tile, kv_tile = spec
    problem = _problem(shape, kernel, stride, dilation, causal, extra)
    layout = flex.get_layout(problem, q_tile, kv_tile)
    bm = layout.block_mask
    qb, kb = layout.block
    nq, nk = layout.num_q // qb, layout.num_kv // kb

    # expected mask in layout order: oracle mask on real tokens, extras visible, pads invisible
    rank = len(shape)
    ref = na_mask(shape, as_tuple(kernel, rank), as_tuple(stride, rank), as_tuple(dilation, rank),
                  as_tuple(causal, rank))
    expected = torch.zeros(layout.num_q, layout.num_kv, dtype=torch.bool)
    kv_real = torch.zeros(layout.num_kv, dtype=torch.bool)
    kv_real[: layout.num_kv_grid] = layout.kv_pos[0][: layout.num_kv_grid] >= 0
    expected[:, : layout.num_kv_grid] = ref[layout.q_gather][:, layout.kv_gather]
    expected[:, ~kv_real] = False
    expected[:, layout.num_kv_grid: layout.num_kv_grid + extra] = True
    real_q = torch.zeros(layout.num_q, dtype=torch.bool)
    real_q[layout.q_scatter] = True
    assert torch.equal(layout.dense_mask()[real_q], expected[real_q]), "mask tables differ from the oracle"

    blocks = expected.view(nq, qb, nk, kb)
    full = torch.zeros(nq, nk, dtype=torch.bool)
    listed = torch.zeros(nq, nk, dtype=torch.bool)
    for num, idx, into in ((bm.full_kv_num_blocks, bm.full_kv_indices, full), (bm.kv_num_blocks, bm.kv_indices, listed)):
        for i in range(nq):
            into[i, idx[0, 0, i, : num[0, 0, i]].long()] = True
    assert not (full & listed).any()
    rows = real_q.view(nq, qb)
    for i in range(nq):
        r = rows[i]
        if not r.any():
            continue
        b = blocks[i][r]  # [real rows, nk, kb]
        assert b[:, full[i]].all(), f"q block {i}: a block marked full has invisible pairs"
        invisible = ~(full[i] | listed[i])
        assert not b[:, invisible].any(), f"q block {i}: a skipped block has visible pairs"
    # tiling must actually skip work on these sizes
    assert (full | listed).sum() < nq * nk


def test_compiled_flex_uses_block_mask():
    """Compiled CPU flex (which honours full/partial/empty blocks) with the tiled layout gives the
    oracle's output. Compiled CPU flex cannot return the LSE, so this bypasses the backend op."""
    torch.manual_seed(0)
    shape, kernel, dilation = (12, 16), (5, 7), (2, 1)
    problem = _problem(shape, kernel, dilation=dilation, extra=3)
    layout = flex.get_layout(problem, (4, 4), (2, 8))
    q, k, v = (torch.randn(1, *shape, 2, 16) for _ in range(3))
    ek, ev = (torch.randn(1, 3, 2, 16) for _ in range(2))
    qf, kf, vf = flex._prepare(layout, q, k, v, ek, ev, 0)
    out_f = flex.compiled_flex()(qf, kf, vf, block_mask=layout.block_mask, scale=0.25)
    out = out_f.transpose(1, 2).index_select(1, layout.q_scatter).reshape(1, *shape, 2, 16)
    ref, _ = reference_na(q.double(), k.double(), v.double(), kernel, (1, 1), dilation, (False, False),
                          scale=0.25, additional_keys=ek.double(), additional_values=ev.double())
    assert_close(out, ref, tolerance(torch.float32), "compiled flex output")


def test_lse_only_backward():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 10, 2, 16, requires_grad=True) for _ in range(3))
    _, lse = natten.na1d(q, k, v, 3, backend=BACKEND, return_lse=True)
    lse.sum().backward()
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    _, ref = reference_na(*leaves, (3,), (1,), (1,), (False,))
    ref.sum().backward()
    for t, l in zip((q, k), leaves):
        assert_close(t.grad, l.grad, tolerance(torch.float32), "grad from lse")
    assert v.grad.abs().max() == 0


def test_rejects_float64_and_bad_tiles():
    q = torch.randn(1, 8, 8, 2, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        natten.na2d(q, q, q, 3, backend=BACKEND)
    q = q.float()
    with pytest.raises(ValueError, match="power of two"):
        natten.na2d(q, q, q, 3, backend=BACKEND, q_tile_shape=(3, 5))


def test_default_box_rule():
    assert flex.default_box(_problem((128, 128), 32)) == (8, 16)
    assert flex.default_box(_problem((16, 64, 64), (8, 16, 16))) == (4, 4, 8)
    assert flex.default_box(_problem((4096,), 255)) == (128,)
    assert flex.default_box(_problem((128, 128), 32), 64) == (8, 8)


@pytest.mark.parametrize("spatial,kernel,stride,dilation,causal,box", [
    ((8, 32, 32), (4, 8, 8), 1, 1, False, (2, 4, 8)),
    ((8, 32, 32), (4, 8, 8), 1, 1, False, (8, 2, 4)),
    ((12, 10), (5, 3), (2, 1), (2, 1), (True, False), (4, 4)),
    ((37,), 9, 3, 3, True, (8,)),
    ((20,), 19, 1, 1, False, (8,)),  # a padded query tile with a full key tile
], ids=str)
def test_box_cost_counts_the_block_mask(spatial, kernel, stride, dilation, causal, box):
    # The rule's cost is exact: full and partial blocks of the built block mask.
    problem = _problem(spatial, kernel, stride, dilation, causal)
    mask = flex.get_layout(problem, box, box).block_mask
    full, partial = int(mask.full_kv_num_blocks.sum()), int(mask.kv_num_blocks.sum())
    assert flex._box_cost(problem, box) == full + (1 + flex._PARTIAL_PENALTY) * partial


def test_listed_for_cuda_only():
    assert BACKEND not in natten.backends.names_for_device("cpu")
    assert BACKEND in natten.backends.names_for_device("cuda")


def test_cuda_backward_tiles_hold_equal_token_counts():
    problem = flex.FusedProblem(**{**_problem((128, 128), 32).__dict__, "device": torch.device("cuda")})
    backend = flex.FlexBackend()
    q, kv = backend.default_tiles(problem, backward=False)
    assert (q, kv) == ((8, 16), (8, 8))
    assert "equal token counts" in backend.check_tiles(problem, q, kv, backward=True)
    q, kv = backend.default_tiles(problem, backward=True)
    assert backend.check_tiles(problem, q, kv, backward=True) is None and q == kv
