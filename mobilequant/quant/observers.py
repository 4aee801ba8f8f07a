"""Calibration observers: int8 activation ranges by five methods, and symmetric int8 weight ranges.

Activations are quantized the TFLite way: int8, asymmetric, one scale and zero point per tensor
(quant_min −128, quant_max 127). :func:`make_activation_observer` returns the observer constructor for
a method; the quantizer puts it in a torchao ``QuantizationSpec``.

==================  ============================================================  ======================
method              range                                                         implementation
==================  ============================================================  ======================
``minmax``          running min / max                                             torchao ``MinMaxObserver``
``moving_average``  exponential moving average of per-batch min / max            torchao ``MovingAverageMinMaxObserver``
``percentile``      the (100 − p)-th and p-th percentiles (each tail apart)       histogram, here
``entropy``         threshold minimising KL(P‖Q), as TensorRT's calibrator        histogram, here
``mse``             range minimising the expected squared quantization error     histogram, here
==================  ============================================================  ======================

Why three are written here. torchao has no percentile or KL observer. Its ``HistogramObserver`` does an
L2 search, but (read in torchao 0.18 ``pt2e/observer.py``) it is a greedy walk: it moves the lower or
upper quantile bound inward by 1e-5 of the mass at a time and stops at the first step where the error
grows, so it returns the first local minimum on that path (on a ReLU-clipped Laplace distribution it picks
a range with a larger error than plain min/max). Its error model counts 2**bits destination bins where the
affine grid has 2**bits − 1 steps, and its histogram merge on range growth resamples bins approximately, so
calibrating batch by batch does not give the same histogram as one pass over the same data. ``mse`` here
evaluates every pair of candidate bounds on the histogram in closed form instead (prefix sums), which
is exact for the model it uses and costs a few milliseconds.

The histogram the three share (:class:`HistogramActivationObserver`) keeps positive and negative values
apart, each with ``bins`` bins over ``[0, R)`` where ``R`` is a power of two above the largest magnitude
seen, and counts exact zeros on their own (they are always representable). When a batch needs a larger
``R``, old bins merge exactly (bin ``j`` → ``j >> d``, as ``R`` grows by ``2**d``), and ``x · bins / R`` is
exact in floating point, so the histogram — and every range derived from it — does not depend on how
the calibration data were split into batches. Memory is ``2 · bins`` counters per observed tensor.

ReLU6 outputs (``relu6=``):

* ``"clamped"``: the range starts exactly at 0 (zero point −128 exactly, so 0 is exact and nothing is
  wasted on negatives) and ends at ``min(6, max found by the method)``;
* ``"fixed"``: exactly ``[0, 6]`` — scale 6/255, zero point −128 — without calibration
  (:class:`ReLU6FixedObserver`).

Degenerate data: when the observed range has no width (a constant tensor, all zeros, or nothing observed
at all) the scale is the torchao eps clamp (``finfo(float32).eps``) or ``|c| / 255`` for a constant
``c`` — never 0 or NaN — and the observer's ``degenerate`` attribute is ``True`` so the caller can report
it. Any NaN or Inf in an observed tensor raises ``ValueError`` (the quantizer names the batch).

Weights: symmetric int8 (−127..127, zero point 0), per channel or per tensor: torchao's
``PerChannelMinMaxObserver`` / ``MinMaxObserver`` as they are (:func:`make_weight_observer`).
"""

from __future__ import annotations

import math

import torch
from torchao.quantization.pt2e.observer import (
    FixedQParamsObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PerChannelMinMaxObserver,
    UniformQuantizationObserverBase,
)

from ..errors import UsageError, did_you_mean

__all__ = [
    "ACTIVATION_METHODS",
    "RELU6_MODES",
    "RELU6_MAX",
    "make_activation_observer",
    "make_weight_observer",
    "MinMaxActivationObserver",
    "MovingAverageActivationObserver",
    "HistogramActivationObserver",
    "PercentileObserver",
    "EntropyObserver",
    "MSEObserver",
    "ReLU6FixedObserver",
    "pin_qparams",
]

ACTIVATION_METHODS = ("minmax", "moving_average", "percentile", "entropy", "mse")
RELU6_MODES = ("clamped", "fixed")
RELU6_MAX = 6.0

_QMIN, _QMAX = -128, 127  # int8 asymmetric activations (TFLite)
_HIST_MIN_EXPONENT = -100  # smallest histogram range 2**-100: keeps bins / R finite in float32


