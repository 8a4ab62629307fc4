"""Backends by name, and the choice of one for a problem (SPEC section 3)."""

from __future__ import annotations

from typing import Dict, List, Optional

from natten._checks import FusedProblem
from natten.backends.base import Backend
from natten.backends.cpu import CpuBackend
from natten.backends.flex import FlexBackend
from natten.backends.reference import ReferenceBackend
from natten.backends.sm80 import Sm80Backend

# Preference order for backend=None: the first available one that supports the problem. On
# GPUs the fused tensor-core kernels come first; the tiled FlexAttention backend (float32,
# odd head dims) outruns the one-warp-per-query reference kernels.
_BACKENDS: Dict[str, Backend] = {b.name: b for b in (CpuBackend(), Sm80Backend(), FlexBackend(),
                                                     ReferenceBackend())}
KNOWN_BACKENDS = ("cpu", "reference", "cutlass-fna", "hopper-fna", "flex-fna")


def get(name: str) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string or None, got {name!r}")
    if name not in KNOWN_BACKENDS:
        raise ValueError(f"backend={name!r} is unknown; choose one of {', '.join(KNOWN_BACKENDS)}")
    backend = _BACKENDS.get(name)
    if backend is None or not backend.is_available():
        raise ValueError(f"backend={name!r} is not available in this build of natten")
    return backend


def names_for_device(device_type: str) -> List[str]:
    """Names of the backends usable on a device type ("cpu", "cuda"), in preference order."""
    return [n for n, b in _BACKENDS.items() if b.device_type == device_type and b.is_available()]


def select(problem: FusedProblem, name: Optional[str]) -> Backend:
    """The backend asked for (failing clearly if it cannot serve), or the best that can."""
    if name is not None:
        backend = get(name)
        reason = backend.unsupported(problem)
        if reason is not None:
            raise ValueError(f"backend={name!r} cannot run this problem: {reason}")
        return backend
    reasons = []
    for backend in _BACKENDS.values():
        if not backend.is_available():
            continue
        reason = backend.unsupported(problem)
        if reason is None:
            return backend
        reasons.append(f"{backend.name}: {reason}")
    raise ValueError("no backend can run this problem (" + "; ".join(reasons) + ")")


def for_unfused(device_type: str) -> Backend:
    for backend in _BACKENDS.values():
        if backend.supports_unfused and backend.device_type == device_type and backend.is_available():
            return backend
    raise ValueError(f"no backend runs the unfused ops on {device_type} in this build of natten")
