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

    # ----------------------------------------------------------------- bits per byte
    # Perplexity is per token, so it depends on the tokenizer: a character vocabulary and a BPE
    # of 50k tokens give incomparable numbers on the same text. Bits per byte divide the same
    # total loss by the UTF-8 bytes of the scored text instead (the unit of The Pile and
    # lm-evaluation-harness' `bits_per_byte`), which any two tokenizers share.
    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self.test_bytes = torch.zeros((), dtype=torch.float64, device=self.device)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().test_step(batch, batch_idx)
        tokenizer = self._tokenizer()
        if tokenizer is not None:
            # The scored tokens are the labelled targets (shifted, as in `loss`).
            targets = batch["labels"][:, 1:].cpu()
            texts = tokenizer.batch_decode(
                [row[row != -100].tolist() for row in targets], skip_special_tokens=True
            )
            self.test_bytes += sum(len(text.encode("utf-8")) for text in texts)
        return loss

    def _tokenizer(self):
        """The data module's tokenizer (read for decoding only), or None without one."""
        try:
            return getattr(self.trainer.datamodule, "tokenizer", None)
        except (RuntimeError, AttributeError):  # not set up, or no data module
            return None

    def report(self) -> Report:
        loss = self.test_loss.compute().item()
        # MeanMetric's weight state counts this rank's predicted tokens; sum over ranks.
        tokens = int(self.trainer.strategy.reduce(self.test_loss.weight, reduce_op="sum").item())
        metrics = {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}
        meta = {}
        tokenizer = self._tokenizer()
        size = float(self.trainer.strategy.reduce(self.test_bytes, reduce_op="sum").item())
        if tokenizer is not None and size > 0:
            metrics["bits_per_byte"] = loss * tokens / math.log(2) / size
            metrics["bytes_evaluated"] = int(size)
        metrics["tokens_evaluated"] = tokens
        if tokenizer is not None:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            meta["perplexity"] = (
                f"exp(loss), per token of the tokenizer {name} ({len(tokenizer)} tokens): comparable only "
                f"between runs with this tokenizer; bits_per_byte (loss x tokens / ln 2 / UTF-8 bytes of "
                f"the scored text) compares any two"
            )
        return Report(title="Causal language model: test report", metrics=metrics, meta=meta)
