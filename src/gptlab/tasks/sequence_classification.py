"""SequenceClassification: one label (or several) per text, from a pooled hidden state.

    input_ids (B, T) ─> backbone ─> hidden (B, T, H) ─> pool ─> (B, H) ─> dropout ─> linear ─> logits (B, C)
                                                         │
                             last: the last real token (a causal model has read the whole text there)
                             mean: the mean over real tokens

Single-label: softmax cross entropy; the prediction is the argmax. Multi-label (`multi_label`):
one sigmoid + binary cross entropy per label; a label is predicted when its probability reaches
`threshold`. This is the fine-tuning half of GPT (Radford et al. 2018, section 3.2): the same
pretrained Transformer, one new linear layer on the last token's state.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MultilabelExactMatch,
    MultilabelF1Score,
    MultilabelStatScores,
)

from gptlab.data.base import IGNORE_INDEX
from gptlab.data.labels import check_label_names
from gptlab.errors import CheckpointError, ConfigError
from gptlab.metrics.classification import (
    confusion_scores_table,
    confusion_table,
    multilabel_confusion_table,
    scores_table,
)
from gptlab.models import Backbone
from gptlab.optim import WarmupCosine
from gptlab.reports import Report, write_text
from gptlab.runs import predictions_path
from gptlab.tasks.base import PeftConfig, TaskModule
from gptlab.tasks.context import Context


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, H) -> (B, H): the last real token's state, or the mean over real tokens.

    Batches are right-padded (batch contract), so a row's last real token sits at length - 1.
    """
    if how == "last":
        last = attention_mask.sum(1).clamp(min=1) - 1  # (B,)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # (B, H)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, H)


