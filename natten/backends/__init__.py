"""Backends by name, and the choice of one for a problem."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, List, Optional, Tuple

from natten._checks import FusedProblem
from natten._memo import memoize
from natten.backends.base import Backend, Tile
from natten.backends.cpu import CpuBackend
from natten.backends.flex import FlexBackend
from natten.backends.reference import ReferenceBackend
from natten.backends.tiled import TiledBackend


def _tiled_backends() -> List[Backend]:
    """The backend of every tiled kernel family: the TiledBackend subclasses that this package's
    modules define (a family adds its module, nothing here), the newest architecture first
    (family names are architectures: sm90 before sm80)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    families = [c for c in TiledBackend.__subclasses__() if c.family]
    return [c() for c in sorted(families, key=lambda c: c.family, reverse=True)]


# Preference order for backend=None: the first available one that supports the problem. On
# GPUs the fused tensor-core kernels come first; the tiled FlexAttention backend (float32,
# odd head dims) outruns the one-warp-per-query reference kernels.
_BACKENDS: Dict[str, Backend] = {b.name: b for b in (CpuBackend(), *_tiled_backends(), FlexBackend(),
                                                     ReferenceBackend())}
KNOWN_BACKENDS = tuple(_BACKENDS)


@memoize
def _available() -> Dict[str, Backend]:
    """The backends this build and machine can run, in preference order (probing some is slow
    and the answer does not change while the process runs)."""
    return {n: b for n, b in _BACKENDS.items() if b.is_available()}


def get(name: str) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string or None, got {name!r}")
    backend = _available().get(name)
    if backend is None:
        if name not in KNOWN_BACKENDS:
            raise ValueError(f"backend={name!r} is unknown; choose one of {', '.join(KNOWN_BACKENDS)}")
        raise ValueError(f"backend={name!r} is not available in this build of natten")
    return backend


def device_type(name: str) -> Optional[str]:
    """The device type ("cpu", "cuda") a backend runs on, whether or not this machine has it;
    None for an unknown name."""
    backend = _BACKENDS.get(name)
    return None if backend is None else backend.device_type


def names_for_device(device_type: str) -> List[str]:
    """Names of the backends usable on a device type ("cpu", "cuda"), in preference order."""
    return [n for n, b in _available().items() if b.device_type == device_type]


# A problem's device (with its index: tensors always carry one) is part of the key, so
# answers that depend on the GPU model stay per device.
@memoize
def _unsupported(backend: Backend, problem: FusedProblem) -> Optional[str]:
    reason = backend.unsupported(problem)
    if reason is None and problem.window.query_range is not None:
        reason = backend.query_range_unsupported(problem)
    return reason


@memoize
def resolve_tiles(backend: Backend, problem: FusedProblem, q_tile: Optional[Tile],
                  kv_tile: Optional[Tile], backward: bool) -> Tuple[Tile, Tile, Optional[str]]:
    """The tiles a call runs with (the backend's defaults where not given) and why they do not
    fit the backend, or None."""
    default_q, default_kv = backend.default_tiles(problem, backward)
    q_tile = q_tile or default_q
    kv_tile = kv_tile or default_kv
    return q_tile, kv_tile, backend.check_tiles(problem, q_tile, kv_tile, backward)


def select(problem: FusedProblem, name: Optional[str]) -> Backend:
    """The backend asked for (failing clearly if it cannot serve), or the best that can."""
    if name is not None:
        backend = get(name)
        reason = _unsupported(backend, problem)
        if reason is not None:
            raise ValueError(f"backend={name!r} cannot run this problem: {reason}")
        return backend
    reasons = []
    for backend in _available().values():
        reason = _unsupported(backend, problem) or backend.passed_over(problem)
        if reason is None:
            return backend
        reasons.append(f"{backend.name}: {reason}")
    raise ValueError("no backend can run this problem (" + "; ".join(reasons) + ")")


def query_range_backend(problem: FusedProblem, name: Optional[str]) -> Tuple[Backend, Optional[str]]:
    """For a problem with a query range: the backend its whole-grid call would run on (`select`
    of that call, raising as it does), and why that backend cannot compute only the range, or
    None. A caller that can also compute every query keeps to the backend it would have had."""
    backend = select(problem.whole_grid(), name)
    return backend, backend.query_range_unsupported(problem)


def for_unfused(device_type: str) -> Backend:
    for backend in _available().values():
        if backend.supports_unfused and backend.device_type == device_type:
            return backend
    raise ValueError(f"no backend runs the unfused ops on {device_type} in this build of natten")
