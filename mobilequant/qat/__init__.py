"""Quantization-aware training: ``run_qat(QATJobConfig) -> QATResult``.

The same quantizer as PTQ (fake-quant constructors), torchao's ``prepare_qat_pt2e`` / ``convert_pt2e``,
conv-BN folding with BN statistics while training then frozen, observer freezing, optional learned scales
(LSQ), depthwise oscillation control, atomic resumable checkpoints, DDP under ``torchrun``.
A :class:`QATResult` is a :class:`~mobilequant.quant.QuantResult`, so ``mobilequant.export`` takes it.
See ``docs/qat.md``.
"""

from .checkpoint import find_checkpoint, load_checkpoint
from .config import QATJobConfig
from .distributed import shard_plan
from .job import CSV_COLUMNS, QATResult, ranges_from_table, run_qat
from .quantizer import qat_quantizer

__all__ = [
    "CSV_COLUMNS",
    "QATJobConfig",
    "QATResult",
    "find_checkpoint",
    "load_checkpoint",
    "qat_quantizer",
    "ranges_from_table",
    "run_qat",
    "shard_plan",
]
