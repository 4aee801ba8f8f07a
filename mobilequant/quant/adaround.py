"""AdaRound: each conv / linear weight rounded up or down to minimise the layer's output error.

Nagel, Amjad, van Baalen, Louizos, Blankevoort, "Up or Down? Adaptive Rounding for Post-Training
Quantization", ICML 2020. Rounding every weight to the nearest grid point minimises the weight error,
not the output error; AdaRound learns, per weight, whether ``floor(w / s)`` or ``floor(w / s) + 1`` is
stored, by minimising ``‖f(op(x̂, W̃)) − f(op(x, W))‖²`` over calibration data with a continuous
relaxation ``W̃ = s · clamp(floor(W / s) + h(V), q_min, q_max)``, ``h`` a rectified sigmoid, plus a
regulariser ``λ Σ 1 − |2h(V) − 1|^β`` that pushes every ``h`` to 0 or 1 as ``β`` anneals from 20 to 2.
``x̂`` is the layer's input in the simulated int8 model with the layers above already rounded (the
paper's "asymmetric reconstruction": it also absorbs their error and the activation quantization's),
``x`` the float input, ``f`` the layer's activation when it has one (ReLU / ReLU6).

The scales are not touched: they are the calibrated weight observers' (per channel or per tensor), so
the stored weight ``W̃`` lies exactly on the grid the file will use and ``convert_pt2e`` and the exporters
carry it unchanged. Runs on the calibrated prepared graph in the same side-by-side walk as
:func:`mobilequant.quant.bias_correction.correct`, which it extends: after a layer is rounded, its bias
is corrected for the mean error that remains (``bias_correction=True``).

Written here because no maintained library does it on a PT2E graph: torchao and torch have no AdaRound,
and AIMET's (``aimet_torch``) runs on its own QuantSim model and needs torchvision, which does not import
beside the torch this project pins.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from ..capture import layer_name
from ..errors import UsageError
from .bias_correction import BiasCorrectionReport, _get, _set, _SideBySide, walk_side_by_side

__all__ = ["AdaRoundOptions", "LayerRounding", "AdaRoundReport", "adaround"]

aten = torch.ops.aten
# activations applied to a layer's output inside the reconstruction loss (the paper's f)
_ACTIVATIONS = frozenset({aten.relu.default, aten.hardtanh.default, aten.clamp.default})
_ZETA, _GAMMA = 1.1, -0.1  # rectified sigmoid stretch (paper §3.2)

# Images held at once by the walk (float and simulated paths): AdaRound gains from more data than bias
# correction needs (MobileNetV2 at 224 px: ~40 MB per image, ~200 images).
ADAROUND_BUDGET_BYTES = 8 << 30


@dataclass(frozen=True)
class AdaRoundOptions:
    """How each layer's rounding is learned (paper defaults, except fewer iterations: a CPU budget)."""

    iterations: int = 1000  # Adam steps per layer
    batch_size: int = 32  # images per step, at most ...
    positions: int = 8192  # ... and at most this many output positions per step (≥ 1 image): a 224-px
    #                        network's early layers have 12,544 positions per image, enough on their own
    lr: float = 1e-3
    reg_weight: float = 0.01  # λ of the rounding regulariser
    beta: tuple[float, float] = (20.0, 2.0)  # annealed from the first to the second value
    warm_start: float = 0.2  # fraction of the steps with reconstruction loss only
    seed: int = 0

    def __post_init__(self):
        if min(self.iterations, self.batch_size, self.positions) < 1:
            raise UsageError("AdaRound needs iterations, batch_size and positions ≥ 1, got "
                             f"{self.iterations}, {self.batch_size}, {self.positions}")
        if not 0.0 <= self.warm_start < 1.0:
            raise UsageError(f"AdaRound warm_start must be in [0, 1), got {self.warm_start}")


@dataclass(frozen=True)
class LayerRounding:
    layer: str
    weights: int
    flipped: int  # weights stored one step away from round-to-nearest
    mse_nearest: float  # reconstruction error of round-to-nearest on the layer's images
    mse_adaround: float  # ... of the learned rounding
    seconds: float


@dataclass(frozen=True)
class AdaRoundReport:
    layers: tuple[LayerRounding, ...]
    samples: int
    bias_correction: BiasCorrectionReport | None

    def summary(self) -> str:
        if not self.layers:
            return "adaround: no layer"
        flipped = sum(r.flipped for r in self.layers)
        total = sum(r.weights for r in self.layers)
        better = sum(r.mse_adaround < r.mse_nearest for r in self.layers)
        return (f"adaround: {len(self.layers)} layers from {self.samples} samples; {flipped} of {total} weights "
                f"({100.0 * flipped / max(total, 1):.1f} %) rounded away from nearest; output error lower on "
                f"{better} layers")


def adaround(prepared: GraphModule, calibration_batches: Iterable, options: AdaRoundOptions | None = None, *,
             bias_correction: bool = True, budget_bytes: int = ADAROUND_BUDGET_BYTES) -> AdaRoundReport:
    """Learn the rounding of every quantized conv / linear weight of the calibrated ``prepared`` graph,
    layer by layer from the input, and store the rounded weights (on the weight observers' grid) in place
    of the float ones; with ``bias_correction``, correct each bias afterwards as
    :func:`~mobilequant.quant.bias_correction.correct` does. Uses as many calibration images as fit in
    ``budget_bytes``, evenly spaced over the set (the report says how many)."""
    options = options or AdaRoundOptions()
    walk, batches, samples = walk_side_by_side(
        prepared, calibration_batches,
        lambda gm: _AdaRoundWalk(gm, options, bias_correction=bias_correction), budget_bytes)
    bc = (BiasCorrectionReport(tuple(walk.report), batches, samples, walk.per_channel)
          if bias_correction else None)
    return AdaRoundReport(tuple(walk.rounded), samples, bc)


