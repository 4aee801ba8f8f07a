"""Quantized kernels read back from an artifact, in torch layout, whatever the file format."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["QuantizedWeights"]


@dataclass(frozen=True, eq=False)
class QuantizedWeights:
    """Integer codes of a kernel with their scales: ``float ≈ (codes − zero_point) · scale``.

    ``codes`` is in torch layout with the output channel first (``(O, I/g, kh, kw)`` or ``(O, I)``);
    ``scale`` / ``zero_point`` have one entry per output channel (``per_channel``) or one in all.
    """

    codes: np.ndarray = field(repr=False)
    scale: np.ndarray = field(repr=False)
    zero_point: np.ndarray = field(repr=False)
    per_channel: bool
    axis: int
    qmin: int
    qmax: int
    op: str = ""

    def channel_codes(self) -> np.ndarray:
        """Codes as (O, elements per channel)."""
        return self.codes.reshape(self.codes.shape[0], -1)

    def zero_points(self) -> np.ndarray:
        """Zero point per output channel."""
        zp = np.asarray(self.zero_point).reshape(-1)
        return np.broadcast_to(zp, (self.codes.shape[0],)) if zp.size == 1 else zp

    def scales(self) -> np.ndarray:
        s = np.asarray(self.scale, dtype=np.float64).reshape(-1)
        return np.broadcast_to(s, (self.codes.shape[0],)) if s.size == 1 else s

    def dequantized(self) -> np.ndarray:
        shape = (-1,) + (1,) * (self.codes.ndim - 1)
        return (self.codes - self.zero_points().reshape(shape)) * self.scales().reshape(shape)
