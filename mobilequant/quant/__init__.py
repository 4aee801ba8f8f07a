"""Quantization: TFLite int8 post-training quantization (PT2E) and a float16 path.

``quantize(model, calibration_batches, QuantConfig(...)) -> QuantResult`` is the entry point; the
pieces are importable on their own: :class:`MobileQuantizer` (torchao PT2E ``Quantizer``),
:class:`QuantTable`, :func:`to_float16`.
"""

from .config import CALIBRATION_METHODS, RELU6_MODES, QuantConfig
from .fp16 import Float16Result, to_float16
from .ptq import Finding, QuantResult, quantize
from .quantizer import MobileQuantizer
from .table import QuantEntry, QuantTable

__all__ = [
    "CALIBRATION_METHODS",
    "RELU6_MODES",
    "QuantConfig",
    "MobileQuantizer",
    "QuantTable",
    "QuantEntry",
    "QuantResult",
    "Finding",
    "quantize",
    "Float16Result",
    "to_float16",
]
