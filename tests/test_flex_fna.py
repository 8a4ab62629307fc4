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


@pytest.mark.parametrize("spec", [c for c in MASK_CASES if c[6] is not None] + [
    ((37,), 9, 3, 3, True, 0, (16,), (64,)),
    ((9, 30), (5, 9), (1, 4), (1, 3), (True, False), 70, (4, 4), (2, 8)),
    ((5, 7, 9), (3, 3, 5), (3, 1, 2), (1, 2, 1), (True, True, False), 0, (4, 2, 4), (2, 2, 4)),
], ids=lambda s: "x".join(map(str, s[0])) + f"-q{s[6]}-kv{s[7]}")
def test_box_tables_match_the_element_mask(spec):
    """The block tables built per axis (memory linear in the blocks) are those of the element
    mask: the same full blocks, the same visible ones."""
    shape, kernel, stride, dilation, causal, extra, q_tile, kv_tile = spec
    layout = flex.get_layout(_problem(shape, kernel, stride, dilation, causal, extra), q_tile, kv_tile)
    nonempty, full = flex._element_block_tables(layout)
    bm = layout.block_mask
    for num, idx, expected in ((bm.full_kv_num_blocks, bm.full_kv_indices, full),
                               (bm.kv_num_blocks, bm.kv_indices, nonempty & ~full)):
        got = torch.zeros_like(expected)
        for i in range(got.shape[0]):
            got[i, idx[0, 0, i, : num[0, 0, i]].long()] = True
        assert torch.equal(got, expected)


def test_compiled_flex_uses_block_mask():
    """Compiled CPU flex (which honours full/partial/empty blocks) with the tiled layout gives the
    oracle's output. Compiled CPU flex cannot return the LSE, so this bypasses the backend op.

    Each shape gets compiled callables of its own: with Dynamo's recompile limit at 1, a second
    shape through one shared callable would run eager flex, the dense implementation, whose
    warning is made an error here."""
    import warnings

    from torch.nn.attention import flex_attention as fa

    torch.manual_seed(0)
    fa._WARNINGS_SHOWN.discard("flex_attention_performance")
    for shape, kernel, dilation in (((12, 16), (5, 7), (2, 1)), ((10, 16), (3, 7), (1, 2))):
        problem = _problem(shape, kernel, dilation=dilation, extra=3)
        layout = flex.get_layout(problem, (4, 4), (2, 8))
        q, k, v = (torch.randn(1, *shape, 2, 16) for _ in range(3))
        ek, ev = (torch.randn(1, 3, 2, 16) for _ in range(2))
        qf, kf, vf = flex._prepare(layout, q, k, v, ek, ev, 0)
        with torch._dynamo.config.patch(recompile_limit=1), warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*flex_attention called without torch.compile")
            out_f = flex.compiled_flex(qf, kf, vf, layout.block_mask, 0.25)
        out = out_f.transpose(1, 2).index_select(1, layout.q_scatter).reshape(1, *shape, 2, 16)
        ref, _ = reference_na(q.double(), k.double(), v.double(), kernel, (1, 1), dilation, (False, False),
                              scale=0.25, additional_keys=ek.double(), additional_values=ev.double())
        assert_close(out, ref, tolerance(torch.float32), f"compiled flex output {shape}")


def test_recompile_limit_is_an_error_not_a_dense_run(monkeypatch):
    """Were every call to share one static callable, the second shape past Dynamo's recompile
    limit (in the shape-generic attempt, then in the per-shape one) raises flex-fna's error
    instead of running flex eagerly."""
    shared = {}
    real = flex._compiled

    def one_callable(key, dynamic):
        return shared.setdefault("fn", real(key, False)) if not shared else shared["fn"]

    monkeypatch.setattr(flex, "_compiled", one_callable)
    with torch._dynamo.config.patch(recompile_limit=1):
        for n, shape in enumerate(((8, 16), (12, 16))):
            layout = flex.get_layout(_problem(shape, 3), (4, 4), (4, 4))
            q = torch.randn(1, *shape, 1, 16)
            qf, kf, vf = flex._prepare(layout, q, q, q, None, None, 0)
            if n == 0:
                flex.compiled_flex(qf, kf, vf, layout.block_mask, 0.5)
                continue
            with pytest.raises(RuntimeError, match="FailOnRecompileLimitHit.*does not fall back"):
                flex.compiled_flex(qf, kf, vf, layout.block_mask, 0.5)


def test_compiled_flex_compiles_once_for_many_shapes():
    """One shape-generic callable serves a signature at every grid size, with the results of
    eager flex: a process that sees many resolutions neither recompiles per shape nor reaches
    Dynamo's recompile limit."""
    flex._COMPILED.clear()
    flex._PER_SHAPE.clear()
    with torch._dynamo.config.patch(recompile_limit=2):
        for shape in ((8, 16), (12, 16), (16, 20), (20, 24), (24, 28)):
            layout = flex.get_layout(_problem(shape, 3), (4, 4), (4, 4))
            q, k, v = (torch.randn(2, *shape, 2, 16) for _ in range(3))
            qf, kf, vf = flex._prepare(layout, q, k, v, None, None, 0)
            out = flex.compiled_flex(qf, kf, vf, layout.block_mask, 0.5)
            expected = flex._flex_module().flex_attention(qf, kf, vf, block_mask=layout.block_mask, scale=0.5)
            assert_close(out, expected, 1e-5, f"grid {shape}")
    assert len(flex._COMPILED) == 1 and not flex._PER_SHAPE