class SequenceClassification(TaskModule):
    """Text classification head on a (pretrained) backbone; the report is sklearn's classification report."""

    def __init__(
        self,
        backbone: Backbone | None = None,
        label_names: list[str] | None = None,
        pooling: Literal["last", "mean"] = "last",
        dropout: float = 0.1,
        head_bias: bool = True,
        multi_label: bool = False,
        threshold: float = 0.5,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = WarmupCosine,
        init_from: str | None = None,
        freeze_backbone: bool = False,
        backbone_lr_scale: float = 1.0,
        peft: PeftConfig | None = None,
        context: Context | str = "causal",
    ) -> None:
        """
        Args:
            backbone: the Transformer; under the CLI it may be omitted with `init_from` (taken
                from the pretraining run).
            label_names: the labels in id order. Under the CLI they come from the data module
                (`data.init_args.label_names`, or inferred from the training labels) and are
                saved with the checkpoint.
            pooling: `last` (the last non-pad token, right for causal backbones) or `mean`.
            dropout: dropout on the pooled state before the linear head.
            head_bias: a bias in the linear head. transformers' *ForSequenceClassification have
                none: `main.py export` moves it into the final norm's bias where there is one (our
                GPT, GPT-2); for backbones without (Llama's RMSNorm) set false to export.
            multi_label: any number of labels per text (sigmoid + BCE) instead of exactly one.
            threshold: with multi_label, a label is predicted when its probability reaches this.
            optimizer: called with the parameter groups (see TaskModule).
            scheduler: called with the optimizer (see TaskModule).
            init_from: initialise the backbone from a gptlab checkpoint or HF model directory.
            freeze_backbone: train the head only.
            backbone_lr_scale: the backbone's learning rate as a fraction of the head's.
            peft: a peft config (e.g. peft.LoraConfig): adapters on a frozen backbone (see TaskModule).
            context: what each position reads: `causal` (default), `bidirectional` (every token sees
                the whole text) or `repeat` (the text twice, labelled on the second copy); see
                TaskModule and docs/fine-tuning.md, "Context".
        """
        if not label_names:
            raise ConfigError(
                f"{type(self).__name__} needs label_names: use a data module that provides them "
                f"(gptlab.data.ClassificationDataModule), or pass label_names"
            )
        if pooling not in ("last", "mean"):
            raise ConfigError(f"pooling={pooling!r} must be 'last' or 'mean'")
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"threshold={threshold} must be between 0 and 1")
        super().__init__(
            backbone, optimizer, scheduler, init_from, freeze_backbone, backbone_lr_scale, peft, context
        )
        self.label_names = list(label_names)
        self.pooling = pooling
        self.multi_label = multi_label
        self.threshold = threshold
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(self.backbone.hidden_size, len(label_names), bias=head_bias)
        )
        self.configure_metrics()
        self._predictions: list[str] = []

    def configure_metrics(self) -> None:
        """Set the logged metrics (`set_metrics`) and the report's (`report_metrics`).

        Called at the end of `__init__`; a subclass with other outputs (e.g. regression) overrides it.
        """
        num, threshold = len(self.label_names), self.threshold
        if self.multi_label:
            exact = MultilabelExactMatch(num, threshold=threshold, ignore_index=IGNORE_INDEX)
            f1 = MultilabelF1Score(num, threshold=threshold, average="macro", ignore_index=IGNORE_INDEX)
            self.set_metrics(MetricCollection({"acc": exact, "f1": f1}), stages=("val", "test"))
            # (C, 5): tp, fp, tn, fn, support per label, summed over batches and devices.
            stats = MultilabelStatScores(num, threshold=threshold, average=None, ignore_index=IGNORE_INDEX)
            self.report_metrics = MetricCollection({"stats": stats})
            return
        if num < 2:
            raise ConfigError(
                f"label_names={self.label_names}: single-label classification needs at least 2 labels "
                f"(for one yes/no label, set multi_label: true)"
            )
        accuracy = MulticlassAccuracy(num, average="micro", ignore_index=IGNORE_INDEX)
        f1 = MulticlassF1Score(num, average="macro", ignore_index=IGNORE_INDEX)
        self.set_metrics(MetricCollection({"acc": accuracy, "f1": f1}), stages=("val", "test"))
        # (C, C) counts, rows true and columns predicted: the report's per-class table comes from it.
        self.report_metrics = MetricCollection(
            {"confusion": MulticlassConfusionMatrix(num, ignore_index=IGNORE_INDEX)}
        )

    # ----------------------------------------------------------------- the step
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = pool(self.encode(batch), batch["attention_mask"], self.pooling)  # (B, H)
        return self.head(pooled)  # (B, C)

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, labels = outputs.float(), batch["labels"]
        if self.multi_label:
            keep = labels != IGNORE_INDEX  # (B, C)
            total = F.binary_cross_entropy_with_logits(logits[keep], labels[keep].float(), reduction="sum")
        else:
            total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        # Sum / count rather than a mean: a batch with nothing labelled gives 0, not NaN.
        return total / self.loss_weight(batch).clamp(min=1)

    def metric_inputs(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple:
        scores = outputs.float().sigmoid() if self.multi_label else outputs.float()
        return scores, batch["labels"]

    # ----------------------------------------------------------------- checks
    def check_data(self, datamodule: L.LightningDataModule) -> None:
        super().check_data(datamodule)
        check_label_names(getattr(datamodule, "label_names", None), self.label_names, "label names")
        data_multi = getattr(datamodule, "multi_label", None)
        if data_multi is not None and data_multi != self.multi_label:
            raise ConfigError(
                f"data.init_args.multi_label={data_multi} but "
                f"model.init_args.multi_label={self.multi_label}: "
                f"set both the same"
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("hyper_parameters", {}).get("label_names")
        if saved is not None and list(saved) != self.label_names:
            raise CheckpointError(
                f"the checkpoint was trained with labels {list(saved)}, but this run has {self.label_names}: "
                f"test and predict with the checkpoint's labels (data.init_args.label_names), or "
                f"fine-tune a new model for the new label set"
            )

    # ----------------------------------------------------------------- report
    def report(self) -> Report:
        counts = self.report_metrics.compute()  # synced across devices
        metrics = {"loss": self.test_loss.compute().item()}
        if self.multi_label:
            stats = counts["stats"]  # (C, 5): tp, fp, tn, fn, support
            table, summary = scores_table(self.label_names, stats[:, 0], stats[:, 1], stats[:, 3])
            tables = [table, multilabel_confusion_table(self.label_names, *stats[:, :4].T)]
            metrics["exact_match"] = float(self.test_metrics["acc"].compute())
        else:
            table, summary = confusion_scores_table(self.label_names, counts["confusion"])
            tables = [table, confusion_table(self.label_names, counts["confusion"])]
        metrics.update(summary)
        metrics["examples"] = int(table.rows[-1][-1])
        # Headline numbers to TensorBoard as well (test/acc and test/f1 are logged per step funnel).
        for key in ("macro_f1", "weighted_f1"):
            self.log(f"test/{key}", summary[key])
        return Report(title=f"{type(self).__name__}: test report", metrics=metrics, tables=tables)

    # ----------------------------------------------------------------- predict
    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        logits = self(batch).float()  # (B, C)
        rows = []
        if self.multi_label:
            probs = logits.sigmoid()
            for text, p, gold in zip(batch["text"], probs.tolist(), batch["labels"].tolist(), strict=True):
                chosen = [n for n, q in zip(self.label_names, p, strict=True) if q >= self.threshold]
                known = [n for n, g in zip(self.label_names, gold, strict=True) if g == 1]
                truth = "" if gold[0] == IGNORE_INDEX else ",".join(known)
                rows.append(f"{_clean(text)}\t{truth}\t{','.join(chosen)}\t{max(p):.4f}")
        else:
            probs = logits.softmax(-1)
            confidence, predicted = probs.max(-1)
            for text, c, k, gold in zip(
                batch["text"], confidence.tolist(), predicted.tolist(), batch["labels"].tolist(), strict=True
            ):
                truth = "" if gold == IGNORE_INDEX else self.label_names[gold]
                rows.append(f"{_clean(text)}\t{truth}\t{self.label_names[k]}\t{c:.4f}")
        self._predictions.extend(rows)
        return rows

    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def on_predict_epoch_end(self) -> None:
        header = "text\tlabel\tprediction\tprobability"
        path = predictions_path(self.trainer, "predictions.tsv")
        write_text(path, "\n".join([header, *self._predictions]) + "\n")
        rank_zero_info(f"gptlab: {len(self._predictions)} predictions written to {path}")


def _clean(text: str) -> str:
    # One example per line in the TSV: tabs and newlines inside a text become spaces.
    return " ".join(text.split())
