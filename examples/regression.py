"""A new task made by subclassing only: predict a real number per text (e.g. a rating), MSE loss.

model: {class_path: examples.regression.SequenceRegression}        # the rest: SequenceClassification's
data:  {class_path: examples.regression.RegressionDataModule,       # the rest: ClassificationDataModule's
        init_args: {train_files: ..., text_column: sentence, label_column: score}}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanSquaredError, MetricCollection, PearsonCorrCoef

from gptlab.data import ClassificationDataModule
from gptlab.reports import Report
from gptlab.tasks import SequenceClassification


class RegressionDataModule(ClassificationDataModule):
    """Text column(s) and a numeric `label_column`; files, checks and batches as ClassificationDataModule."""

    @property
    def label_names(self) -> list[str]:
        return [self.label_column]  # one output, named after the target column

    def encode_label(self, value, where, problems) -> float | None:
        try:
            return float(value)
        except (TypeError, ValueError):
            problems.add(f"{where}: target {value!r} is not a number")  # reported with every other problem
            return None


class SequenceRegression(SequenceClassification):
    """One linear output on the pooled state, trained with squared error; reports MSE and Pearson's r."""

    def configure_metrics(self) -> None:
        metrics = MetricCollection({"mse": MeanSquaredError(), "pearson": PearsonCorrCoef()})
        self.set_metrics(metrics, stages=("val", "test"))
        self.report_metrics = None  # nothing beyond the logged scalars

    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.mse_loss(outputs.squeeze(-1).float(), batch["labels"].float())  # outputs (B, 1)

    def metric_inputs(self, outputs: torch.Tensor, batch: dict) -> tuple:
        return outputs.squeeze(-1).float(), batch["labels"].float()

    def report(self) -> Report:
        scores = {k.split("/")[1]: v.item() for k, v in self.test_metrics.compute().items()}
        return Report("SequenceRegression: test report", {"loss": self.test_loss.compute().item(), **scores})

    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        # The predictions file's columns: text, gold label (none), prediction, probability (none).
        values = self(batch)[:, 0].tolist()
        rows = [f"{' '.join(t.split())}\t\t{v:.4f}\t" for t, v in zip(batch["text"], values, strict=True)]
        self._predictions.extend(rows)
        return rows