class _AdaRoundWalk(_SideBySide):
    def __init__(self, prepared: GraphModule, options: AdaRoundOptions, bias_correction: bool) -> None:
        super().__init__(prepared, bias_correction=bias_correction)
        self.options = options
        self.rounded: list[LayerRounding] = []
        self.generator = torch.Generator().manual_seed(options.seed)

    def adjust_layer(self, node: Node, args: tuple, kwargs: dict, f: torch.Tensor) -> tuple:
        obs_node = node.args[1]
        obs = self.gm.get_submodule(str(obs_node.target))
        if getattr(obs, "dtype", None) not in (torch.int8, torch.uint8) or obs_node.args[0].op != "get_attr":
            return args
        weight_target = str(obs_node.args[0].target)
        w = _get(self.gm, weight_target).detach()
        scale, zero_point = (t.detach() for t in obs.calculate_qparams())
        per_channel = obs.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
        shape = [-1] + [1] * (w.dim() - 1) if per_channel else [1] * w.dim()
        grid = _Grid(w.float(), scale.float().reshape(shape), zero_point.float().reshape(shape),
                     obs.quant_min, obs.quant_max)
        act = _activation(node)
        start = time.perf_counter()
        with torch.enable_grad():
            v = self._learn(node, args, kwargs, f, grid, act)
        hard = (v >= 0).float()
        w_round = grid.weight(hard).to(w.dtype)
        nearest = grid.weight(grid.rest.round()).to(w.dtype)
        self.rounded.append(LayerRounding(
            layer=layer_name(node), weights=w.numel(),
            flipped=int((hard != grid.rest.round()).sum()),
            mse_nearest=_mse(node, args, kwargs, nearest, f, act),
            mse_adaround=_mse(node, args, kwargs, w_round, f, act),
            seconds=time.perf_counter() - start))
        _set(self.gm, weight_target, w_round.detach().clone())
        out = list(args)
        out[1] = w_round
        return tuple(out)

    def _learn(self, node, args, kwargs, f, grid: _Grid, act) -> torch.Tensor:
        o = self.options
        x = args[0]
        rest = args[2:]
        target = act(f) if act else f
        p = ((grid.rest - _GAMMA) / (_ZETA - _GAMMA)).clamp(1e-4, 1 - 1e-4)
        v = torch.log(p / (1 - p)).requires_grad_(True)  # h(v) = rest: starts at the float weight
        opt = torch.optim.Adam([v], lr=o.lr)
        n = x.shape[0]
        channel_dim = f.dim() - 1 if node.target == aten.linear.default else min(1, f.dim() - 1)
        per_image = max(f[0].numel() // f.shape[channel_dim], 1)  # output positions of one image
        batch = max(1, min(o.batch_size, n, o.positions // per_image))
        warm = int(o.warm_start * o.iterations)
        for step in range(o.iterations):
            idx = torch.randint(0, n, (batch,), generator=self.generator)
            out = node.target(x[idx], grid.weight(_h(v)), *rest, **kwargs)
            out = act(out) if act else out
            # squared error summed over channels, mean over images and positions (as AIMET's AdaRound)
            loss = (out - target[idx]).pow(2).sum(channel_dim).mean()
            if step >= warm:
                progress = (step - warm) / max(o.iterations - warm, 1)  # linear decay, as AIMET's
                beta = o.beta[1] + (o.beta[0] - o.beta[1]) * (1 - progress)
                loss = loss + o.reg_weight * (1 - (2 * _h(v) - 1).abs().pow(beta)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return v.detach()


class _Grid:
    """``W̃ = s · (clamp(floor(W / s) + h + zp, q_min, q_max) − zp)`` for one weight tensor."""

    def __init__(self, w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> None:
        # a channel without a usable scale (all-zero, repaired after this step) keeps its float weight
        self.valid = torch.isfinite(scale) & (scale > 0)
        self.w, self.scale = w, torch.where(self.valid, scale, torch.ones_like(scale))
        scaled = w / self.scale
        self.floor = scaled.floor()
        self.rest = scaled - self.floor
        self.zero_point, self.qmin, self.qmax = zero_point, qmin, qmax

    def weight(self, h: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(self.floor + h + self.zero_point, self.qmin, self.qmax)
        return torch.where(self.valid, self.scale * (q - self.zero_point), self.w)


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)


def _activation(node: Node):
    """The ReLU / ReLU6 that takes the layer's output, if that is its only user."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in _ACTIVATIONS:
        user = users[0]
        return lambda t: user.target(t, *user.args[1:], **user.kwargs)
    return None


def _mse(node, args, kwargs, weight, f, act) -> float:
    with torch.no_grad():
        out = node.target(args[0], weight, *args[2:], **kwargs)
        if act:
            out, f = act(out), act(f)
        return float((out - f).pow(2).mean())