def _non_finite_error(x: torch.Tensor) -> ValueError:
    return ValueError(f"observed tensor has {int(torch.isnan(x).sum())} NaN and {int(torch.isinf(x).sum())} Inf values")


def _check_finite(x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise _non_finite_error(x)


def _finite(*values: torch.Tensor) -> bool:
    return all(math.isfinite(float(v)) for v in values)


def _check_relu6(relu6: str | None) -> None:
    if relu6 is not None and relu6 not in RELU6_MODES:
        raise UsageError(
            f"relu6 mode must be None or one of {', '.join(RELU6_MODES)}, got {relu6!r}"
            f"{did_you_mean(str(relu6), RELU6_MODES)}"
        )


class _ActivationRange:
    """What every activation observer here shares: the ReLU6 treatment, the degenerate flag, the
    NaN/Inf check and qparams from a chosen ``[lo, hi]`` (torchao's ``_calculate_qparams``, which
    includes 0 in the range and clamps the scale at eps)."""

    relu6: str | None
    min_val: torch.Tensor
    max_val: torch.Tensor

    @property
    def degenerate(self) -> bool:
        """True when the observed values have no spread: a constant (zeros included) or no data."""
        lo, hi = float(self.min_val), float(self.max_val)
        return not (math.isfinite(lo) and math.isfinite(hi)) or lo == hi

    def _observed_range(self) -> tuple[float, float] | None:
        """``(lo, hi)`` to use as is for a degenerate observer, else ``None`` (run the method)."""
        lo, hi = float(self.min_val), float(self.max_val)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return 0.0, 0.0  # nothing observed
        if lo == hi:
            return lo, hi
        return None

    def _qparams(self, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.relu6 == "clamped":
            lo, hi = 0.0, min(max(hi, 0.0), RELU6_MAX)
        device = self.min_val.device
        return self._calculate_qparams(  # type: ignore[attr-defined]
            torch.tensor(lo, dtype=torch.float32, device=device),
            torch.tensor(hi, dtype=torch.float32, device=device),
        )


def _forward_checked(obs, forward, x: torch.Tensor) -> torch.Tensor:
    """Run torchao's min/max update, then refuse NaN / Inf: NaN propagates into the running min / max
    (and their moving averages) and an infinity becomes one, so two scalar checks replace a pass over
    the tensor. The previous statistics are restored before raising."""
    before = obs.min_val.clone(), obs.max_val.clone()
    out = forward(x)
    if x.numel() and not _finite(obs.min_val, obs.max_val):
        obs.min_val.copy_(before[0])
        obs.max_val.copy_(before[1])
        raise _non_finite_error(x.detach())
    return out


class MinMaxActivationObserver(_ActivationRange, MinMaxObserver):
    """torchao ``MinMaxObserver`` for int8 activations, with the ReLU6 modes and the degenerate flag."""

    def __init__(self, relu6: str | None = None, dtype=torch.int8, qscheme=torch.per_tensor_affine,
                 quant_min=_QMIN, quant_max=_QMAX, **kwargs) -> None:
        _check_relu6(relu6)
        super().__init__(dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max, **kwargs)
        self.relu6 = relu6

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        return _forward_checked(self, super().forward, x_orig)

    def calculate_qparams(self):
        rng = self._observed_range()
        lo, hi = rng if rng is not None else (float(self.min_val), float(self.max_val))
        return self._qparams(lo, hi)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu6={self.relu6}"


class MovingAverageActivationObserver(_ActivationRange, MovingAverageMinMaxObserver):
    """torchao ``MovingAverageMinMaxObserver`` for int8 activations (``averaging_constant`` c: each batch
    moves min and max by c of the way to its own), with the ReLU6 modes and the degenerate flag."""

    def __init__(self, averaging_constant: float = 0.01, relu6: str | None = None, dtype=torch.int8,
                 qscheme=torch.per_tensor_affine, quant_min=_QMIN, quant_max=_QMAX, **kwargs) -> None:
        _check_relu6(relu6)
        super().__init__(averaging_constant=averaging_constant, dtype=dtype, qscheme=qscheme,
                         quant_min=quant_min, quant_max=quant_max, **kwargs)
        self.relu6 = relu6

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        return _forward_checked(self, super().forward, x_orig)

    def calculate_qparams(self):
        rng = self._observed_range()
        lo, hi = rng if rng is not None else (float(self.min_val), float(self.max_val))
        return self._qparams(lo, hi)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu6={self.relu6}"


class HistogramActivationObserver(_ActivationRange, UniformQuantizationObserverBase):
    """Accumulates a batch-split-invariant histogram (see the module docstring); subclasses choose the
    range from it in :meth:`_search_range`. The search result is cached until the next batch."""

    def __init__(self, bins: int = 2048, relu6: str | None = None, dtype=torch.int8,
                 qscheme=torch.per_tensor_affine, quant_min=_QMIN, quant_max=_QMAX, **kwargs) -> None:
        _check_relu6(relu6)
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 16:
            raise ValueError(f"bins must be an integer >= 16, got {bins!r}")
        if qscheme != torch.per_tensor_affine:
            raise ValueError(f"{type(self).__name__} computes per-tensor affine ranges, got {qscheme}")
        super().__init__(dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max, **kwargs)
        self.relu6 = relu6
        self.bins = bins
        self.register_buffer("pos_hist", torch.zeros(bins, dtype=torch.int64))
        self.register_buffer("neg_hist", torch.zeros(bins, dtype=torch.int64))
        # Ranges are 2**exponent; meaningful only once the side has counts.
        self.register_buffer("pos_exp", torch.tensor(_HIST_MIN_EXPONENT, dtype=torch.int64))
        self.register_buffer("neg_exp", torch.tensor(_HIST_MIN_EXPONENT, dtype=torch.int64))
        self.register_buffer("zero_count", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self._cached: tuple[float, float] | None = None

    # -- accumulation ---------------------------------------------------------------------------

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach().reshape(-1).to(torch.float32)
        lo, hi = torch.aminmax(x)
        if not _finite(lo, hi):  # NaN propagates through aminmax; an infinity is an extreme
            raise _non_finite_error(x)
        self.min_val.copy_(torch.minimum(self.min_val, lo))
        self.max_val.copy_(torch.maximum(self.max_val, hi))
        lo, hi = float(lo), float(hi)
        # Grow the ranges first (exact merges), then count. Zeros are counted once; each side then bins
        # all values with its own scale, the other sign's values going to a discarded slot.
        zeros = int((x == 0).sum())
        self.zero_count += zeros
        if hi > 0:
            self._grow(self.pos_hist, self.pos_exp, hi)
            self._count(x, self.pos_hist, self.pos_exp, 1.0, zeros)
        if lo < 0:
            self._grow(self.neg_hist, self.neg_exp, -lo)
            self._count(x, self.neg_hist, self.neg_exp, -1.0, zeros)
        self._cached = None
        return x_orig

    def _count(self, x: torch.Tensor, hist: torch.Tensor, exp: torch.Tensor, sign: float, zeros: int) -> None:
        """Add the values of ``sign · x`` that are > 0 to ``hist``: bin ``floor(v · bins / 2**exp)``, exact
        as ``2**exp`` is a power of two. Values of the other sign land in slot 0 of the bincount and zeros
        in slot 1 (bin 0), so the zeros are taken back out of bin 0."""
        per_unit = sign * math.ldexp(float(self.bins), -int(exp))
        idx = (x * per_unit).floor_().clamp_(-1, self.bins - 1).add_(1).to(torch.int32)
        counts = torch.bincount(idx, minlength=self.bins + 1)[1:]
        counts[0] -= zeros
        hist += counts

    def _grow(self, hist: torch.Tensor, exp: torch.Tensor, largest: float) -> None:
        """Make the side's range ``2**exp`` exceed ``largest``, merging bins exactly if it grows."""
        # largest < 2**e (frexp's mantissa is in [0.5, 1)), so every value falls in [0, 2**e).
        e = max(math.frexp(largest)[1], _HIST_MIN_EXPONENT)
        if int(hist.sum()) == 0:
            exp.fill_(e)
        elif e > int(exp):
            hist.copy_(_merge_bins(hist, e - int(exp)))
            exp.fill_(e)

    def reset_min_max_vals(self) -> None:
        self.pos_hist.zero_()
        self.neg_hist.zero_()
        self.zero_count.zero_()
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))
        self._cached = None

    # -- range ----------------------------------------------------------------------------------

    def _width(self, exp: torch.Tensor) -> float:
        return math.ldexp(1.0, int(exp)) / self.bins

    def _search_range(self) -> tuple[float, float]:
        raise NotImplementedError

    def chosen_range(self) -> tuple[float, float]:
        """``(lo, hi)`` the method picked, before ReLU6 clamping and before 0 is included."""
        rng = self._observed_range()
        if rng is not None:
            return rng
        if self._cached is None:
            lo, hi = self._search_range()
            self._cached = (max(lo, float(self.min_val)), min(hi, float(self.max_val)))
        return self._cached

    def calculate_qparams(self):
        return self._qparams(*self.chosen_range())

    def extra_repr(self) -> str:
        return f"bins={self.bins}, min_val={float(self.min_val)}, max_val={float(self.max_val)}, relu6={self.relu6}"


def _merge_bins(hist: torch.Tensor, shift: int) -> torch.Tensor:
    """The histogram over a range ``2**shift`` times wider: bin ``j`` goes to ``j >> shift`` (exact)."""
    idx = torch.arange(hist.numel(), device=hist.device) >> min(shift, 62)
    return torch.zeros_like(hist).index_add_(0, idx, hist)


def _upper_quantile(hist: torch.Tensor, width: float, below: float, q: float) -> float:
    """Value under which a fraction ``q`` (>= 0.5) of the mass lies, for the one-sided histogram ``hist``
    (bins of ``width`` from 0) with ``below`` further values at or under 0; linear within a bin."""
    total = float(hist.sum()) + below
    target = q * total
    if target <= below:
        return 0.0
    cdf = below + torch.cumsum(hist.double(), 0)
    k = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64)).item())
    k = min(k, hist.numel() - 1)
    prev = below if k == 0 else float(cdf[k - 1])
    frac = (target - prev) / max(float(hist[k]), 1.0)
    return (k + min(max(frac, 0.0), 1.0)) * width


