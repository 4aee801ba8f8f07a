"""Error metrics between a float reference tensor and its quantized counterpart, accumulated over batches.

The audit streams batches (1,000 images of intermediates do not fit in memory comfortably), so a metric
is a function of sufficient statistics gathered batch by batch in :class:`ErrorStats`, not of the full
arrays. :data:`LAYER_METRICS` is the pluggable registry (name → function of the statistics), as
``compute_error`` in onnxruntime's ``qdq_loss_debug`` takes a metric function.

SQNR is ``10·log10(Σ ref² / Σ (ref − test)²)`` over every element of every sample, capped at
:data:`SQNR_CAP_DB` (an exact match would otherwise be infinite, which JSON cannot hold). Cosine
similarity is computed per sample (flattened) and averaged; two all-zero samples count as 1, one all-zero
sample against a non-zero one as 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["SQNR_CAP_DB", "ErrorStats", "LAYER_METRICS", "sqnr_db", "cosine", "max_abs_error", "rel_max_abs_error",
           "median_channel_sqnr_db", "compute_metrics"]

SQNR_CAP_DB = 150.0  # float32 has ~24 bits of mantissa (~144 dB); anything above is "no error"


@dataclass
class ErrorStats:
    """Running sums over batches of ``ref`` (float reference) against ``test`` (quantized), same shape."""

    samples: int = 0
    elements: int = 0
    ref_sq: float = 0.0  # Σ ref²
    err_sq: float = 0.0  # Σ (ref − test)²
    max_abs_err: float = 0.0
    max_abs_ref: float = 0.0
    cos_sum: float = 0.0  # Σ per-sample cosine
    channel_ref_sq: np.ndarray | None = None  # Σ ref² per channel (axis 1)
    channel_err_sq: np.ndarray | None = None  # Σ (ref − test)² per channel

    def update(self, ref: np.ndarray, test: np.ndarray) -> ErrorStats:
        """Add one batch (first axis = samples).

        Per-sample sums are taken in float32 (a sample has at most a few hundred thousand elements) and
        accumulated across samples and batches in float64.
        """
        if ref.shape != test.shape:
            raise ValueError(f"shape mismatch: reference {ref.shape} vs quantized {test.shape}")
        n = ref.shape[0] if ref.ndim else 1
        a = np.asarray(ref, dtype=np.float32).reshape(n, -1)
        b = np.asarray(test, dtype=np.float32).reshape(n, -1)
        d = a - b
        aa = np.einsum("ij,ij->i", a, a).astype(np.float64)
        bb = np.einsum("ij,ij->i", b, b).astype(np.float64)
        ab = np.einsum("ij,ij->i", a, b).astype(np.float64)
        dd = np.einsum("ij,ij->i", d, d).astype(np.float64)
        self.samples += n
        self.elements += a.size
        self.ref_sq += float(aa.sum())
        self.err_sq += float(dd.sum())
        if a.size:
            self.max_abs_err = max(self.max_abs_err, float(np.abs(d).max()))
            self.max_abs_ref = max(self.max_abs_ref, float(np.abs(a).max()))
        if ref.ndim >= 2:  # per channel (axis 1): tensor-level SQNR hides small channels crushed by a shared scale
            c = ref.shape[1]
            ra = a.reshape(n, c, -1)
            rd = d.reshape(n, c, -1)
            cr = np.einsum("ijk,ijk->j", ra, ra).astype(np.float64)
            ce = np.einsum("ijk,ijk->j", rd, rd).astype(np.float64)
            self.channel_ref_sq = cr if self.channel_ref_sq is None else self.channel_ref_sq + cr
            self.channel_err_sq = ce if self.channel_err_sq is None else self.channel_err_sq + ce
        na, nb = np.sqrt(aa), np.sqrt(bb)
        both_zero = (na == 0) & (nb == 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = np.where(both_zero, 1.0, np.where((na == 0) | (nb == 0), 0.0, ab / (na * nb)))
        self.cos_sum += float(np.clip(cos, -1.0, 1.0).sum())
        return self

    def merge(self, other: ErrorStats) -> ErrorStats:
        def add(a, b):
            return b if a is None else a if b is None else a + b

        return ErrorStats(
            self.samples + other.samples,
            self.elements + other.elements,
            self.ref_sq + other.ref_sq,
            self.err_sq + other.err_sq,
            max(self.max_abs_err, other.max_abs_err),
            max(self.max_abs_ref, other.max_abs_ref),
            self.cos_sum + other.cos_sum,
            add(self.channel_ref_sq, other.channel_ref_sq),
            add(self.channel_err_sq, other.channel_err_sq),
        )


def sqnr_db(s: ErrorStats) -> float:
    """Signal-to-quantization-noise ratio in dB (capped at :data:`SQNR_CAP_DB`; 0 samples → nan)."""
    if s.elements == 0:
        return math.nan
    if s.err_sq == 0.0:
        return SQNR_CAP_DB
    if s.ref_sq == 0.0:
        return -SQNR_CAP_DB  # the reference is silent and the quantized tensor is not: all noise
    return float(min(SQNR_CAP_DB, max(-SQNR_CAP_DB, 10.0 * math.log10(s.ref_sq / s.err_sq))))


def cosine(s: ErrorStats) -> float:
    """Mean per-sample cosine similarity."""
    return s.cos_sum / s.samples if s.samples else math.nan


def max_abs_error(s: ErrorStats) -> float:
    return s.max_abs_err if s.elements else math.nan


def rel_max_abs_error(s: ErrorStats) -> float:
    """Largest absolute error relative to the largest reference magnitude (scale-free)."""
    if not s.elements:
        return math.nan
    return s.max_abs_err / s.max_abs_ref if s.max_abs_ref else (0.0 if s.max_abs_err == 0 else math.inf)


def median_channel_sqnr_db(s: ErrorStats) -> float:
    """Median over channels of each channel's SQNR (channels whose reference is all zero left out).

    One activation scale serves every channel of a tensor: a layer whose few large channels set the
    scale can crush its small channels while its tensor-level SQNR, dominated by the large ones, looks
    fine. The median channel shows it.
    """
    if s.channel_ref_sq is None:
        return math.nan
    live = s.channel_ref_sq > 0
    if not live.any():
        return math.nan
    with np.errstate(divide="ignore"):
        per = 10.0 * np.log10(s.channel_ref_sq[live] / s.channel_err_sq[live])
    return float(np.clip(np.median(per), -SQNR_CAP_DB, SQNR_CAP_DB))


Metric = Callable[[ErrorStats], float]

LAYER_METRICS: dict[str, Metric] = {
    "sqnr_db": sqnr_db,
    "cosine": cosine,
    "max_abs_error": max_abs_error,
    "rel_max_abs_error": rel_max_abs_error,
    "median_channel_sqnr_db": median_channel_sqnr_db,
}


def compute_metrics(stats: ErrorStats, metrics: dict[str, Metric] | None = None) -> dict[str, float]:
    """Every metric of ``metrics`` (default :data:`LAYER_METRICS`) on ``stats``."""
    return {name: float(fn(stats)) for name, fn in (metrics or LAYER_METRICS).items()}
