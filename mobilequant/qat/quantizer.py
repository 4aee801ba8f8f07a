"""The QAT quantizer: the PTQ :class:`~mobilequant.quant.MobileQuantizer` with fake-quant constructors.

PT2E's design is that PTQ and QAT differ only by the constructor in each ``QuantizationSpec`` (observer
vs fake-quant wrapping an observer), so the annotation rules — TFLite int8 scheme, ReLU6 ranges, shared
and fixed parameters, int32 bias — are the PTQ quantizer's own code: ``MobileQuantizer(config,
is_qat=True)`` puts a ``FakeQuantize`` (or, with ``learn_scales``, an LSQ ``LearnableFakeQuantize``) around
moving-average observers and looks through the conv → BN chains that QAT keeps in the graph.
"""

from __future__ import annotations

from ..quant.config import QuantConfig
from ..quant.quantizer import MobileQuantizer

__all__ = ["qat_quantizer"]


def qat_quantizer(config: QuantConfig, learn_scales: bool = False) -> MobileQuantizer:
    """The quantizer ``prepare_qat_pt2e`` gets: the PTQ rules with fake-quant constructors."""
    return MobileQuantizer(config, is_qat=True, learn_scales=learn_scales)
