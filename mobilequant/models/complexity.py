"""Model complexity: parameters and multiply-adds, counted by torch itself.

``count_madds`` runs one forward pass under :class:`torch.utils.flop_counter.FlopCounterMode` and halves
its FLOPs (torch counts a multiply-add as two FLOPs). What is counted is what the papers count:
convolutions and matrix products (the classifier); BN, activations, pooling, additions are not.

Grouped and depthwise convolutions: torch's ``conv_flop_count`` multiplies by ``w_shape[1]``, which for a
grouped conv is already ``in_channels / groups``, so ``out_h·out_w·k_h·k_w·c_out·c_in/groups`` is counted —
the correct figure (checked in ``tests/test_models.py::test_madds_of_grouped_conv``). No correction needed.

Counting needs no arithmetic: build the model under ``with torch.device("meta"):`` and the forward pass
only propagates shapes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import UsageError

__all__ = ["count_params", "count_madds"]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_madds(model: nn.Module, input_size: int | tuple[int, ...] | None = None) -> int:
    """Multiply-adds of one forward pass for a single image.

    ``input_size``: ``(C, H, W)``, ``(N, C, H, W)`` (the count is then per batch), a resolution ``R``
    (channels taken from ``model.preprocess``), or ``None`` for the model's own ``preprocess.input_size``.
    The input is created on the model's device (``meta`` works and is fast).
    """
    shape = _input_shape(model, input_size)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    x = torch.zeros(shape, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    except RuntimeError as e:  # torch: a feature map shrank to nothing (pooling / a strided conv on 1×1)
        name = getattr(model, "model_name", None) or type(model).__name__
        raise UsageError(f"count_madds: {name} cannot take a {'×'.join(map(str, shape[1:]))} input "
                         f"({torch_reason(e)})") from e
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def torch_reason(e: BaseException) -> str:
    """The last sentence of the first line of a torch error: ``Output size is too small``."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return lines[0].rsplit(". ", 1)[-1].rstrip(".")


def _input_shape(model: nn.Module, input_size) -> tuple[int, ...]:
    preprocess = getattr(model, "preprocess", None)
    if input_size is None:
        if preprocess is None:
            raise UsageError("count_madds: the model has no `preprocess`; pass input_size=(C, H, W)")
        input_size = preprocess.input_size
    if isinstance(input_size, int):
        chans = preprocess.input_size[0] if preprocess is not None else 3
        input_size = (chans, input_size, input_size)
    input_size = tuple(int(v) for v in input_size)
    if len(input_size) == 3:
        return (1, *input_size)
    if len(input_size) == 4:
        return input_size
    raise UsageError(f"count_madds: input_size must be (C, H, W), (N, C, H, W) or an int, got {input_size!r}")