def test_compiled_flex_refuses_to_run_eagerly():
    problem = _problem((8, 16), 3)
    layout = flex.get_layout(problem, (4, 4), (4, 4))
    q = torch.randn(1, 8, 16, 1, 16)
    qf, kf, vf = flex._prepare(layout, q, q, q, None, None, 0)
    # The config's own patch: pytest's monkeypatch (seen with 9.2) restores a module attribute
    # it did not find in the module's __dict__ by deleting it, which hides a torch config entry
    # for every later test.
    with torch._dynamo.config.patch(disable=True), \
            pytest.raises(RuntimeError, match="TorchDynamo is disabled"):
        flex.compiled_flex(qf, kf, vf, layout.block_mask, 0.5)


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


@pytest.fixture
def gpu_capability(monkeypatch):
    """Makes Inductor's flex heuristics answer for a GPU of the given capability (no GPU needed)."""
    import contextlib

    def use(capability):
        flex.kernel_options.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
        monkeypatch.setattr(torch.cuda, "device", lambda *a, **k: contextlib.nullcontext())

    yield use
    flex.kernel_options.cache_clear()


def _cuda_problem(shape, kernel, dtype=torch.float16, dim=64):
    return flex.FusedProblem(**{**_problem(shape, kernel).__dict__, "device": torch.device("cuda"),
                                "dtype": dtype, "dim": dim, "dim_v": dim})


def test_forward_blocks_fit_inductor_on_h100(gpu_capability):
    # The reported failure: on an H100 Inductor tiles float16 at head dim 64 with BLOCK_N 128, which
    # does not divide the 64-token key boxes of 1-D and 2-D forwards.
    gpu_capability((9, 0))
    cuda = torch.device("cuda")
    assert flex.inductor_configs(cuda, torch.float16, 64, False)[-1].block_n == 128
    options = flex.kernel_options(cuda, torch.float16, 64, (128, 64))
    assert options["BACKEND"] == "TRITON"
    assert (options["fwd_BLOCK_M"], options["fwd_BLOCK_N"]) == (128, 64)
    # head dim 160 runs the kernel's 256-wide tiles, so it gets the blocks Inductor gives 256
    conf256 = flex.inductor_configs(cuda, torch.bfloat16, 256, False)[-1]
    options = flex.kernel_options(cuda, torch.bfloat16, 160, (128, 128))
    assert (options["fwd_BLOCK_M"], options["fwd_BLOCK_N"]) == (conf256.block_m, conf256.block_n)


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (9, 0), (10, 0), (12, 0)], ids=str)
def test_default_tiles_fit_inductor_everywhere(gpu_capability, capability):
    """For every rank, dtype and head dim of the GPU sweep, the default tiles give blocks whose
    forward options Inductor accepts (the check its lowering makes) and a backward it can run."""
    gpu_capability(capability)
    backend = flex.FlexBackend()
    shapes = {1: ((300,), 9), 2: ((24, 20), 5), 3: ((6, 8, 10), 3)}
    for rank, (shape, kernel) in shapes.items():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for dim in (8, 16, 32, 64, 96, 128, 160, 256):
                problem = _cuda_problem(shape, kernel, dtype, dim)
                for backward in (False, True):
                    q, kv = backend.default_tiles(problem, backward)
                    assert backend.check_tiles(problem, q, kv, backward) is None
                    blocks = (math.prod(q), math.prod(kv))
                    options = flex.kernel_options(problem.device, dtype, max(dim, 16), blocks)
                    for conf in flex.inductor_configs(problem.device, dtype, max(dim, 16), False):
                        assert blocks[0] % options["fwd_BLOCK_M"] == 0 and blocks[1] % options["fwd_BLOCK_N"] == 0
                        assert options["fwd_BLOCK_M"] <= conf.block_m and options["fwd_BLOCK_N"] <= conf.block_n
                        assert options["fwd_num_stages"] <= conf.num_stages


def test_backward_tiles_checked_against_inductor(gpu_capability):
    backend = flex.FlexBackend()
    problem = _cuda_problem((128, 128), 32, torch.float16, 64)
    q, kv = backend.default_tiles(problem, backward=False)
    assert (q, kv) == ((8, 16), (8, 8))
    gpu_capability((9, 0))  # backward blocks of 64 x 128 / 128 x 64
    reason = backend.check_tiles(problem, q, kv, backward=True)
    assert "blocks of 128 queries and 128 keys" in reason and "got 128 and 64" in reason
    assert "blocks of 128" in backend.check_tiles(problem, (8, 8), (8, 8), backward=True)
    q, kv = backend.default_tiles(problem, backward=True)
    assert backend.check_tiles(problem, q, kv, backward=True) is None and q == kv
    gpu_capability((8, 0))  # an A100 runs 64 x 64 backward blocks at head dim 64
    assert backend.check_tiles(problem, (8, 16), (8, 8), backward=True) is None
    reason = backend.check_tiles(_cuda_problem((128, 128), 32, torch.float16, 256), (4, 4), (4, 4), backward=True)
    assert "backward tiles must hold multiples" in reason and "got 16 and 16" in reason
