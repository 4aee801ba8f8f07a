"""Weight oscillations in QAT of depthwise convolutions: tracking, dampening and freezing.

Nagel et al. 2022, "Overcoming Oscillations in Quantization-Aware Training" (ICML, arXiv:2203.11086):
with the straight-through estimator, a latent weight near a rounding boundary flips between two integer
values from step to step; depthwise convolutions (few weights per channel, large per-channel ranges) suffer
most, and the BN statistics estimated while the weights oscillate are then wrong for the frozen model.
The paper's two remedies, both on the integer weights of depthwise convs only:

* **dampening**: an extra loss ``λ · mean(((w − q(w)) / s)²)`` (q(w) held constant) pulling latent weights
  towards their bin centres (``QATJobConfig.osc_dampen`` = λ). The paper's term is the same distance in
  weight units; measured here in quantization steps it lies in [0, 1/4] per weight, so λ means the same
  for every layer and bit width;
* **freezing**: the oscillation frequency of every integer weight is an EMA (momentum m) of "this step
  changed direction relative to the previous change"; a weight whose frequency exceeds the threshold is
  frozen at the rounded EMA of its integer values (``osc_freeze_threshold``, ``osc_momentum``).

Nothing in torch or torchao does this, hence this module. It is a forward hook on the weight fake-quant
modules of the PT2E graph: it sees the fake-quant input ``w`` (for conv-BN, the BN-scaled weight the
quantizer sees) and the module's current scale, and for frozen weights replaces the fake-quant output by
the frozen integer × scale (zero gradient). :meth:`OscillationControl.bake` writes the frozen integers back
into the raw weights before conversion, so ``convert_pt2e`` (which refolds BN from the raw weights)
produces exactly the frozen integers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn
from torch.fx import GraphModule

from .graph import WeightFakeQuant, observers_paused, weight_fake_quants

__all__ = ["OscillationControl"]


def _channel_view(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


class _LayerState(nn.Module):
    """Per-weight statistics of one depthwise layer (buffers, so they go into checkpoints)."""

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.register_buffer("prev_int", torch.zeros(shape))
        self.register_buffer("last_dir", torch.zeros(shape, dtype=torch.int8))  # sign of the last change
        self.register_buffer("freq", torch.zeros(shape))  # EMA of oscillation events
        self.register_buffer("ema_int", torch.zeros(shape))  # EMA of the integer value
        self.register_buffer("frozen", torch.zeros(shape, dtype=torch.bool))
        self.register_buffer("frozen_int", torch.zeros(shape))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))  # training steps observed


class OscillationControl(nn.Module):
    """Tracks (and optionally dampens / freezes) integer-weight oscillations of depthwise convolutions."""

    def __init__(self, gm: GraphModule, dampen: float = 0.0, freeze_threshold: float | None = None,
                 momentum: float = 0.01):
        super().__init__()
        self.dampen = float(dampen)
        self.freeze_threshold = freeze_threshold
        self.momentum = float(momentum)
        self.targets: list[WeightFakeQuant] = [w for w in weight_fake_quants(gm) if w.depthwise]
        self.layers = nn.ModuleDict()
        self._keys: dict[int, str] = {}
        for t in self.targets:
            key = t.module_name.replace(".", "_")
            self.layers[key] = _LayerState(gm.get_parameter(t.weight_param).shape)
            self._keys[id(t.module)] = key
        self.training_step = False  # set by the job around training forwards only
        self._pending: list[torch.Tensor] = []
        self._last_input: dict[str, torch.Tensor] = {}
        self._record = False
        self._handles = [t.module.register_forward_hook(self._hook) for t in self.targets]

    # ----------------------------------------------------------------------------------------- hook

    def _hook(self, module, inputs, output):
        key = self._keys[id(module)]
        st: _LayerState = self.layers[key]
        w = inputs[0]
        axis = module.ch_axis if module.ch_axis >= 0 else 0
        scale = _channel_view(module.scale.detach(), w.ndim, axis)
        zp = _channel_view(module.zero_point.detach().to(w.dtype), w.ndim, axis)
        qmin, qmax = module.activation_post_process.quant_min, module.activation_post_process.quant_max
        if self._record:
            self._last_input[key] = w.detach().clone()
        with torch.no_grad():
            w_int = torch.clamp(torch.round(w.detach() / scale + zp), qmin, qmax)
        if self.training_step:
            if self.dampen > 0:  # in units of the quantization step, so λ does not depend on weight scales
                self._pending.append((((w - (w_int - zp) * scale) / scale) ** 2).mean())
            with torch.no_grad():
                self._update(st, w_int)
        if bool(st.frozen.any()):
            frozen_value = (st.frozen_int - zp) * scale
            output = torch.where(st.frozen, frozen_value.to(output.dtype), output)
        return output

    @torch.no_grad()
    def _update(self, st: _LayerState, w_int: torch.Tensor) -> None:
        m = self.momentum
        if int(st.seen) == 0:
            st.prev_int.copy_(w_int)
            st.ema_int.copy_(w_int)
        else:
            delta = torch.sign(w_int - st.prev_int).to(torch.int8)
            changed = delta != 0
            osc = changed & (st.last_dir != 0) & (delta != st.last_dir)
            st.freq.mul_(1 - m).add_(osc.to(st.freq.dtype), alpha=m)
            st.last_dir.copy_(torch.where(changed, delta, st.last_dir))
            st.ema_int.mul_(1 - m).add_(w_int, alpha=m)
            st.prev_int.copy_(w_int)
            if self.freeze_threshold is not None:
                new = (st.freq > self.freeze_threshold) & ~st.frozen
                st.frozen_int.copy_(torch.where(new, torch.round(st.ema_int), st.frozen_int))
                st.frozen.logical_or_(new)
        st.seen.add_(1)

    # ------------------------------------------------------------------------------------ job API

    def dampening_loss(self) -> torch.Tensor | None:
        """λ · Σ over depthwise layers of the mean squared distance to the bin centre, in quantization
        steps (then cleared)."""
        pending, self._pending = self._pending, []
        if self.dampen <= 0 or not pending:
            return None
        return self.dampen * torch.stack(pending).sum()

    def stats(self) -> dict[str, float]:
        """Mean oscillation frequency and frozen fraction over all tracked depthwise weights."""
        n = sum(st.freq.numel() for st in self._states())
        if n == 0:
            return {"osc_freq": 0.0, "osc_frozen": 0.0}
        freq = sum(float(st.freq.sum()) for st in self._states()) / n
        frozen = sum(int(st.frozen.sum()) for st in self._states()) / n
        oscillating = sum(int((st.freq > 0.005).sum()) for st in self._states()) / n
        return {"osc_freq": freq, "osc_frozen": frozen, "osc_share": oscillating}

    def _states(self) -> Iterator[_LayerState]:
        return iter(self.layers.values())

    @torch.no_grad()
    def bake(self, gm: GraphModule, batch: torch.Tensor) -> int:
        """Write the frozen integers into the raw weights; returns how many weights were set.

        The weight the fake-quant sees is ``raw · f`` with a per-channel factor ``f`` (γ / running std for
        conv-BN, 1 otherwise); one eval forward of ``batch`` (observers paused) records it, ``f`` is fitted
        per channel, and each frozen raw weight becomes ``(q − zp) · s / f``.
        """
        if not any(bool(st.frozen.any()) for st in self._states()):
            return 0
        self._record, self.training_step = True, False
        try:
            with observers_paused(gm):
                gm(batch)
        finally:
            self._record = False
        count = 0
        for t in self.targets:
            key = self._keys[id(t.module)]
            st: _LayerState = self.layers[key]
            if not bool(st.frozen.any()):
                continue
            raw = gm.get_parameter(t.weight_param)
            seen = self._last_input.pop(key)
            flat_raw, flat_seen = raw.reshape(raw.shape[0], -1), seen.reshape(seen.shape[0], -1)
            factor = (flat_raw * flat_seen).sum(1) / (flat_raw * flat_raw).sum(1).clamp_min(1e-30)
            axis = t.module.ch_axis if t.module.ch_axis >= 0 else 0
            scale = _channel_view(t.module.scale.detach(), raw.ndim, axis)
            zp = _channel_view(t.module.zero_point.detach().to(raw.dtype), raw.ndim, axis)
            f = _channel_view(factor, raw.ndim, 0)
            target = (st.frozen_int - zp) * scale / torch.where(f == 0, torch.ones_like(f), f)
            raw.copy_(torch.where(st.frozen, target, raw))
            count += int(st.frozen.sum())
        self._last_input.clear()
        return count

    def remove(self) -> None:
        """Detach the hooks (before conversion)."""
        for h in self._handles:
            h.remove()
        self._handles = []
