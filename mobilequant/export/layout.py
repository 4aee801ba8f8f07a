"""NCHW (torch) ↔ the artifact's layout, decided from shapes.

TFLite stores rank-4 activations NHWC (and a channel shuffle's rank-5 view channels-last); ONNX keeps
torch's NCHW; a layer may also lose singleton dimensions in the file (a global pool gives ``(N, C)`` in
TFLite where torch has ``(N, C, 1, 1)``). When the shapes allow both readings (C = H = W)
``prefer_nhwc`` decides: true for TFLite's internal tensors, false for graph inputs and outputs and for
ONNX.
"""

from __future__ import annotations

import numpy as np

__all__ = ["LayoutMismatch", "fits", "to_nchw", "to_file_layout"]


class LayoutMismatch(ValueError):
    """The artifact's tensor cannot be the torch tensor in any layout (wrong model?)."""


def _nonsingleton(shape) -> list[int]:
    return [int(d) for d in shape if d != 1]


def _plan(f: tuple[int, ...], t: tuple[int, ...], prefer_nhwc: bool) -> tuple[str, tuple[int, ...]] | None:
    """How the file's per-sample shape ``f`` holds torch's ``t``: ("transpose", file → torch permutation,
    batch first), ("same", ()), ("reshape", ()) — only singleton dimensions differ — or None.

    Rank 3: (C, H, W) ↔ (H, W, C). Rank 4: a channel shuffle's (g, C/g, H, W) ↔ (H, W, g, C/g)."""
    if len(f) == 3 and len(t) == 3 and f == (t[1], t[2], t[0]) and (prefer_nhwc or f != t):
        return "transpose", (0, 3, 1, 2)
    if len(f) == 4 and len(t) == 4 and f == (t[2], t[3], t[0], t[1]) and (prefer_nhwc or f != t):
        return "transpose", (0, 3, 4, 1, 2)
    if f == t:
        return "same", ()
    if int(np.prod(f)) == int(np.prod(t)) and _nonsingleton(f) == _nonsingleton(t):
        return "reshape", ()
    return None


def fits(file_shape, torch_shape, prefer_nhwc: bool = True) -> bool:
    """Whether a file tensor of ``file_shape`` can hold a torch tensor of ``torch_shape`` (both batch first;
    the batch sizes are ignored)."""
    return _plan(tuple(int(d) for d in file_shape[1:]), tuple(int(d) for d in torch_shape[1:]), prefer_nhwc) is not None


def to_nchw(a: np.ndarray, torch_shape: tuple[int, ...], prefer_nhwc: bool) -> np.ndarray:
    """The artifact's array ``a`` (batch first) in torch's layout ``torch_shape`` (batch first)."""
    f, t = tuple(a.shape[1:]), tuple(torch_shape[1:])
    plan = _plan(f, t, prefer_nhwc)
    if plan is None:
        raise LayoutMismatch(f"artifact shape {tuple(f)} does not match torch shape {tuple(t)} in any layout")
    kind, perm = plan
    if kind == "transpose":
        return a.transpose(perm)
    return a if kind == "same" else a.reshape(len(a), *t)


def to_file_layout(r: np.ndarray, file_shape: tuple[int, ...], prefer_nhwc: bool) -> np.ndarray:
    """Torch array ``r`` (batch first, NCHW) in the artifact's layout ``file_shape`` (its batch ignored)."""
    f, t = tuple(file_shape[1:]), tuple(r.shape[1:])
    plan = _plan(f, t, prefer_nhwc)
    if plan is None:
        raise LayoutMismatch(f"torch shape {tuple(t)} does not fit artifact shape {tuple(f)} in any layout")
    kind, perm = plan
    if kind == "transpose":
        return np.ascontiguousarray(r.transpose(tuple(int(i) for i in np.argsort(perm))))
    return r if kind == "same" else r.reshape(len(r), *f)
