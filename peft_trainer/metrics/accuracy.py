"""Accuracy as an ``evaluate`` metric script, loadable offline with ``evaluate.load(path_to_this_file)``."""

from __future__ import annotations

import datasets
import evaluate

_DESCRIPTION = """Fraction of predictions equal to their reference: (TP + TN) / N. Same inputs and output as the
Hub's ``accuracy`` metric (``predictions``/``references`` of class ids, optional ``normalize`` and
``sample_weight``), without its scikit-learn dependency and without a download."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
    normalize (bool): return the fraction (default) or the count of correct predictions.
    sample_weight (list of float): per-example weights (default: 1 each).
Returns:
    accuracy (float): in [0, 1] when normalize, else the (weighted) count.
Example:
    >>> metric = evaluate.load("peft_trainer/metrics/accuracy.py")
    >>> metric.compute(predictions=[1, 0, 1], references=[1, 1, 1])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(
        self,
        predictions: list[int],
        references: list[int],
        normalize: bool = True,
        sample_weight: list[float] | None = None,
    ) -> dict[str, float]:
        weights = list(sample_weight) if sample_weight is not None else [1.0] * len(predictions)
        correct = sum(w for p, r, w in zip(predictions, references, weights) if p == r)
        total = sum(weights)
        return {"accuracy": float(correct / total if normalize and total else correct)}
