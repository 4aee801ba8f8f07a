"""NCHW (torch) ↔ the artifact's layout, decided from shapes.

TFLite stores rank-4 activations NHWC; ONNX keeps torch's NCHW; a layer may also lose singleton
dimensions in the file (a global pool gives ``(N, C)`` in TFLite where torch has ``(N, C, 1, 1)``).
When the shapes allow both readings (C = H = W) ``prefer_nhwc`` decides: true for TFLite's internal
tensors, false for graph inputs and outputs and for ONNX.
"""

from __future__ import annotations

import numpy as np

__all__ = ["LayoutMismatch", "to_nchw", "to_file_layout"]


class LayoutMismatch(ValueError):
    """The artifact's tensor cannot be the torch tensor in any layout (wrong model?)."""


def _nonsingleton(shape) -> list[int]:
    return [int(d) for d in shape if d != 1]


def to_nchw(a: np.ndarray, torch_shape: tuple[int, ...], prefer_nhwc: bool) -> np.ndarray:
    """The artifact's array ``a`` (batch first) in torch's layout ``torch_shape`` (batch first)."""
    f, t = tuple(a.shape[1:]), tuple(torch_shape[1:])
    if len(f) == 3 and len(t) == 3:
        nhwc = f == (t[1], t[2], t[0])
        if nhwc and (prefer_nhwc or f != t):
            return a.transpose(0, 3, 1, 2)
    if f == t:
        return a
    if int(np.prod(f)) == int(np.prod(t)) and _nonsingleton(f) == _nonsingleton(t):
        return a.reshape(len(a), *t)
    raise LayoutMismatch(f"artifact shape {tuple(f)} does not match torch shape {tuple(t)} in any layout")


def to_file_layout(r: np.ndarray, file_shape: tuple[int, ...], prefer_nhwc: bool) -> np.ndarray:
    """Torch array ``r`` (batch first, NCHW) in the artifact's layout ``file_shape`` (its batch ignored)."""
    f, t = tuple(file_shape[1:]), tuple(r.shape[1:])
    if len(f) == 3 and len(t) == 3:
        nhwc = f == (t[1], t[2], t[0])
        if nhwc and (prefer_nhwc or f != t):
            return np.ascontiguousarray(r.transpose(0, 2, 3, 1))
    if f == t:
        return r
    if int(np.prod(f)) == int(np.prod(t)) and _nonsingleton(f) == _nonsingleton(t):
        return r.reshape(len(r), *f)
    raise LayoutMismatch(f"torch shape {tuple(t)} does not fit artifact shape {tuple(f)} in any layout")
