"""Memoisation for the per-call planning work (backend choice, tile shapes), which depends only
on hashable problem descriptions and would otherwise dominate the host time of small calls."""

from __future__ import annotations

import functools

import torch


def memoize(fn):
    """functools.lru_cache, except while torch.compile traces: there the plain function runs,
    since Dynamo bypasses (and warns about) the cache and its keys may hold symbolic sizes. Fake
    tensor propagation runs outside Dynamo's trace, and with dynamic=True some torch versions
    hand operators' int arguments over as SymInts, which cannot be hashed: those calls run the
    plain function too."""
    cached = functools.lru_cache(maxsize=4096)(fn)

    @functools.wraps(fn)
    def call(*args):
        if torch.compiler.is_compiling():
            return fn(*args)
        try:
            hash(args)
        except TypeError:
            return fn(*args)
        return cached(*args)

    return call
