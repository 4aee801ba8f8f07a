"""End-to-end comparison of the artifact with the float model: accuracy with labels, agreement without."""

from __future__ import annotations

import numpy as np

from .metrics import ErrorStats, sqnr_db
from .report import EndToEnd

__all__ = ["end_to_end", "chance_warning"]


def end_to_end(float_logits: np.ndarray, quant_logits: np.ndarray, labels: np.ndarray | None, k: int = 5) -> EndToEnd:
    """Top-1 accuracy of both (with ``labels``), top-1 agreement, top-``k`` containment, logits SQNR.

    Top-``k`` containment: the share of images whose float top-1 class is among the artifact's top ``k``
    (``k`` is clipped to the number of classes).
    """
    if float_logits.shape != quant_logits.shape:
        raise ValueError(f"logits shapes differ: float {float_logits.shape}, artifact {quant_logits.shape}")
    n, classes = float_logits.shape
    f_top1 = float_logits.argmax(axis=1)
    q_top1 = quant_logits.argmax(axis=1)
    k = min(k, classes)
    q_topk = np.argsort(-quant_logits, axis=1, kind="stable")[:, :k]
    containment = float((q_topk == f_top1[:, None]).any(axis=1).mean()) if n else float("nan")
    agreement = float((f_top1 == q_top1).mean()) if n else float("nan")
    sq = sqnr_db(ErrorStats().update(float_logits, quant_logits))
    if labels is None:
        return EndToEnd(n, False, None, None, agreement, containment, sq,
                        "no labels: accuracy cannot be measured; reporting agreement with the float model "
                        "(the accuracy drop is at most the disagreement)")
    labels = np.asarray(labels)
    f_right, q_right = f_top1 == labels, q_top1 == labels
    return EndToEnd(n, True, float(f_right.mean()), float(q_right.mean()), agreement, containment, sq,
                    float_only_right=int(np.sum(f_right & ~q_right)), quant_only_right=int(np.sum(q_right & ~f_right)))


def chance_warning(e2e: EndToEnd, classes: int) -> str | None:
    """A warning when the float model is near chance on the evaluation images (top-1 below twice
    1/``classes``): both models then guess, an accuracy drop of ~0 says nothing about the file, and a
    degenerate file passes a drop gate (measured: an untrained model's int8 file, logits SQNR 0 dB, drop
    0 pp). Wrong weights, labels or preprocessing give the same figure."""
    if not e2e.labels_used or e2e.float_top1 is None or classes < 2 or e2e.float_top1 >= 2.0 / classes:
        return None
    return (f"the float model scores {100 * e2e.float_top1:.2f} % on these images, near chance for {classes} "
            f"classes ({100 / classes:.1f} %): the accuracy drop says nothing about the file here — check the "
            f"weights, labels and preprocessing; the file's logits are {e2e.output_sqnr_db:.1f} dB from the "
            f"model's, top-1 agreement {100 * e2e.top1_agreement:.2f} %")
