"""CausalLM: self-supervised next-token prediction, the pretraining half of the GPT recipe."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gptlab.reports import Report
from gptlab.tasks.base import TaskModule


class CausalLM(TaskModule):
    """Next-token cross entropy on every labelled position.

    Labels arrive aligned with `input_ids` (batch contract); the shift happens here, as in
    Hugging Face: position t predicts token t+1, and the last token is fed only as a target.
    Positions labelled -100 (padding, or prompt tokens in SFT) are ignored. Logs train/loss,
    val/loss, val/ppl and train/tokens.
    """

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # The last token is only ever a target: it is not fed (its logits would be thrown away).
        # So a window of block_size + 1 tokens trains every one of the model's block_size
        # positions, as in nanoGPT (x = data[i:i+T], y = data[i+1:i+T+1]) and litgpt.
        inputs = {key: batch[key][:, :-1] for key in ("input_ids", "attention_mask") if key in batch}
        return self.backbone.logits(self.encode(inputs))  # (B, T-1, V)

    def positions_fed(self, seq_len: int) -> int:
        return seq_len - 1  # the last token is only a target

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = outputs.float()  # (B, T-1, V); fp32 softmax under mixed precision
        targets = batch["labels"][:, 1:]  # (B, T-1)
        # reduction="sum" / count instead of "mean": a batch with no labelled token gives 0, not NaN.
        total = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        return total / self.loss_weight(batch).clamp(min=1)

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"][:, 1:] != -100).sum()

    def epoch_end_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        metrics = super().epoch_end_metrics(stage)
        if f"{stage}/loss" in metrics:
            metrics[f"{stage}/ppl"] = torch.exp(metrics[f"{stage}/loss"])
        return metrics

    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_called and not self.trainer.sanity_checking:
            self.log("val/ppl", torch.exp(self.val_loss.compute()), prog_bar=True)
        super().on_validation_epoch_end()

    def on_test_epoch_end(self) -> None:
        if self.test_loss.update_called:
            self.log("test/ppl", torch.exp(self.test_loss.compute()))
        super().on_test_epoch_end()

    def report(self) -> Report:
        loss = self.test_loss.compute().item()
        return Report(
            title="Causal language model: test report",
            metrics={
                "loss": loss,
                "perplexity": math.exp(loss) if loss < 700 else float("inf"),
                # MeanMetric's weight state counts this rank's predicted tokens; sum over ranks.
                "tokens_evaluated": int(
                    self.trainer.strategy.reduce(self.test_loss.weight, reduce_op="sum").item()
                ),
            },
        )