class PercentileObserver(HistogramActivationObserver):
    """Clips each tail at a percentile: ``hi`` = p-th percentile, ``lo`` = (100 − p)-th, p in (50, 100].

    p = 100 gives min/max. Each tail is cut apart, which suits the asymmetric (affine) int8 range: a
    ReLU-like tensor keeps its lower end at 0, a skewed one loses mass only from the tail that has it.
    """

    def __init__(self, percentile: float = 99.99, bins: int = 2048, relu6: str | None = None, **kwargs) -> None:
        super().__init__(bins=bins, relu6=relu6, **kwargs)
        if not 50.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
        self.percentile = float(percentile)

    def _search_range(self) -> tuple[float, float]:
        if self.percentile == 100.0:
            return float(self.min_val), float(self.max_val)
        q = self.percentile / 100.0
        zeros = float(self.zero_count)
        neg_total = float(self.neg_hist.sum())
        pos_total = float(self.pos_hist.sum())
        hi = _upper_quantile(self.pos_hist, self._width(self.pos_exp), zeros + neg_total, q)
        lo = -_upper_quantile(self.neg_hist, self._width(self.neg_exp), zeros + pos_total, q)
        return lo, hi


class EntropyObserver(HistogramActivationObserver):
    """TensorRT's entropy calibration: the clipping threshold T minimising KL(P‖Q) between the
    histogram of |x| (P, clipped mass added to the last kept bin) and its quantized version (Q).

    As in TensorRT (and MXNet / TVM, which follow its slides), thresholds are searched from ``levels``
    bins up; Q merges the kept bins into ``levels`` groups and spreads each group's mass evenly over the
    bins that are non-zero in P. ``levels`` is 128 (TensorRT's number, one sign of int8) for a two-sided
    tensor and 256 for a one-sided one (all int8 levels then lie on one side). One deviation: exact zeros
    are left out of P. They are always representable, and after a ReLU they are a spike holding half the
    mass which Q smears over its neighbour as soon as two bins merge, so with them KL always picks the
    smallest threshold. The range is ``[max(min, −T), min(max, T)]``: one threshold for both signs, so on
    a two-sided tensor with a single long tail (a skewed residual sum) that tail is clipped hard — ``mse``
    is the better method there.
    """

    def __init__(self, bins: int = 2048, relu6: str | None = None, levels: int | None = None, **kwargs) -> None:
        super().__init__(bins=bins, relu6=relu6, **kwargs)
        self.levels = levels

    def _search_range(self) -> tuple[float, float]:
        pos_e, neg_e = int(self.pos_exp), int(self.neg_exp)
        has_pos, has_neg = bool(self.pos_hist.sum() > 0), bool(self.neg_hist.sum() > 0)
        e = max(pos_e if has_pos else _HIST_MIN_EXPONENT, neg_e if has_neg else _HIST_MIN_EXPONENT)
        mag = torch.zeros(self.bins, dtype=torch.int64)
        if has_pos:
            mag += _merge_bins(self.pos_hist, e - pos_e)
        if has_neg:
            mag += _merge_bins(self.neg_hist, e - neg_e)
        levels = self.levels or (128 if (has_pos and has_neg) else 256)
        t = _kl_threshold_bins(mag.double(), levels) * math.ldexp(1.0, e) / self.bins
        return -t, t


