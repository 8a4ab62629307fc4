"""The arithmetic the tiled families' backends and the flex backend share, on hand-worked cases
(docs/semantics.md gives the window rules): the key range of a query tile, the score elements a
tiled kernel computes, and the default-tile rule of cutlass-fna. Runs on the CPU build."""

import pytest
import torch

from autogen import registry


def _problem(spatial, kernel, stride=None, dilation=None, causal=None, dim=128):
    from natten._checks import FusedProblem, Window

    rank = len(spatial)
    window = Window(tuple(kernel), tuple(stride or (1,) * rank), tuple(dilation or (1,) * rank),
                    tuple(causal or (False,) * rank))
    return FusedProblem(window, tuple(spatial), 1, 16, 16, dim, dim, 0, torch.bfloat16,
                        torch.device("cuda"), False)


# (extent, kernel, stride, dilation, causal, tile) -> per query tile (first, last, full_first, full_last)
KEY_RANGES = [
    # k=3: tile 0..7 reaches keys 0..8 (query 0's window is shifted to 0..2, query 7 sees 6..8) and
    # all of its queries see keys 6..2, i.e. none; tile 8..15 reaches 7..15, all see 13..9.
    ((16, 3, 1, 1, False, 8), [(0, 8, 6, 2), (7, 15, 13, 9)]),
    # causal k=3: query 0 sees 0..0, query 3 sees 1..3; query 4 sees 2..4, query 7 sees 5..7.
    ((8, 3, 1, 1, True, 4), [(0, 3, 1, 0), (2, 7, 5, 4)]),
    # dilation 2 on 7 tokens: groups {0, 2, 4, 6} (length 4) and {1, 3, 5} (length 3), tiles of 2
    # group coordinates; every window of a group of 3 is 0..2, and so is the group-of-4 tile 0..1.
    ((7, 3, 1, 2, False, 2), [(0, 2, 0, 2), (1, 3, 1, 3), (0, 2, 0, 2), (0, 2, 0, 2)]),
    # blocked attention (stride = kernel = 4): each stride group of 4 sees exactly itself.
    ((12, 4, 4, 1, False, 4), [(0, 3, 0, 3), (4, 7, 4, 7), (8, 11, 8, 11)]),
]


@pytest.mark.parametrize("axis,expected", KEY_RANGES)
def test_tile_key_ranges(axis, expected):
    from natten import _C

    assert [tuple(r) for r in _C.tile_key_ranges(*axis)] == expected


@pytest.mark.parametrize("spatial,kernel,stride,dilation,causal,q_box,kv_box,elements", [
    # Tiles 0..7 and 8..15 each reach 9 keys: 3 key boxes of 4, 12 keys for 8 queries each.
    ((16,), (3,), None, None, None, (8,), (4,), 2 * 8 * 12),
    # Four tiles of 2 (one a lone query padded to a whole box), each reaching 3 keys: 2 boxes of 2.
    ((7,), (3,), None, (2,), None, (2,), (2,), 4 * 2 * 4),
    # Causal: tile 0..3 reaches 4 keys (1 box), tile 4..7 reaches 6 (2 boxes).
    ((8,), (3,), None, None, (True,), (4,), (4,), 4 * 4 + 4 * 8),
    ((12,), (4,), (4,), None, None, (4,), (4,), 3 * 4 * 4),
    ((12,), (4,), (4,), None, None, (8,), (4,), 8 * 8 + 8 * 4),
    # 128 tokens, window 32 (16 before the centre, 15 after; centres clamped to 16..112). Boxes of
    # 8: tiles 0, 1, 14, 15 reach 32 keys, the 12 others 39 (5 boxes, 40 keys): 8 * 608 per axis.
    # Boxes of 16: tiles 0 and 7 reach 32 keys, the 6 others 47 (48): 16 * 352 per axis.
    ((128, 128), (32, 32), None, None, None, (8, 16), (8, 8), (8 * 608) * (16 * 352)),
    # 56 tokens, window 7 (centres clamped to 3..52). Boxes of 8: every tile reaches 11 to 14 keys,
    # 2 boxes: 7 * 8 * 16 per axis. Boxes of 16: tiles 0..2 reach 19 to 22 keys (3 boxes), tile
    # 48..55 reaches 11 (2 boxes): 16 * (3 * 24 + 16) per axis.
    ((56, 56), (7, 7), None, None, None, (8, 8), (8, 8), (7 * 8 * 16) ** 2),
    ((56, 56), (7, 7), None, None, None, (16, 8), (8, 8), (16 * 88) * (7 * 8 * 16)),
])
def test_walk_elements(spatial, kernel, stride, dilation, causal, q_box, kv_box, elements):
    from natten.backends.tiled import walk_elements

    assert walk_elements(_problem(spatial, kernel, stride, dilation, causal), q_box, kv_box) == elements


SM80_FORWARD_PAIRS_2D = list(registry.SM80_OPS[0].tiles[2])


@pytest.mark.parametrize("spatial,kernel,dim,expected", [
    # 8x16 and 16x8 tie at 27.4M elements, the 8x8 box computes 23.7M but counts 1.45x at head
    # dim 128 (34.3M): the first of the tied 128-query pairs.
    ((128, 128), (32, 32), 128, ((8, 16), (8, 8))),
    # 8x8 computes 0.80M elements, 8x16 1.26M: the small box wins at every penalty (1.45x: 1.16M).
    ((56, 56), (7, 7), 32, ((8, 8), (8, 8))),
    ((56, 56), (7, 7), 128, ((8, 8), (8, 8))),
])
def test_sm80_default_tiles(monkeypatch, spatial, kernel, dim, expected):
    from natten.backends.sm80 import Sm80Backend

    backend = Sm80Backend()
    monkeypatch.setattr(backend, "configs", lambda problem, backward: SM80_FORWARD_PAIRS_2D)
    assert backend.default_tiles(_problem(spatial, kernel, dim=dim), backward=False) == expected


def test_flex_block_counts_use_the_same_key_ranges():
    from natten.backends.flex import _axis_block_pairs

    # Tiles of 8 on 16 tokens, k=3: tile 0..7 reaches key tiles 0 and 1 (keys 0..8), tile 8..15
    # tiles 0 and 1 (keys 7..15): 4 visible pairs; no key tile is seen by every query of a tile.
    assert _axis_block_pairs(16, 3, 1, 1, False, 8) == (4, 0)
    # Blocked attention: each query tile sees exactly its own key tile, fully.
    assert _axis_block_pairs(12, 4, 4, 1, False, 4) == (3, 3)
