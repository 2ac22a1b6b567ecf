"""TokenClassification (NER): a tag per word, from the hidden state of the word's first sub-token.

    input_ids (B, T) ─> backbone ─> hidden (B, T, H) ─> dropout ─> linear ─> logits (B, T, C)
                                                                    │ argmax at each word's
                                                                    v first sub-token
                                             word tags (B, W) ─> entity F1 (conlleval), token scores

Training: cross entropy on the labelled sub-tokens (the first of each word, or all of them with the
data module's `label_all_subtokens`). Evaluation is at word level: a word's tag is read at its
first sub-token, and a word cut off by truncation is predicted as the fill tag (O), so scores
cover every word of the data, as conlleval does.

With a causal backbone a word's first sub-token has seen only the words to its left; that is the
price of fine-tuning a GPT for tagging (GPT-style NER models often do better with later
sub-tokens or a bidirectional encoder), and the benchmark in the README measures what it gets.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from gptlab.data.base import IGNORE_INDEX
from gptlab.data.labels import check_label_names
from gptlab.errors import CheckpointError, ConfigError
from gptlab.metrics.classification import confusion_scores_table
from gptlab.metrics.ner import OUTSIDE, EntityCounts, EntityF1, entity_table, is_entity_tagset
from gptlab.models import Backbone
from gptlab.optim import WarmupCosine
from gptlab.reports import Report, write_text
from gptlab.runs import predictions_path
from gptlab.tasks.base import PeftConfig, TaskModule
from gptlab.tasks.context import Context


def word_predictions(
    token_preds: torch.Tensor, word_ids: torch.Tensor, num_words: int, fill: int
) -> torch.Tensor:
    """Each word's prediction, read at its first sub-token: (B, T) -> (B, W).

    `word_ids` (B, T) holds the word of every token (-1 for none). Words without a token (cut off
    by truncation) get `fill`.
    """
    previous = F.pad(word_ids, (1, 0), value=-1)[:, :-1]  # (B, T): the word of the token before
    first = (word_ids >= 0) & (word_ids != previous)  # (B, T): first sub-token of its word
    out = torch.full((word_ids.size(0), num_words + 1), fill, dtype=torch.long, device=word_ids.device)
    # Every other token writes into a spare last column, dropped below.
    out.scatter_(1, torch.where(first, word_ids, num_words), token_preds.long())
    return out[:, :num_words]  # (B, W)


class TokenClassification(TaskModule):
    """A tag per word (NER, chunking, POS); entity-level conlleval scores when the tags are B-/I-/E-/S-."""

    def __init__(
        self,
        backbone: Backbone | None = None,
        label_names: list[str] | None = None,
        dropout: float = 0.1,
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
            label_names: the tags in id order (e.g. O, B-LOC, I-LOC, ...). Under the CLI they come
                from the data module and are saved with the checkpoint.
            dropout: dropout on the hidden states before the linear head.
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
                f"(gptlab.data.TokenClassificationDataModule), or pass label_names"
            )
        super().__init__(
            backbone, optimizer, scheduler, init_from, freeze_backbone, backbone_lr_scale, peft, context
        )
        self.label_names = list(label_names)
        num = len(self.label_names)
        # The tag of a word the model never saw (cut off by truncation).
        self.fill_id = self.label_names.index(OUTSIDE) if OUTSIDE in self.label_names else 0
        self.entity_level = is_entity_tagset(self.label_names)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.backbone.hidden_size, num))
        logged = {"acc": MulticlassAccuracy(num, average="micro", ignore_index=IGNORE_INDEX)}
        report = {"tags": MulticlassConfusionMatrix(num, ignore_index=IGNORE_INDEX)}
        if self.entity_level:
            logged["f1"] = EntityF1(self.label_names, ignore_index=IGNORE_INDEX)
            report["entities"] = EntityCounts(self.label_names, ignore_index=IGNORE_INDEX)
        self.set_metrics(MetricCollection(logged), stages=("val", "test"))
        self.report_metrics = MetricCollection(report)
        self._predictions: list[str] = []

    # ----------------------------------------------------------------- the step
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.encode(batch))  # (B, T, C)

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = outputs.float()
        total = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)),
            batch["labels"].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return total / self.loss_weight(batch).clamp(min=1)

    def metric_inputs(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple:
        words = batch["word_labels"]  # (B, W) gold tags, -100 after each sentence's last word
        preds = word_predictions(outputs.argmax(-1), batch["word_ids"], words.size(1), self.fill_id)
        return preds, words

    # ----------------------------------------------------------------- checks
    def check_data(self, datamodule: L.LightningDataModule) -> None:
        super().check_data(datamodule)
        check_label_names(getattr(datamodule, "label_names", None), self.label_names, "tags")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("hyper_parameters", {}).get("label_names")
        if saved is not None and list(saved) != self.label_names:
            raise CheckpointError(
                f"the checkpoint was trained with tags {list(saved)}, but this run has {self.label_names}: "
                f"test and predict with the checkpoint's tags (data.init_args.label_names), or "
                f"fine-tune a new model for the new tag set"
            )

    # ----------------------------------------------------------------- report
    def report(self) -> Report:
        counts = self.report_metrics.compute()  # summed over batches and devices
        tokens, token_summary = confusion_scores_table(
            self.label_names, counts["tags"], title="Token-level scores per tag (words)"
        )
        metrics: dict = {"loss": self.test_loss.compute().item()}
        tables = [tokens]
        if self.entity_level:
            entities, entity_summary = entity_table(self.test_metrics["f1"].types, counts["entities"])
            metrics.update(entity_summary)
            tables.insert(0, entities)
            for key in ("entity_precision", "entity_recall"):
                self.log(f"test/{key}", entity_summary[key])
        metrics.update(token_accuracy=token_summary["accuracy"], token_macro_f1=token_summary["macro_f1"])
        metrics["words"] = int(tokens.rows[-1][-1])
        return Report(title=f"{type(self).__name__}: test report", metrics=metrics, tables=tables)

    # ----------------------------------------------------------------- predict
    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        gold = batch["word_labels"]
        preds = word_predictions(self(batch).argmax(-1), batch["word_ids"], gold.size(1), self.fill_id)
        sentences = []
        for words, pred_row, gold_row in zip(batch["words"], preds.tolist(), gold.tolist(), strict=True):
            # conlleval's input format: word, gold tag, predicted tag (gold only when the input had it).
            lines = [
                f"{word} {self.label_names[g]} {self.label_names[p]}"
                if g != IGNORE_INDEX
                else f"{word} {self.label_names[p]}"
                for word, p, g in zip(words, pred_row[: len(words)], gold_row[: len(words)], strict=True)
            ]
            sentences.append("\n".join(lines))
        self._predictions.extend(sentences)
        return sentences

    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def on_predict_epoch_end(self) -> None:
        path = predictions_path(self.trainer, "predictions.conll")
        write_text(path, "\n\n".join(self._predictions) + "\n")
        rank_zero_info(f"gptlab: tags of {len(self._predictions)} sentences written to {path}")