def _kl_threshold_bins(hist: torch.Tensor, levels: int, eps: float = 1e-4) -> int:
    """Number of leading bins of ``hist`` to keep, minimising KL(P‖Q) (TensorRT's search).

    TensorRT / MXNet loop over thresholds in Python and build P and Q bin by bin; here KL of every
    candidate comes from prefix sums over the histogram, O(levels) per candidate::

        KL = (Σ p log p − Σ_groups P_g log q_g) / N − log N + log N_q

    where ``q_g`` is group g's per-bin value of Q and ``P_g`` the mass of P in group g. Where P has mass
    and Q none (only possible in the last group), Q gets ``eps`` counts, as TensorRT's smoothing does.
    """
    nonzero = torch.nonzero(hist).flatten()
    n = int(nonzero[-1]) + 1 if nonzero.numel() else 0
    if n <= levels:
        return max(n, 1)
    h = hist[:n]
    total = float(h.sum())
    zero = torch.zeros(1, dtype=torch.float64)
    cum = torch.cat([zero, torch.cumsum(h, 0)])
    cum_nz = torch.cat([zero, torch.cumsum((h > 0).double(), 0)])
    cum_hlogh = torch.cat([zero, torch.cumsum(torch.where(h > 0, h * torch.log(h.clamp(min=1.0)), 0.0), 0)])

    cand = torch.arange(levels, n + 1)  # keep bins [0, i)
    merged = cand // levels
    j = torch.arange(levels)
    starts = j[None, :] * merged[:, None]
    ends = torch.where(j[None, :] < levels - 1, starts + merged[:, None], cand[:, None])
    group_sum = cum[ends] - cum[starts]  # Q's mass per group (clipped values excluded)
    group_nz = cum_nz[ends] - cum_nz[starts]
    clipped = total - cum[cand]
    last = h[cand - 1]
    group_nz[:, -1] += ((last == 0) & (clipped > 0)).double()  # P's last bin holds the clipped mass
    p_group = group_sum.clone()
    p_group[:, -1] += clipped
    q_bin = torch.where(group_nz > 0, group_sum / group_nz.clamp(min=1.0), 0.0)
    q_bin = torch.where((p_group > 0) & (q_bin == 0), eps, q_bin)
    n_q = (q_bin * group_nz).sum(1)
    p_last = last + clipped
    sum_plogp = cum_hlogh[cand - 1] + torch.where(p_last > 0, p_last * torch.log(p_last.clamp(min=1e-300)), 0.0)
    sum_plogq = torch.where(p_group > 0, p_group * torch.log(q_bin.clamp(min=1e-300)), 0.0).sum(1)
    kl = (sum_plogp - sum_plogq) / total - math.log(total) + torch.log(n_q)
    return int(cand[int(torch.argmin(kl))])


