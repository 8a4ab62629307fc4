"""docs/semantics.md (bad input): every bad input raises ValueError (TypeError for wrong types) naming
the argument, before any kernel runs."""

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, device=device).to(dtype)


def _fused(rank):
    import natten

    return {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[rank]


def _base(rank=1, L=8, H=2, Hkv=None, D=8, B=1):
    S = (L,) * rank
    Hkv = Hkv or H
    return _t(B, *S, H, D), _t(B, *S, Hkv, D), _t(B, *S, Hkv, D)


def _call(rank=1, q=None, k=None, v=None, **kw):
    bq, bk, bv = _base(rank)
    kw.setdefault("kernel_size", 3)
    return _fused(rank)(q if q is not None else bq, k if k is not None else bk, v if v is not None else bv, **kw)


# Each entry: id, thunk, exception type(s), regex that the message must match (the
# argument's name).
CASES = [
    # rank
    ("rank-query-1d-to-2d", lambda: _fused(2)(*_base(1), kernel_size=3), ValueError, "query"),
    ("rank-query-3d-to-1d", lambda: _fused(1)(*_base(3, L=4), kernel_size=3), ValueError, "query"),
    ("rank-kernel-tuple", lambda: _call(2, *_base(2), kernel_size=(3, 3, 3)), ValueError, "kernel_size"),
    ("rank-stride-tuple", lambda: _call(2, *_base(2), stride=(1, 1, 1)), ValueError, "stride"),
    ("rank-dilation-tuple", lambda: _call(1, dilation=(1, 1)), ValueError, "dilation"),
    ("rank-is_causal-tuple", lambda: _call(1, is_causal=(True, False)), ValueError, "is_causal"),
    ("rank-key", lambda: _call(2, _base(2)[0], _t(1, 8, 2, 8), _base(2)[2]), ValueError, "key"),
    # types
    ("type-kernel-str", lambda: _call(kernel_size="7"), TypeError, "kernel_size"),
    ("type-kernel-float", lambda: _call(kernel_size=3.0), TypeError, "kernel_size"),
    ("type-kernel-float-tensor", lambda: _call(kernel_size=torch.tensor(3.0)), TypeError, "kernel_size"),
    ("type-stride-str", lambda: _call(stride="1"), TypeError, "stride"),
    ("type-dilation-float", lambda: _call(dilation=1.5), TypeError, "dilation"),
    ("type-kernel-tuple-float", lambda: _call(2, *_base(2), kernel_size=(3, 3.0)), TypeError, "kernel_size"),
    ("type-query-not-tensor", lambda: _call(q=[[1.0]]), TypeError, "query"),
    ("type-scale-str", lambda: _call(scale="0.5"), TypeError, "scale"),
    # non-positive
    ("kernel-zero", lambda: _call(kernel_size=0), ValueError, "kernel_size"),
    ("kernel-negative", lambda: _call(kernel_size=-3), ValueError, "kernel_size"),
    ("kernel-zero-axis", lambda: _call(2, *_base(2), kernel_size=(3, 0)), ValueError, "kernel_size"),
    ("stride-zero", lambda: _call(stride=0), ValueError, "stride"),
    ("dilation-zero", lambda: _call(dilation=0), ValueError, "dilation"),
    ("dilation-negative", lambda: _call(2, *_base(2), dilation=(1, -1)), ValueError, "dilation"),
    ("head-dim-zero", lambda: _call(q=_t(1, 8, 2, 0), k=_t(1, 8, 2, 0), v=_t(1, 8, 2, 0)), ValueError, "query|head"),
    # window rules
    ("kernel-gt-extent", lambda: _call(kernel_size=9), ValueError, "kernel_size"),
    ("kernel-gt-extent-axis", lambda: _call(2, *_base(2, L=4), kernel_size=(3, 5)), ValueError, "kernel_size"),
    ("k-times-d-gt-extent", lambda: _call(kernel_size=3, dilation=3), ValueError, "dilation|kernel_size"),
    ("k-times-d-gt-extent-3d", lambda: _call(3, *_base(3, L=5), kernel_size=2, dilation=(1, 3, 1)), ValueError, "dilation|kernel_size"),
    ("stride-gt-kernel", lambda: _call(kernel_size=3, stride=4), ValueError, "stride"),
    ("stride-gt-kernel-axis", lambda: _call(2, *_base(2), kernel_size=(3, 2), stride=(3, 3)), ValueError, "stride"),
    # shapes
    ("key-spatial", lambda: _call(k=_t(1, 9, 2, 8)), ValueError, "key"),
    ("key-batch", lambda: _call(k=_t(2, 8, 2, 8)), ValueError, "key"),
    ("key-head-dim", lambda: _call(k=_t(1, 8, 2, 16)), ValueError, "key"),
    ("value-spatial", lambda: _call(v=_t(1, 7, 2, 8)), ValueError, "value"),
    ("value-heads", lambda: _call(v=_t(1, 8, 1, 8)), ValueError, "value"),
    ("value-batch", lambda: _call(v=_t(3, 8, 2, 8)), ValueError, "value"),
    ("gqa-not-divisible", lambda: _call(q=_t(1, 8, 3, 8), k=_t(1, 8, 2, 8), v=_t(1, 8, 2, 8)), ValueError, "key|head"),
    ("kv-heads-gt-q-heads", lambda: _call(q=_t(1, 8, 2, 8), k=_t(1, 8, 4, 8), v=_t(1, 8, 4, 8)), ValueError, "key|head"),
    # dtypes
    ("dtype-key", lambda: _call(k=_t(1, 8, 2, 8, dtype=torch.float64)), ValueError, "key"),
    ("dtype-value", lambda: _call(v=_t(1, 8, 2, 8, dtype=torch.float16)), ValueError, "value"),
    ("dtype-int-query", lambda: _call(q=torch.ones(1, 8, 2, 8, dtype=torch.int32), k=torch.ones(1, 8, 2, 8, dtype=torch.int32), v=torch.ones(1, 8, 2, 8, dtype=torch.int32)), (ValueError, TypeError), "query|dtype"),
    ("dtype-int-key", lambda: _call(k=torch.ones(1, 8, 2, 8, dtype=torch.int64)), (ValueError, TypeError), "key"),
    # additional KV
    ("extra-keys-without-values", lambda: _call(additional_keys=_t(1, 3, 2, 8)), ValueError, "additional_values|additional_keys"),
    ("extra-values-without-keys", lambda: _call(additional_values=_t(1, 3, 2, 8)), ValueError, "additional_keys|additional_values"),
    ("extra-keys-head-dim", lambda: _call(additional_keys=_t(1, 3, 2, 4), additional_values=_t(1, 3, 2, 8)), ValueError, "additional_keys"),
    ("extra-keys-heads", lambda: _call(additional_keys=_t(1, 3, 1, 8), additional_values=_t(1, 3, 1, 8)), ValueError, "additional_keys"),
    ("extra-keys-batch", lambda: _call(additional_keys=_t(2, 3, 2, 8), additional_values=_t(2, 3, 2, 8)), ValueError, "additional_keys"),
    ("extra-keys-rank", lambda: _call(additional_keys=_t(1, 3, 2), additional_values=_t(1, 3, 2, 8)), ValueError, "additional_keys"),
    ("extra-values-count", lambda: _call(additional_keys=_t(1, 3, 2, 8), additional_values=_t(1, 4, 2, 8)), ValueError, "additional_values"),
    ("extra-values-head-dim", lambda: _call(additional_keys=_t(1, 3, 2, 8), additional_values=_t(1, 3, 2, 4)), ValueError, "additional_values"),
    ("extra-keys-dtype", lambda: _call(additional_keys=_t(1, 3, 2, 8, dtype=torch.float64), additional_values=_t(1, 3, 2, 8)), ValueError, "additional_keys"),
    ("extra-values-dtype", lambda: _call(additional_keys=_t(1, 3, 2, 8), additional_values=_t(1, 3, 2, 8, dtype=torch.bfloat16)), ValueError, "additional_values"),
    # backends
    ("backend-unknown", lambda: _call(backend="no-such-backend"), ValueError, "backend"),
    ("backend-type", lambda: _call(backend=3), (TypeError, ValueError), "backend"),
    ("backend-cutlass-on-cpu", lambda: _call(backend="cutlass-fna"), ValueError, "backend"),
    ("backend-hopper-on-cpu", lambda: _call(backend="hopper-fna"), ValueError, "backend"),
    ("backend-reference-on-cpu", lambda: _call(backend="reference"), ValueError, "backend"),
    # tile shapes
    ("q-tile-rank", lambda: _call(backend="cpu", q_tile_shape=(4, 4)), ValueError, "q_tile_shape"),
    ("kv-tile-rank", lambda: _call(2, *_base(2), backend="cpu", kv_tile_shape=(4,)), ValueError, "kv_tile_shape"),
    ("q-tile-zero", lambda: _call(2, *_base(2), backend="cpu", q_tile_shape=(4, 0)), ValueError, "q_tile_shape"),
    ("kv-tile-negative", lambda: _call(backend="cpu", kv_tile_shape=(-2,)), ValueError, "kv_tile_shape"),
    ("bwd-q-tile-rank", lambda: _call(backend="cpu", backward_q_tile_shape=(2, 2)), ValueError, "backward_q_tile_shape"),
    ("bwd-kv-tile-zero", lambda: _call(backend="cpu", backward_kv_tile_shape=(0,)), ValueError, "backward_kv_tile_shape"),
    ("q-tile-type", lambda: _call(backend="cpu", q_tile_shape=("a",)), (TypeError, ValueError), "q_tile_shape"),
]


@pytest.mark.parametrize("thunk,exc,match", [pytest.param(t, e, m, id=i) for i, t, e, m in CASES])
def test_fused_bad_input(thunk, exc, match):
    with pytest.raises(exc, match=match):
        thunk()


def test_error_message_names_value_and_rule():
    with pytest.raises(ValueError) as ei:
        _call(kernel_size=9)
    msg = str(ei.value)
    assert "kernel_size" in msg and "9" in msg, msg
    with pytest.raises(ValueError) as ei:
        _call(kernel_size=3, stride=5)
    msg = str(ei.value)
    assert "stride" in msg and "5" in msg, msg


def test_valid_base_call_works():
    """Guards the table above: the unmodified base call must succeed."""
    out = _call()
    assert out.shape == (1, 8, 2, 8) and torch.isfinite(out).all()
    out = _call(2, *_base(2), kernel_size=(3, 2), stride=(3, 2), dilation=(2, 1), backend="cpu",
                q_tile_shape=(2, 2), kv_tile_shape=(3, 1), additional_keys=_t(1, 3, 2, 8),
                additional_values=_t(1, 3, 2, 8))
    assert torch.isfinite(out).all()


def test_error_before_autograd_state_changes():
    """A rejected call must not leave grads or modify inputs."""
    q, k, v = (t.requires_grad_() for t in _base(1))
    qc = q.detach().clone()
    with pytest.raises(ValueError):
        _fused(1)(q, k, v, kernel_size=9)
    assert q.grad is None and torch.equal(q.detach(), qc)


# ---------------------------------------------------------------------------
# Devices (need a GPU)
# ---------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available")
def test_mismatched_devices():
    q, k, v = _base(1)
    with pytest.raises(ValueError, match="key"):
        _fused(1)(q, k.cuda(), v, kernel_size=3)
    with pytest.raises(ValueError, match="value"):
        _fused(1)(q.cuda(), k.cuda(), v, kernel_size=3)
    with pytest.raises(ValueError, match="additional_keys"):
        _fused(1)(q, k, v, kernel_size=3, additional_keys=_t(1, 2, 2, 8, device="cuda"),
                  additional_values=_t(1, 2, 2, 8))


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available")
def test_cpu_backend_with_cuda_tensor():
    q, k, v = (t.cuda() for t in _base(1))
    with pytest.raises(ValueError, match="backend"):
        _fused(1)(q, k, v, kernel_size=3, backend="cpu")


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available")
def test_gpu_backend_float64_rejected():
    """float64 on CUDA runs on `reference` only (and through it under backend=None); every other
    CUDA backend names the dtype."""
    import natten

    q, k, v = (t.cuda().double() for t in _base(1))
    names = natten.backends.names_for_device("cuda")
    assert "reference" in names
    for name in names:
        if name == "reference":
            assert _fused(1)(q, k, v, kernel_size=3, backend=name).dtype == torch.float64
            continue
        with pytest.raises(ValueError, match="dtype|float64"):
            _fused(1)(q, k, v, kernel_size=3, backend=name)
    assert _fused(1)(q, k, v, kernel_size=3).dtype == torch.float64


# ---------------------------------------------------------------------------
# Unfused ops and the original API
# ---------------------------------------------------------------------------


def _F():
    import natten.functional as F

    return F


UNFUSED_CASES = [
    ("qk-key-shape", lambda: _F().na1d_qk(_t(1, 8, 2, 8), _t(1, 9, 2, 8), 3), ValueError, "key"),
    ("qk-key-dtype", lambda: _F().na1d_qk(_t(1, 8, 2, 8), _t(1, 8, 2, 8, dtype=torch.float64), 3), ValueError, "key"),
    ("qk-rank", lambda: _F().na2d_qk(_t(1, 8, 2, 8), _t(1, 8, 2, 8), 3), ValueError, "query"),
    ("qk-kernel-gt-extent", lambda: _F().na1d_qk(_t(1, 8, 2, 8), _t(1, 8, 2, 8), 9), ValueError, "kernel_size"),
    ("qk-k-times-d", lambda: _F().na2d_qk(_t(1, 6, 6, 2, 8), _t(1, 6, 6, 2, 8), 3, dilation=(1, 3)), ValueError, "dilation|kernel_size"),
    ("qk-kernel-str", lambda: _F().na1d_qk(_t(1, 8, 2, 8), _t(1, 8, 2, 8), "3"), TypeError, "kernel_size"),
    ("qk-rpb-shape", lambda: _F().na1d_qk(_t(1, 8, 2, 8), _t(1, 8, 2, 8), 3, rpb=_t(2, 4)), ValueError, "rpb"),
    ("qk-rpb-heads", lambda: _F().na2d_qk(_t(1, 6, 6, 2, 8), _t(1, 6, 6, 2, 8), 3, rpb=_t(3, 5, 5)), ValueError, "rpb"),
    ("qk-rpb-dtype", lambda: _F().na1d_qk(_t(1, 8, 2, 8), _t(1, 8, 2, 8), 3, rpb=_t(2, 5, dtype=torch.float64)), ValueError, "rpb"),
    ("qk-dilation-zero", lambda: _F().na1d_qk(_t(1, 8, 2, 8), _t(1, 8, 2, 8), 3, dilation=0), ValueError, "dilation"),
    ("av-attn-size", lambda: _F().na1d_av(_t(1, 8, 2, 4), _t(1, 8, 2, 8), 3), ValueError, "attn"),
    ("av-value-shape", lambda: _F().na1d_av(_t(1, 8, 2, 3), _t(1, 7, 2, 8), 3), ValueError, "value"),
    ("av-value-heads", lambda: _F().na2d_av(_t(1, 6, 6, 2, 9), _t(1, 6, 6, 3, 8), 3), ValueError, "value"),
    ("av-value-dtype", lambda: _F().na1d_av(_t(1, 8, 2, 3), _t(1, 8, 2, 8, dtype=torch.float16), 3), ValueError, "value"),
    ("av-kernel-zero", lambda: _F().na1d_av(_t(1, 8, 2, 3), _t(1, 8, 2, 8), 0), ValueError, "kernel_size"),
    ("av-is_causal-rank", lambda: _F().na1d_av(_t(1, 8, 2, 3), _t(1, 8, 2, 8), 3, is_causal=(True, True)), ValueError, "is_causal"),
    ("orig-qk-rpb-shape", lambda: _F().natten1dqkrpb(_t(1, 2, 8, 8), _t(1, 2, 8, 8), _t(2, 7), 3, 1), ValueError, "rpb"),
    ("orig-qk-key-shape", lambda: _F().natten2dqkrpb(_t(1, 2, 6, 6, 8), _t(1, 2, 6, 5, 8), None, 3, 1), ValueError, "key"),
    ("orig-qk-kernel-gt-extent", lambda: _F().natten1dqkrpb(_t(1, 2, 8, 8), _t(1, 2, 8, 8), None, 9, 1), ValueError, "kernel_size"),
    ("orig-av-attn-size", lambda: _F().natten1dav(_t(1, 2, 8, 5), _t(1, 2, 8, 8), 3, 1), ValueError, "attn"),
    ("orig-av-dilation", lambda: _F().natten3dav(_t(1, 2, 4, 4, 4, 8), _t(1, 2, 4, 4, 4, 8), 2, 3), ValueError, "dilation|kernel_size"),
]


@pytest.mark.parametrize("thunk,exc,match", [pytest.param(t, e, m, id=i) for i, t, e, m in UNFUSED_CASES])
def test_unfused_bad_input(thunk, exc, match):
    with pytest.raises(exc, match=match):
        thunk()


# ---------------------------------------------------------------------------
# Modules and merge
# ---------------------------------------------------------------------------


def test_module_dim_not_divisible_by_heads():
    import natten

    with pytest.raises(ValueError, match="num_heads|dim"):
        natten.NeighborhoodAttention2D(dim=10, num_heads=3, kernel_size=3)


def test_module_bad_kernel_type():
    import natten

    with pytest.raises(TypeError, match="kernel_size"):
        natten.NeighborhoodAttention1D(dim=8, num_heads=2, kernel_size="7")


def test_merge_attentions_mismatch():
    import natten

    o = [torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4)]
    lse = [torch.randn(1, 8, 2), torch.randn(1, 8, 3)]
    with pytest.raises(ValueError, match="lse"):
        natten.merge_attentions(o, lse)
    with pytest.raises(ValueError, match="lse|outputs"):
        natten.merge_attentions(o, lse[:1])
