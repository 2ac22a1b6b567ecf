"""Per-class tables in scikit-learn's `classification_report` layout, and the confusion matrix.

The tables are built from counts that torchmetrics summed over batches and devices (a confusion
matrix, or per-class true positives / false positives / false negatives), never from per-batch
averages. Definitions follow scikit-learn's `precision_recall_fscore_support`:

    precision = tp / (tp + fp)     recall = tp / (tp + fn)     f1 = 2 tp / (2 tp + fp + fn)
    support   = tp + fn            (the number of true instances of the class)

and a ratio whose denominator is 0 is 0 (scikit-learn's `zero_division=0`, its default value
after the warning). Rows after the classes: `accuracy` (multi-class; f1-score column, as sklearn
prints it) or `micro avg` (multi-label), then `macro avg` (unweighted mean over the classes) and
`weighted avg` (mean weighted by support).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gptlab.reports import Table

COLUMNS = ["precision", "recall", "f1-score", "support"]


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # 0 where the denominator is 0: scikit-learn's zero_division=0.
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


def prf(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-class precision, recall and F1 (float64) from count vectors."""
    return _ratio(tp, tp + fp), _ratio(tp, tp + fn), _ratio(2 * tp, 2 * tp + fp + fn)


def scores_table(
    names: Sequence[str],
    tp: torch.Tensor,
    fp: torch.Tensor,
    fn: torch.Tensor,
    title: str = "Per-class scores",
    accuracy: float | None = None,
) -> tuple[Table, dict[str, float]]:
    """The classification-report table and its headline averages from per-class counts.

    Args:
        names: class names, in the order of the count vectors.
        tp, fp, fn: per-class true positives, false positives and false negatives.
        title: the table's title.
        accuracy: for single-label multi-class data, the accuracy row replaces `micro avg`
            (they are equal there: every false positive is another class's false negative).

    Returns:
        the table, and {"macro_f1", "weighted_f1", "micro_f1" or "accuracy", ...} for the report.
    """
    tp, fp, fn = (torch.as_tensor(x).long().cpu() for x in (tp, fp, fn))
    support = tp + fn
    precision, recall, f1 = prf(tp, fp, fn)
    total = int(support.sum())
    rows: list[list] = [
        [name, float(p), float(r), float(f), int(s)]
        for name, p, r, f, s in zip(names, precision, recall, f1, support, strict=True)
    ]
    summary: dict[str, float] = {}
    if accuracy is not None:
        rows.append(["accuracy", None, None, float(accuracy), total])
        summary["accuracy"] = float(accuracy)
    else:
        micro = [float(x) for x in prf(tp.sum(), fp.sum(), fn.sum())]
        rows.append(["micro avg", *micro, total])
        summary.update(micro_precision=micro[0], micro_recall=micro[1], micro_f1=micro[2])
    n = max(len(names), 1)
    macro = [float(x.sum() / n) for x in (precision, recall, f1)]
    weights = support.double()
    # sklearn: a weighted average over zero support is ill-defined, hence 0.
    weighted = [float((x * weights).sum() / weights.sum()) if total else 0.0 for x in (precision, recall, f1)]
    rows.append(["macro avg", *macro, total])
    rows.append(["weighted avg", *weighted, total])
    summary.update(
        macro_precision=macro[0], macro_recall=macro[1], macro_f1=macro[2], weighted_f1=weighted[2]
    )
    return Table(title=title, columns=COLUMNS, rows=rows), summary


def confusion_scores_table(
    names: Sequence[str], confusion: torch.Tensor, title: str = "Per-class scores"
) -> tuple[Table, dict[str, float]]:
    """`scores_table` from a confusion matrix (rows: true class, columns: predicted class)."""
    confusion = torch.as_tensor(confusion).long().cpu()
    tp = confusion.diag()
    total = int(confusion.sum())
    accuracy = float(tp.sum()) / total if total else 0.0
    return scores_table(
        names, tp, confusion.sum(0) - tp, confusion.sum(1) - tp, title=title, accuracy=accuracy
    )


def confusion_table(
    names: Sequence[str],
    confusion: torch.Tensor,
    title: str = "Confusion matrix (rows: true, columns: predicted)",
) -> Table:
    """The confusion matrix as a table: one row per true class, one column per predicted class."""
    confusion = torch.as_tensor(confusion).long().cpu()
    rows = [[name, *(int(v) for v in row)] for name, row in zip(names, confusion, strict=True)]
    return Table(title=title, columns=list(names), rows=rows)


def multilabel_confusion_table(
    names: Sequence[str], tp: torch.Tensor, fp: torch.Tensor, tn: torch.Tensor, fn: torch.Tensor
) -> Table:
    """Per-label 2x2 confusion counts (scikit-learn's multilabel_confusion_matrix, one row per label)."""
    rows = [
        [name, int(a), int(b), int(c), int(d)] for name, a, b, c, d in zip(names, tn, fp, fn, tp, strict=True)
    ]
    return Table(title="Confusion counts per label", columns=["tn", "fp", "fn", "tp"], rows=rows)