class MSEObserver(HistogramActivationObserver):
    """The range ``[lo, hi]`` minimising the expected squared quantization error over the histogram.

    For bounds on bin edges the error is, in closed form over the histogram (bin centres ``c``, counts
    ``n``, step ``s = (hi − lo) / 255``)::

        Σ_{c > hi} n (c − hi)²  +  Σ_{c < lo} n (lo − c)²  +  N_in · s² / 12

    (clipping error plus uniform rounding noise on the ``N_in`` non-zero values inside; exact zeros are
    representable and cost nothing). The noise term assumes values spread within a step, as continuous
    activations are; point masses other than 0 (a clamp's floor) are not modelled. Errors come from
    prefix sums in O(1) per candidate pair: every upper edge when the tensor is one-sided (or
    ``relu6="clamped"``, which fixes the lower bound at 0), else a 256 × 256 grid of edge pairs refined
    at full resolution around its best pair.
    """

    _GRID = 256  # candidate bounds per side in the coarse pass of a two-sided search

    def _search_range(self) -> tuple[float, float]:
        pos, neg = self.pos_hist.double(), self.neg_hist.double()
        wp, wn = self._width(self.pos_exp), self._width(self.neg_exp)
        n_pos = int(torch.nonzero(pos).flatten()[-1]) + 1 if bool(pos.sum() > 0) else 0
        n_neg = int(torch.nonzero(neg).flatten()[-1]) + 1 if bool(neg.sum() > 0) else 0
        pos, neg = pos[:n_pos], neg[:n_neg]
        # Signed bins in ascending order of their centres (zeros are left out: error 0 at any range).
        centres = torch.cat([-(torch.arange(n_neg - 1, -1, -1, dtype=torch.float64) + 0.5) * wn,
                             (torch.arange(n_pos, dtype=torch.float64) + 0.5) * wp])
        counts = torch.cat([neg.flip(0), pos])
        zero = torch.zeros(1, dtype=torch.float64)
        c0 = torch.cat([zero, torch.cumsum(counts, 0)])
        c1 = torch.cat([zero, torch.cumsum(counts * centres, 0)])
        c2 = torch.cat([zero, torch.cumsum(counts * centres * centres, 0)])
        n_total = float(c0[-1])

        his = torch.cat([zero, torch.arange(1, n_pos + 1, dtype=torch.float64) * wp])
        his = his.clamp(max=float(self.max_val))
        if self.relu6 == "clamped" or n_neg == 0:
            los = zero.clone()
        else:
            los = torch.cat([zero, -torch.arange(1, n_neg + 1, dtype=torch.float64) * wn])
            los = los.clamp(min=float(self.min_val))
        # Above hi: bins from index j_hi on; below lo: bins before j_lo.
        j_hi = torch.searchsorted(centres, his, right=True)
        j_lo = torch.searchsorted(centres, los, right=False)
        cnt_hi = n_total - c0[j_hi]
        clip_hi = (c2[-1] - c2[j_hi]) - 2 * his * (c1[-1] - c1[j_hi]) + his * his * cnt_hi
        cnt_lo = c0[j_lo]
        clip_lo = c2[j_lo] - 2 * los * c1[j_lo] + los * los * cnt_lo
        steps = float(self.quant_max - self.quant_min)

        def grid_min(ilo: torch.Tensor, ihi: torch.Tensor) -> tuple[int, int]:
            lo, hi = los[ilo][:, None], his[ihi][None, :]
            step = (hi - lo) / steps
            inside = n_total - cnt_lo[ilo][:, None] - cnt_hi[ihi][None, :]
            err = clip_lo[ilo][:, None] + clip_hi[ihi][None, :] + inside * step * step / 12.0
            i, j = divmod(int(torch.argmin(err)), ihi.numel())
            return int(ilo[i]), int(ihi[j])

        # Coarse to fine: at most ~_GRID x _GRID pairs, then every pair around the coarse optimum.
        n_lo, n_hi = los.numel(), his.numel()
        stride_lo = max(1, -(-n_lo // self._GRID))
        stride_hi = max(1, -(-n_hi // self._GRID)) if n_lo > 1 else 1
        a, b = grid_min(_strided(n_lo, stride_lo), _strided(n_hi, stride_hi))
        if stride_lo > 1 or stride_hi > 1:
            a, b = grid_min(torch.arange(max(a - stride_lo, 0), min(a + stride_lo + 1, n_lo)),
                            torch.arange(max(b - stride_hi, 0), min(b + stride_hi + 1, n_hi)))
        return float(los[a]), float(his[b])


def _strided(n: int, stride: int) -> torch.Tensor:
    idx = torch.arange(0, n, stride)
    return idx if int(idx[-1]) == n - 1 else torch.cat([idx, torch.tensor([n - 1])])


class ReLU6FixedObserver(FixedQParamsObserver):
    """ReLU6 output with the fixed range [0, 6]: scale 6/255, zero point −128; needs no calibration."""

    degenerate = False

    def __init__(self, scale: float = RELU6_MAX / (_QMAX - _QMIN), zero_point: int = _QMIN, dtype=torch.int8,
                 qscheme=torch.per_tensor_affine, quant_min=_QMIN, quant_max=_QMAX, **kwargs) -> None:
        kwargs.pop("eps", None)  # FixedQParamsObserver takes no eps
        super().__init__(scale=scale, zero_point=zero_point, dtype=dtype, qscheme=qscheme,
                         quant_min=quant_min, quant_max=quant_max, **kwargs)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        _check_finite(X.detach())
        return X


# ---------------------------------------------------------------------------------------------------
# Constructors


_OBSERVERS = {
    "minmax": (MinMaxActivationObserver, {}),
    "moving_average": (MovingAverageActivationObserver, {"averaging_constant": 0.01}),
    "percentile": (PercentileObserver, {"percentile": 99.99, "bins": 2048}),
    "entropy": (EntropyObserver, {"bins": 2048}),
    "mse": (MSEObserver, {"bins": 2048}),
}


def _check_option(method: str, key: str, value) -> None:
    def bad(why: str) -> UsageError:
        return UsageError(f"calibration {method!r}: option {key}={value!r} {why}")

    if key == "averaging_constant":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
            raise bad("must be a number in (0, 1]")
    elif key == "percentile":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 50.0 < float(value) <= 100.0:
            raise bad("must be a number in (50, 100]")
    elif key == "bins":
        if isinstance(value, bool) or not isinstance(value, int) or not 16 <= value <= 1 << 16:
            raise bad("must be an integer in [16, 65536]")


def make_activation_observer(method: str, *, relu6: str | None = None, **opts):
    """Observer constructor (``Observer.with_args(...)``) for int8 per-tensor affine activations.

    ``method``: one of :data:`ACTIVATION_METHODS`; ``relu6``: ``None``, ``"clamped"`` or ``"fixed"``;
    ``opts``: the method's options (``averaging_constant``, ``percentile``, ``bins``). Wrong names or
    values raise :class:`UsageError` with the closest valid names.
    """
    if method not in _OBSERVERS:
        raise UsageError(
            f"unknown calibration method {method!r}{did_you_mean(str(method), ACTIVATION_METHODS)}; "
            f"choose from {', '.join(ACTIVATION_METHODS)}"
        )
    if relu6 is not None and relu6 not in RELU6_MODES:
        raise UsageError(
            f"unknown relu6 mode {relu6!r}{did_you_mean(str(relu6), RELU6_MODES)}; "
            f"choose from None, {', '.join(RELU6_MODES)}"
        )
    cls, defaults = _OBSERVERS[method]
    for key, value in opts.items():
        if key not in defaults:
            hint = did_you_mean(key, defaults) or (
                f" (it takes {', '.join(defaults)})" if defaults else " (it takes none)")
            raise UsageError(f"calibration {method!r} has no option {key!r}{hint}")
        _check_option(method, key, value)
    if relu6 == "fixed":
        return ReLU6FixedObserver.with_args()
    return cls.with_args(relu6=relu6, **{**defaults, **opts})


def make_weight_observer(per_channel: bool, ch_axis: int = 0, *, bits: int = 8):
    """Observer constructor for symmetric weights: range ±(2**(bits−1) − 1) (int8: −127..127), zero point 0,
    one scale per slice along ``ch_axis`` or one per tensor (torchao observers as they are)."""
    if not 2 <= bits <= 8:
        raise UsageError(f"weight bits must be between 2 and 8, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    if per_channel:
        return PerChannelMinMaxObserver.with_args(
            ch_axis=ch_axis, dtype=torch.int8, qscheme=torch.per_channel_symmetric, quant_min=-qmax, quant_max=qmax
        )
    return MinMaxObserver.with_args(
        dtype=torch.int8, qscheme=torch.per_tensor_symmetric, quant_min=-qmax, quant_max=qmax
    )


def pin_qparams(obs: torch.nn.Module, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
    """Make observer ``obs`` report these parameters from now on (``convert_pt2e`` and the bias
    observers derived from it read them through ``calculate_qparams``), in its own dtypes and shapes.

    Observers come from different classes (torchao's and this module's), so this overrides
    ``calculate_qparams`` on the instance rather than editing class-specific statistics.
    """
    s0, z0 = obs.calculate_qparams()
    scale = scale.detach().to(s0.dtype).reshape(s0.shape if s0.numel() == scale.numel() else (-1,)).clone()
    zero_point = zero_point.detach().to(z0.dtype).reshape(
        z0.shape if z0.numel() == zero_point.numel() else (-1,)).clone()
    obs.calculate_qparams = lambda: (scale.clone(), zero_point.clone())
