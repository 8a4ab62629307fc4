"""Exact merge of attentions over disjoint key sets through their logsumexps."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def merge_attentions(outputs: Sequence[Tensor], lses: Sequence[Tensor]) -> Tensor:
    """Combines outputs [..., H, Dv] of attentions over disjoint key sets, given their
    logsumexps [..., H], into the attention over the union of the key sets."""
    if len(outputs) != len(lses) or len(outputs) < 1:
        raise ValueError(f"outputs and lses must be non-empty and of equal length, got {len(outputs)} and {len(lses)}")
    for i, (o, l) in enumerate(zip(outputs, lses)):
        if not isinstance(o, Tensor) or not isinstance(l, Tensor):
            raise TypeError(f"outputs[{i}] and lses[{i}] must be tensors")
        if tuple(o.shape[:-1]) != tuple(l.shape) or tuple(o.shape) != tuple(outputs[0].shape):
            raise ValueError(
                f"outputs[{i}] {tuple(o.shape)} and lses[{i}] {tuple(l.shape)} must match outputs[0] "
                f"{tuple(outputs[0].shape)} with one logsumexp per output row"
            )
    lse = torch.stack([l.float() if l.dtype != torch.float64 else l for l in lses])
    total = torch.logsumexp(lse, dim=0)
    weights = torch.exp(lse - total).unsqueeze(-1)
    merged = sum(w * o.to(w.dtype) for w, o in zip(weights, outputs))
    return merged.to(outputs[0].dtype)
